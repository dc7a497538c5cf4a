"""``alignkit.cpu_memory``: glibc keeps freed blocks for reuse (no page faults on the next step's tensors), the
user's own ``MALLOC_*_`` settings win, and a CPU training run applies it unless ``model.retain_cpu_memory=false``."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest

import alignkit.cpu_memory as cpu_memory
import alignkit.process as process_mod
from alignkit.data.modules import SFTData
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
GLIBC = cpu_memory.glibc() is not None

# Allocates and frees same-sized 8 MiB tensors of varying count (as a training step's activations vary) and one
# 40 MiB tensor, and prints the minor page faults of the repeats after the first, with or without `retain_freed_memory`.
FAULTS = """
import resource, sys, torch
import alignkit.cpu_memory as m
applied = m.retain_freed_memory() if sys.argv[1] == "on" else False
def churn():
    for n in (1, 6, 2, 5, 3):
        blocks = [torch.ones(1024, 2048) for _ in range(n)]
        del blocks
    big = torch.ones(10 * 1024, 1024)  # 40 MiB: above the largest mmap threshold glibc allows
    del big
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "1", **(env or {})})
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    applied, faults = _faults("on")
    assert applied == "True"
    # 5 repeats x ((1+6+2+5+3) blocks x 2,048 pages + 10,240 pages) would fault ~225,000 times if every block
    # landed on fresh pages; glibc's defaults reuse some of the small blocks (92,010 faults here, the 40 MiB one
    # mapped afresh every time), retained memory all of them (0 here; up to one block's 2,048 pages otherwise).
    _, default_faults = _faults("off")
    assert faults <= 3 * 2048, faults
    assert default_faults > 5 * faults, (default_faults, faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_users_malloc_variables_win():
    applied, _ = _faults("on", {"MALLOC_TRIM_THRESHOLD_": "131072"})
    assert applied == "False"


class FakeLibc:
    """glibc's ``mallopt`` as a recorder that answers ``result`` (1: accepted, 0: refused)."""

    def __init__(self, result: int):
        self.result, self.calls = result, []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def _fresh(monkeypatch, libc: FakeLibc) -> None:
    """A process that has not applied the settings yet, with ``libc`` as its C library and no MALLOC_ variables."""
    monkeypatch.setattr(cpu_memory, "_applied", False)
    monkeypatch.setattr(cpu_memory, "glibc", lambda: libc)
    for name in [n for n in os.environ if n.startswith("MALLOC_")]:
        monkeypatch.delenv(name)


def test_mallopt_values(monkeypatch):
    libc = FakeLibc(1)
    _fresh(monkeypatch, libc)
    assert cpu_memory.retain_freed_memory() is True
    assert libc.calls == [(cpu_memory.M_MMAP_THRESHOLD, 32 * 2**20), (cpu_memory.M_TRIM_THRESHOLD, 2**31 - 1),
                          (cpu_memory.M_MMAP_MAX, 0)]
    assert cpu_memory.retain_freed_memory() is True and len(libc.calls) == 3  # once per process


def test_not_applied_when_mallopt_fails(monkeypatch):
    _fresh(monkeypatch, FakeLibc(0))
    assert cpu_memory.retain_freed_memory() is False


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_training_applies_it_unless_disabled(retain, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(process_mod, "retain_freed_memory", lambda: calls.append(1) or True)
    task = SentimentTask(num_train_prompts=8, num_eval_prompts=2)
    data = SFTData(task=task, batch_size=4, max_length=32)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(AlignModule(algorithm=SFT(), policy=TINY, retain_cpu_memory=retain), datamodule=data)
    assert calls == ([1] if retain else [])
