"""``alignkit bench --smoke``: every stage runs through the benchmark and reports sane figures; the FLOP
formulas and the result plumbing are checked on hand-made numbers."""

from __future__ import annotations

import json
import math

import pytest

from alignkit.models import TinyModelConfig
from alignkit_benchmarks.command import bench
from alignkit_benchmarks.flops import ModelShape, step_flops
from alignkit_benchmarks.results import aggregate, ratios
from alignkit_benchmarks.sizes import PRESETS, Size, Workload


def tiny_size(name: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> Size:
    return Size(name, TinyModelConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                      intermediate_size=intermediate_size))


def test_smoke_bench_reports_every_stage(tmp_path, capsys):
    report = bench(smoke=True, output=str(tmp_path / "bench.json"))
    saved = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["algorithm"]: r for r in saved["results"]}
    assert set(rows) == {"sft", "rm", "dpo", "ppo"} and len(report["results"]) == 4
    for algorithm, row in rows.items():
        assert "error" not in row, row.get("error")
        assert row["framework"] == "alignkit" and row["repeats"] == 1
        assert row["time_per_step_s"] > 0 and row["train_tokens_per_s"] > 0, algorithm
        assert row["flops_per_step"] > 0 and 0 < row["mfu"] < 1.5 and row["mfu_peak"] > 0, algorithm
        assert 0 <= row["pad_fraction"] < 1 and row["peak_mem_mb"] >= 0
    assert rows["ppo"]["gen_tokens_per_s"] > 0 and rows["ppo"]["generated_tokens_per_step"] > 0
    assert {"rollout", "score", "experience", "update"} <= set(rows["ppo"]["phases_s"])
    assert saved["roofline_peak"]["flops_per_s"] > 0 and saved["meta"]["device"] in ("cpu", "cuda")
    table = capsys.readouterr().out
    assert "train tok/s" in table and "ppo" in table


def test_bench_is_a_typed_command(tmp_path, monkeypatch):
    """Registered in the ``alignkit.commands`` entry-point group, ``bench`` parses its options like every other
    command (``alignkit bench --smoke=true ...``); the benchmark itself is replaced by a recorder here."""
    import functools

    from alignkit import commands

    assert commands.available()["bench"] is bench

    calls: dict = {}

    @functools.wraps(bench)
    def recorder(**kwargs):
        calls.update(kwargs)

    monkeypatch.setitem(commands.COMMANDS, "bench", recorder)
    commands.run("bench", ["--smoke=true", "--algorithms=[dpo, ppo]", "--sizes=[{name: s, model: {hidden_size: 32, "
                           "num_layers: 2, num_heads: 2, intermediate_size: 64}}, 25M-v32k]", "--workload.batch_size=8",
                           "--compare=[trl]", "--group_by_length=false", f"--output={tmp_path / 'x.json'}"])
    assert calls["algorithms"] == ["dpo", "ppo"] and calls["sizes"] == [tiny_size("s", 32, 2, 2, 64), "25M-v32k"]
    assert calls["workload"] == Workload(batch_size=8) and calls["compare"] == ["trl"] and calls["smoke"] is True
    assert calls["group_by_length"] is False


@pytest.mark.parametrize("grouped", [True, False])
def test_group_by_length_reaches_the_data_module(tmp_path, monkeypatch, grouped):
    """``--group_by_length`` (default true) is the data module's own option, not a benchmark-only path."""
    import alignkit.data

    seen: list[bool] = []

    class Recording(alignkit.data.SFTData):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs["group_by_length"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(alignkit.data, "SFTData", Recording)
    options = {} if grouped else {"group_by_length": False}
    report = bench(smoke=True, algorithms=["sft"], output=str(tmp_path / "b.json"), **options)
    assert seen == [grouped] and report["config"]["group_by_length"] is grouped
    assert "error" not in report["results"][0]


def test_trl_side_groups_preference_pairs_by_length(tmp_path, monkeypatch):
    """TRL's RM and DPO trainers get ``LengthGroupedSampler`` with every pair's padded length (prompt + the
    longer response): its ``input_ids`` fallback does not exist for pairs, and the ``length`` column must survive
    the trainer's column pruning."""
    pytest.importorskip("trl")
    import transformers.trainer

    recorded: list = []

    class Recording(transformers.trainer.LengthGroupedSampler):
        def __init__(self, batch_size, dataset=None, lengths=None, **kwargs):
            assert lengths is not None
            recorded.append((dataset, list(lengths)))
            super().__init__(batch_size, dataset=dataset, lengths=lengths, **kwargs)

    monkeypatch.setattr(transformers.trainer, "LengthGroupedSampler", Recording)
    report = bench(smoke=True, algorithms=["rm", "dpo"], compare=["trl"], output=str(tmp_path / "b.json"))
    assert all("error" not in r for r in report["results"]), [r.get("error") for r in report["results"]]
    assert len(recorded) == 2
    for dataset, lengths in recorded:
        expected = [len(r.get("prompt_ids") or []) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in dataset]
        assert lengths == expected and len(set(lengths)) > 1


def test_flop_formulas():
    shape = ModelShape(params=1000, matmul_params=800, layers=2, hidden=16, vocab=10)
    forward = 2 * 800 * 10 + 4 * 2 * 16 * 5 * 10  # 10 real tokens, padded length 5
    assert shape.forward(10, 5) == forward
    step = {"tokens/real": 10.0, "tokens/length": 5.0}
    work = Workload(update_epochs=2)
    assert step_flops("sft", step, shape, shape, work) == 3 * forward
    assert step_flops("dpo", step, shape, shape, work) == 4 * forward
    assert step_flops("dpo", step, shape, shape, work, reference="precompute") == 3 * forward
    online = {**step, "tokens/prompt": 4.0, "tokens/generated": 6.0, "tokens/prompt_length": 2.0}
    expected = shape.forward(4, 2) + shape.forward(6, 5) + 3 * forward + 2 * 3 * forward
    assert step_flops("ppo", online, shape, shape, work) == pytest.approx(expected)


def test_aggregate_takes_medians_and_ratios_compare_frameworks():
    size = tiny_size("s", 32, 2, 2, 64)
    runs = [{"time_per_step_s": t, "train_tokens_per_s": 100 / t, "peak_mem_mb": 10.0, "flops_per_s": 1e9,
             "median": {"time/step": t}} for t in (1.0, 3.0, 2.0)]
    ours = aggregate(size, "dpo", "alignkit", runs, peak_flops=1e10)
    assert ours["time_per_step_s"] == 2.0 and ours["train_tokens_per_s"] == 50.0 and ours["mfu_peak"] == 0.1
    theirs = aggregate(size, "dpo", "trl", [{**runs[0], "train_tokens_per_s": 25.0, "peak_mem_mb": 20.0}], 1e10)
    failed = aggregate(size, "rm", "trl", [{"error": "boom"}], 1e10)
    assert failed["error"] == "boom"
    (ratio,) = ratios([ours, theirs, failed])
    assert ratio["speedup"] == 2.0 and ratio["memory_ratio"] == 0.5 and ratio["theirs"] == "trl"
    assert math.isnan(ratios([ours, {**theirs, "train_tokens_per_s": 0.0}])[0]["speedup"])


def test_bf16_mixed_reaches_both_trainers(tmp_path, monkeypatch):
    """``--precision=bf16-mixed`` is Lightning's precision on alignkit's side and ``bf16=True`` on TRL's, and the
    rooflines are timed in bfloat16."""
    pytest.importorskip("trl")
    import lightning as L
    import transformers

    precisions, bf16, rooflines = [], [], []
    lightning_init, args_init = L.Trainer.__init__, transformers.TrainingArguments.__post_init__

    def trainer_init(self, *args, **kwargs):
        precisions.append(kwargs.get("precision"))
        lightning_init(self, *args, **kwargs)

    def args_post_init(self):
        bf16.append(self.bf16)
        args_init(self)

    import alignkit_benchmarks.roofline as ab

    time_matmul = ab.time_matmul
    monkeypatch.setattr(L.Trainer, "__init__", trainer_init)
    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", args_post_init)
    monkeypatch.setattr(ab, "time_matmul", lambda *a, **k: (rooflines.append(a[4]), time_matmul(*a, **k))[1])
    report = bench(smoke=True, algorithms=["dpo"], compare=["trl"], precision="bf16-mixed",
                   output=str(tmp_path / "b.json"))
    assert all("error" not in r for r in report["results"]), [r.get("error") for r in report["results"]]
    assert precisions == ["bf16-mixed"] and bf16 and all(bf16) and report["config"]["precision"] == "bf16-mixed"
    assert rooflines and set(rooflines) == {"bfloat16"}


def test_hook_timer_times_every_loss_call(tmp_path):
    """The timing wrapper plugin (``@hookimpl(wrapper=True)``, given through ``AlignModule(plugins=...)``) sees
    every call of every hook: one time per ``alignkit_loss`` call of a tiny run."""
    import lightning as L

    from alignkit import hookimpl
    from alignkit.data import SFTData
    from alignkit.models import ModelConfig
    from alignkit.module import AlignModule
    from alignkit_benchmarks.assets import prepare_assets
    from alignkit_benchmarks.hook_timer import HookTimer
    from alignkit_plugins.sft import SFT

    class LossCounter:
        calls = 0

        @hookimpl(tryfirst=True)
        def alignkit_loss(self):  # answers None: the algorithm computes the loss
            self.calls += 1

    work = Workload(batch_size=4, max_length=32, max_prompt_length=16, num_pairs=16)
    paths = prepare_assets(tmp_path / "assets", PRESETS["smoke"], work)
    timer, counter = HookTimer(), LossCounter()
    module = AlignModule(algorithm=SFT(), policy=ModelConfig(name_or_path=paths["policy"]), plugins=[timer, counter])
    data = SFTData(path=paths["demonstrations"], batch_size=4, max_length=32, val_fraction=0.0)
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert counter.calls == 4  # 2 optimiser steps × 2 accumulated batches
    times = timer.calls["alignkit_loss"]
    assert len(times) == counter.calls and all(wall > 0 and cpu >= 0 for wall, cpu in times)
    assert timer.totals()["alignkit_loss"]["calls"] == 4 and len(timer.calls["alignkit_configure"]) == 1
    assert "alignkit_rollout" not in timer.calls  # an offline run samples nothing
