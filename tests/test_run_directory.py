"""Run directories that never lie (issue #22): a crashed, killed, signalled or damaged run resumes to exactly the
uninterrupted result or stops with one line naming the file at fault, and nothing already written is lost.

Most runs here are in-process (a test-only callback raises where a crash would happen); the signal and lock tests use
real processes and real signals. The SIGKILL-at-any-moment tests are in ``test_resume.py``."""

from __future__ import annotations

import csv
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import QUIET, TINY_MODEL, run_cli
from test_resume import CASES, assert_same_run, inputs, umask  # noqa: F401  (inputs: a fixture)

ROOT = Path(__file__).resolve().parents[1]
COMMON = [*TINY_MODEL, *QUIET, "--trainer.deterministic=true"]
#: SFT on 64 prompts, 8 a batch: 6 optimiser steps, a checkpoint every 2.
SFT = ["--config", "recipes/sft.yaml", *COMMON, "--data.init_args.batch_size=8",
       "--data.init_args.task.init_args.num_train_prompts=64", "--data.init_args.val_fraction=0",
       "--trainer.limit_val_batches=0", "--trainer.max_steps=6", "--checkpoint_every=2"]


class Crash(L.Callback):
    """Test-only: raise, as a crash would, once (``marker`` records it), at the end of the training batch that
    reaches optimiser step ``step`` (before that batch's checkpoint and its metrics.csv row)."""

    def __init__(self, marker: str, step: int):
        self.marker, self.step = Path(marker), step

    def crash(self, where: str) -> None:
        if not self.marker.exists():
            self.marker.write_text(where)
            raise RuntimeError(f"test crash {where}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step <= trainer.global_step:
            self.crash(f"at step {trainer.global_step}")


class CrashAtStart(Crash):
    """Test-only: :class:`Crash` when a resumed run starts training (after it has trimmed its files)."""

    def __init__(self, marker: str):
        super().__init__(marker, step=-1)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None:
            self.crash("at start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass


class SignalAt(L.Callback):
    """Test-only: the process sends itself ``name`` at the end of the batch that reaches optimiser step ``step``, once
    (``marker`` records it)."""

    def __init__(self, marker: str, step: int, name: str = "SIGTERM"):
        self.marker, self.step, self.name = Path(marker), step, name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            self.marker.write_text(self.name)
            os.kill(os.getpid(), getattr(signal, self.name))


def callbacks(*specs: tuple[str, dict]) -> str:
    return "--trainer.callbacks=" + json.dumps([{"class_path": f"test_run_directory.{name}", "init_args": args}
                                                for name, args in specs])


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def step_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------- 1, 2: metrics.csv

def test_crashed_ppo_run_keeps_metrics_rows_in_logger_steps_and_never_loses_them(inputs, tmp_path, monkeypatch):  # noqa: F811
    """PPO logs one metrics.csv row per batch of 2 optimiser steps, at the step its updates reached (2, 4, ...).
    Checkpoint at step 6 (batch 2), crash at step 10 (rows at steps 2-8 written): the resumed file must drop the
    step-8 row, which the resumed run logs again (comparing Lightning's batch steps with optimiser steps once kept
    it, and logged it twice). The first resume crashes right after start-up; the second must still
    find every row (Lightning's CSV logger deleted the file at start-up and held the old rows in memory only)."""
    monkeypatch.chdir(ROOT)
    args = [*CASES["ppo"][0](inputs), *COMMON, "--checkpoint_every=6"]
    run_cli(["fit", *args, "--run_dir", tmp_path / "reference"])
    run = tmp_path / "run"
    crashing = [*args, callbacks(("Crash", {"marker": str(tmp_path / "c1"), "step": 10}),
                                 ("CrashAtStart", {"marker": str(tmp_path / "c2")})), "--run_dir", run]
    with pytest.raises(RuntimeError, match="at step 10"):
        run_cli(["fit", *crashing])
    assert [r["step"] for r in csv_rows(run)] == ["2", "4", "6", "8"]
    with pytest.raises(RuntimeError, match="at start"):
        run_cli(["fit", *crashing, "--resume", "true"])
    assert [r["step"] for r in csv_rows(run)] == ["2", "4", "6"]  # what the step-6 checkpoint accounts for
    run_cli(["fit", *crashing, "--resume", "true"])
    assert_same_run(tmp_path / "reference", run)


# ---------------------------------------------------------------------------------------------- 3: damaged checkpoints

def test_checkpoints_are_verified_and_a_damaged_one_falls_back_or_stops_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run_cli(["fit", *SFT, "--run_dir", tmp_path / "reference"])
    run = tmp_path / "run"
    crashing = [*SFT, callbacks(("Crash", {"marker": str(tmp_path / "c1"), "step": 5})), "--run_dir", run]
    with pytest.raises(RuntimeError):
        run_cli(["fit", *crashing])
    # the newest 2 checkpoints, each with its checksum; last.ckpt links the newest
    assert step_files(run) == ["last.ckpt", "step=2.ckpt", "step=2.ckpt.sha256", "step=4.ckpt", "step=4.ckpt.sha256"]
    assert os.readlink(run / "checkpoints" / "last.ckpt") == "step=4.ckpt"
    csv_before = (run / "metrics.csv").read_bytes()

    # Nothing usable: a truncated newest and an empty older one. One line, metrics.csv untouched.
    bad = tmp_path / "bad"
    shutil.copytree(run, bad, symlinks=True)
    newest, older = bad / "checkpoints" / "step=4.ckpt", bad / "checkpoints" / "step=2.ckpt"
    newest.write_bytes(newest.read_bytes()[:5000])
    older.write_bytes(b"")
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", *[a if a != run else bad for a in crashing], "--resume", "true"])
    assert info.value.code == 2
    error = one_error_line(capsys)
    assert "no usable checkpoint is left" in error and "step=4.ckpt (not a complete checkpoint file" in error
    assert "step=2.ckpt (an empty file (0 bytes))" in error
    assert (bad / "metrics.csv").read_bytes() == csv_before
    assert {"step=4.ckpt.corrupt", "step=2.ckpt.corrupt"} <= set(step_files(bad))  # set aside, not deleted

    # One changed byte in the newest: refused by its checksum; the run resumes from the older one, exactly.
    path = run / "checkpoints" / "step=4.ckpt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    run_cli(["fit", *crashing, "--resume", "true"])
    notes = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(notes) == 1 and "step=4.ckpt" in notes[0] and "SHA-256" in notes[0] and "step=4.ckpt.corrupt" in notes[0]
    assert_same_run(tmp_path / "reference", run)
    assert step_files(run) == ["last.ckpt", "step=4.ckpt", "step=4.ckpt.corrupt", "step=4.ckpt.sha256",
                               "step=6.ckpt", "step=6.ckpt.sha256"]


def test_verify_checkpoint_names_what_is_wrong(tmp_path):
    from alignkit.checkpoint import AtomicCheckpointIO, checksum_path, verify_checkpoint

    path = tmp_path / "step=1.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(4096.0), "global_step": 1}, path)
    assert verify_checkpoint(path) is None
    assert checksum_path(path).read_text().endswith("  step=1.ckpt\n")
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    assert "SHA-256" in verify_checkpoint(path)
    checksum_path(path).unlink()  # no checksum beside it: the zip records' CRCs still catch it
    assert "CRC" in verify_checkpoint(path)
    path.write_bytes(data[:len(data) // 3])
    assert "truncated" in verify_checkpoint(path)
    path.write_bytes(b"")
    assert verify_checkpoint(path) == "an empty file (0 bytes)"


# ---------------------------------------------------------------------------------------------- 4: disk full

def test_a_full_disk_stops_the_run_in_one_line_and_damages_nothing(tmp_path, monkeypatch, capsys):
    """A real write error from the kernel: the file-size limit (RLIMIT_FSIZE, EFBIG) lets config.yaml and
    metrics.csv be written but not the first checkpoint."""
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(SystemExit) as info:
            run_cli(["fit", *SFT, "--run_dir", run])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert info.value.code == 74
    error = one_error_line(capsys)
    assert f"could not write {run / 'checkpoints' / 'step=2.ckpt'}: File too large" in error
    assert "nothing written before was damaged" in error
    assert [p.name for p in (run / "checkpoints").iterdir()] == []  # the temporary file is gone
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 6
    assert [r["step"] for r in csv_rows(run)] == ["1"]


def test_write_failures_name_the_file_and_keep_the_old_one(tmp_path, monkeypatch):
    """(Simulated: the tests run as root, whom permissions do not stop.)"""
    from alignkit.checkpoint import WriteFailed, write_errno
    from alignkit.run import atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask()

    def refuse(source, destination):
        raise PermissionError(errno.EACCES, "Permission denied", str(source), str(destination))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteFailed) as info:
        atomic_write_json(target, {"a": 2})
    monkeypatch.undo()
    assert str(info.value) == (f"could not write {target}: Permission denied; nothing written before was damaged "
                               "(a run continues from its last checkpoint with --resume true once it is writable)")
    assert json.loads(target.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    # torch's zip writer reports a full disk inside a RuntimeError; the cause is found in the message or the chain
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    except RuntimeError as exc:
        assert write_errno(exc) == errno.ENOSPC
    assert "No space left on device" in str(WriteFailed(tmp_path / "x", errno.ENOSPC))


# ---------------------------------------------------------------------------------------------- 5: one writer

def test_a_second_writer_is_refused_in_one_line_naming_the_holder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from alignkit.lock import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as info:
            run_cli(["fit", *SFT, "--trainer.max_steps=1", "--run_dir", run])
        assert info.value.code == 2
        error = one_error_line(capsys)
        assert f"run directory {run} is in use by pid {holder.pid} on host" in error and "nothing was written" in error
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        holder.kill()  # a holder that dies (even by SIGKILL) leaves no lock behind
        holder.wait()
    run_cli(["fit", *SFT, "--trainer.max_steps=1", "--run_dir", run])
    assert (run / "metrics.json").is_file()


# --------------------------------------------------------------------------------------------- 6: changed configuration

def test_resume_refuses_a_changed_configuration_unless_told_and_then_applies_it(tmp_path, monkeypatch, capsys):
    from alignkit.cli import AlignCLI

    monkeypatch.chdir(ROOT)
    base = [*SFT, "--trainer.max_steps=4"]
    run = tmp_path / "run"
    crash = callbacks(("Crash", {"marker": str(tmp_path / "c1"), "step": 3}))
    with pytest.raises(RuntimeError):
        run_cli(["fit", *base, crash, "--run_dir", run])
    config_before = (run / "config.yaml").read_text()

    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(["fit", *base, crash, "--model.optimizer.lr=1e-2", "--run_dir", run, "--resume", "true"])
    error = one_error_line(capsys)
    assert f"cannot resume {run}: the configuration differs from its config.yaml in model.optimizer.lr (0.003 -> " \
           f"0.01)" in error and "--resume_with_changes true" in error
    with pytest.raises(SystemExit):  # another algorithm: named by its class, not by each of its arguments
        run_cli(["fit", "--config", "recipes/dpo.yaml", *COMMON, "--trainer.max_steps=4", crash, "--run_dir", run,
                 "--resume", "true"])
    assert "model.algorithm.class_path (alignkit_plugins.sft.SFT -> alignkit_plugins.dpo.DPO)" in one_error_line(capsys)
    assert (run / "config.yaml").read_text() == config_before and not (run / "resume_changes.jsonl").exists()

    cli = AlignCLI(args=["fit", *base, crash, "--model.optimizer.lr=1e-2", "--run_dir", str(run), "--resume", "true",
                         "--resume_with_changes", "true"])
    assert cli.trainer.global_step == 4 and cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-2]
    change = json.loads((run / "resume_changes.jsonl").read_text())
    assert change["changes"] == {"model.optimizer.lr": {"old": 0.003, "new": 0.01}}
    assert change["checkpoint"].endswith("step=2.ckpt")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["optimizer"]["lr"] == 0.01
    # the new rate really drives the resumed steps: the schedule of a run started at 1e-2
    run_cli(["fit", *base, "--model.optimizer.lr=1e-2", "--run_dir", tmp_path / "at_new_lr"])
    lr = {d: {r["step"]: r["train/lr"] for r in csv_rows(d) if r.get("train/lr")}
          for d in (run, tmp_path / "at_new_lr")}
    # (a row's step is the update its batch made: rows 3 and 4 were trained after the resume from step 2)
    assert lr[run]["3"] == lr[tmp_path / "at_new_lr"]["3"] and lr[run]["4"] == lr[tmp_path / "at_new_lr"]["4"]
    assert float(lr[run]["2"]) == pytest.approx(float(lr[tmp_path / "at_new_lr"]["2"]) * 0.3)


# ---------------------------------------------------------------------------------------------- 7: signals

def test_sigterm_checkpoints_at_the_step_exits_75_and_resumes_exactly(tmp_path, monkeypatch):
    """A real process and a real SIGTERM (sent by the process to itself at the end of step 3, between the periodic
    checkpoints at 2 and 4)."""
    monkeypatch.chdir(ROOT)
    run_cli(["fit", *SFT, "--run_dir", tmp_path / "reference"])
    run = tmp_path / "run"
    signalled = [*SFT, callbacks(("SignalAt", {"marker": str(tmp_path / "s1"), "step": 3})), "--run_dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "alignkit.cli", "fit", *signalled], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 75, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("alignkit: stopped by SIGTERM at step 3: "
                    f"checkpoint {run / 'checkpoints' / 'step=3.ckpt'} written; "
                    f"continue the run with --resume true (exit code 75)")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert not (run / "model").exists() and not (run / "metrics.json").exists()
    run_cli(["fit", *signalled, "--resume", "true"])
    assert_same_run(tmp_path / "reference", run)


def test_sigusr1_stops_a_pipeline_at_that_stage_with_the_same_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    stage_args = [*SFT[2:], "--trainer.max_steps=3"]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"base_dir": str(ROOT / "recipes"), "stages": [
        {"name": "first", "recipe": "sft.yaml",
         "args": [*stage_args,
                  callbacks(("SignalAt", {"marker": str(tmp_path / "s1"), "step": 2, "name": "SIGUSR1"}))]},
        {"name": "second", "recipe": "sft.yaml", "args": stage_args}]}))
    def ignore(*args):
        pass

    previous = signal.signal(signal.SIGUSR1, ignore)  # (without a handler, SIGUSR1 ends this process)
    try:
        with pytest.raises(SystemExit) as info:
            run_cli(["pipeline", "--config", pipeline, "--run_dir", tmp_path / "out"])
        assert signal.getsignal(signal.SIGUSR1) is ignore  # the fit put back the handler it found
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert info.value.code == 75
    err = capsys.readouterr().err
    assert "alignkit: stopped by SIGUSR1 at step 2: checkpoint" in err and "step=2.ckpt" in err
    assert not (tmp_path / "out" / "second").exists()
    run_cli(["pipeline", "--config", pipeline, "--run_dir", tmp_path / "out"])  # resumes the first stage
    assert json.loads((tmp_path / "out" / "first" / "metrics.json").read_text())["global_step"] == 3
    assert (tmp_path / "out" / "second" / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------- 8, 9

def test_pipeline_stage_names_are_plain(tmp_path, monkeypatch, capsys):
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"name": "../../x", "recipe": str(ROOT / "recipes" / "sft.yaml"),
                                                     "args": [*COMMON, "--trainer.max_steps=1"]}]}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_cli(["pipeline", "--config", pipeline, "--run_dir", tmp_path / "a" / "b" / "out"])
    assert info.value.code == 2
    expected = "pipeline stage name '../../x' is not a plain name (letters, digits, '-' and '_' only)"
    assert expected in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]


class _Payload:
    """Pickled into a fake reference cache: loading it with pickle's full power would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_dpo_reference_cache_is_loaded_with_weights_only(tmp_path, monkeypatch):
    """Even where torch is told to load full pickles by default (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)."""
    from types import SimpleNamespace

    from alignkit_plugins.dpo import DPO

    marker = tmp_path / "executed"
    torch.save({"meta": {}, "payload": _Payload(marker)}, tmp_path / "reference_logps.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    algorithm = DPO(reference_logps="precompute", cache_dir=str(tmp_path))
    data = SimpleNamespace(train_dataloader=lambda: [], val_dataloader=lambda: [])
    module = SimpleNamespace(trainer=SimpleNamespace(datamodule=data, default_root_dir=str(tmp_path)),
                             policy_config="tiny",
                             dataloaders_to_precompute=lambda: [data.train_dataloader(), data.val_dataloader()])
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        algorithm.ensure_reference_cache(module)
    assert not marker.exists()


def test_an_in_process_resume_uses_no_deprecated_library_call(tmp_path, monkeypatch):
    """The resume path compares configurations through jsonargparse's ``dump``; in-process (as the study and the
    pipeline run their stages), where alignkit's own deprecation warnings are errors, it must not use the deprecated
    ``skip_none`` keyword (caught by the SIGKILL stress test)."""
    from conftest import QUIET, SFT_RECIPE, TINY_MODEL, run_cli

    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")  # not only the first of a kind per process
    run = tmp_path / "run"
    args = ["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--data.init_args.task.init_args.num_train_prompts=40",
            "--checkpoint_every=1", "--run_dir", run]
    run_cli([*args, "--trainer.max_steps=2"])
    (run / "metrics.json").unlink()  # as if it had stopped after its step-2 checkpoint
    shutil.rmtree(run / "model")
    run_cli([*args, "--trainer.max_steps=3", "--resume", "true", "--resume_with_changes", "true"])
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 3


def test_a_reward_model_gone_at_resume_is_one_line_and_the_run_stays_resumable(inputs, tmp_path, monkeypatch,  # noqa: F811
                                                                                capsys):
    """jsonargparse wrapped the reward plugin's FileNotFoundError in a Union-matching ValueError with a traceback."""
    from alignkit.models.loading import ModelConfig, load_model
    from alignkit.models.tiny import TinyModelConfig

    monkeypatch.chdir(ROOT)
    rm = tmp_path / "rm" / "model"
    model, tokenizer = load_model(ModelConfig(name_or_path="tiny", tiny=TinyModelConfig(hidden_size=16, num_layers=1,
                                              num_heads=2, intermediate_size=32)), "sequence_classification")
    model.save_pretrained(rm)
    tokenizer.save_pretrained(rm)
    args = [a for a in CASES["ppo"][0](inputs) if not a.startswith("--model.rewards=")]
    run = tmp_path / "run"
    crashing = [*args, *COMMON, f"--model.rewards=[{{class_path: alignkit_plugins.rewards.RewardModelReward, "
                f"init_args: {{path: {rm}}}}}]", callbacks(("Crash", {"marker": str(tmp_path / "c1"), "step": 4})),
                "--run_dir", run]
    with pytest.raises(RuntimeError, match="at step 4"):
        run_cli(["fit", *crashing])
    before = step_files(run)
    shutil.rmtree(rm.parent)
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", *crashing, "--resume", "true"])
    assert info.value.code == 2
    assert one_error_line(capsys) == (f"alignkit: error: FileNotFoundError: RewardModelReward path '{rm}': no such "
                                      f"reward model directory (config.json missing)")
    assert step_files(run) == before  # nothing of the run was touched: it resumes once the directory is back
