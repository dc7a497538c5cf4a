"""``alignkit study``: the aggregates against a hand computation, one-line errors before anything runs, and a
2-seed smoke study (tiny steps) through the local process pool and the Ray executor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import QUIET, RECIPES, TINY_MODEL, run_cli

from alignkit.study_report import aggregate, markdown

# ------------------------------------------------------------------------------------------ aggregates


def cell(method: str, seed: int, trajectory: list[tuple[float, float]], proxy: float | None = None) -> dict:
    points = [{"step": 10 * i, "kl": kl, "gold": gold, "proxy": proxy, "win_rate": 0.5}
              for i, (kl, gold) in enumerate(trajectory)]
    last = points[-1]
    return {"kind": "method", "method": method, "seed": seed, "status": "ok", "run_dir": f"seed-{seed}/{method}",
            "trajectory": points, "wall_time_s": 10.0, "eval_time_s": 1.0,
            "final": {k: last[k] for k in ("kl", "gold", "proxy", "win_rate")}}


#: Method ``a`` ends at gold 0.5, 0.7, 0.6 and ``b`` at 0.4, 0.5, 0.6 on seeds 0, 1, 2.
CELLS = [
    cell("a", 0, [(0.0, 0.3), (1.0, 0.4), (2.0, 0.5)]),
    cell("a", 1, [(0.0, 0.3), (2.0, 0.5), (4.0, 0.7)]),
    cell("a", 2, [(0.0, 0.3), (0.5, 0.4), (3.0, 0.6)]),
    cell("b", 0, [(0.0, 0.3), (1.0, 0.4)]),
    cell("b", 1, [(0.0, 0.3), (1.0, 0.5)]),
    cell("b", 2, [(0.0, 0.3), (1.0, 0.6)]),
    {"kind": "method", "method": "c", "seed": 0, "status": "failed", "run_dir": "seed-0/c", "error": "Boom: no"},
]


def test_aggregates_match_a_hand_computation():
    agg = aggregate(CELLS, ["a", "b", "c"], kl_budgets=[1.0, 2.0])
    a, b, c = agg["methods"]["a"], agg["methods"]["b"], agg["methods"]["c"]
    assert a["n_seeds"] == b["n_seeds"] == 3 and c["n_seeds"] == 0 and c["failed_seeds"] == [0]
    assert a["gold_mean"] == pytest.approx(0.6)                # (0.5 + 0.7 + 0.6) / 3
    assert b["gold_mean"] == pytest.approx(0.5)                # (0.4 + 0.5 + 0.6) / 3
    assert a["kl_mean"] == pytest.approx(3.0)                  # (2 + 4 + 3) / 3
    assert a["gold_iqm"] == pytest.approx(0.6)                 # 3 values: trim_mean(0.25) cuts none → the mean
    assert 0.5 <= a["gold_ci_low"] <= 0.6 <= a["gold_ci_high"] <= 0.7
    # matched KL: gold where each run first reaches the budget
    #   budget 1: a/0 → 0.4 (a point), a/1 → 0.3 + (1/2)(0.5 − 0.3) = 0.4, a/2 → 0.4 + (0.5/2.5)(0.6 − 0.4) = 0.44
    assert a["matched_kl"]["1"]["n"] == 3
    assert a["matched_kl"]["1"]["gold_mean"] == pytest.approx((0.4 + 0.4 + 0.44) / 3)
    #   budget 2: a/0 → 0.5, a/1 → 0.5, a/2 → 0.4 + (1.5/2.5)(0.2) = 0.52; b never reaches KL 2
    assert a["matched_kl"]["2"]["gold_mean"] == pytest.approx((0.5 + 0.5 + 0.52) / 3)
    assert b["matched_kl"]["2"] == {"n": 0, "gold_mean": None, "ci_low": None, "ci_high": None}
    # paired differences a − b per seed: 0.1, 0.2, 0.0 → mean 0.1
    pair = agg["pairs"]["a - b"]
    assert pair["n"] == 3 and pair["difference"] == pytest.approx(0.1)
    assert 0.0 <= pair["ci_low"] <= 0.1 <= pair["ci_high"] <= 0.2
    # P(a > b) over all 9 pairs: 0.5 vs (0.4, 0.5, 0.6) → 1 + ½ + 0; 0.7 → 3; 0.6 → 1 + 1 + ½  ⇒ 7/9
    assert pair["probability_of_improvement"] == pytest.approx(7 / 9)
    assert "a - c" not in agg["pairs"]                          # no seed where both finished
    # the RL form d(α − β log d) fitted to the gains over each run's start, pooled over seeds
    assert a["fit"]["form"].startswith("rl") and a["fit"]["n_points"] == 6


def test_report_names_failed_cells_and_states_one_seed():
    study = {"study": {"name": "t", "command": "alignkit study", "date": "today", "machine": "m",
                       "wall_time_s": 1.0, "executor": "inline", "workers": 1, "threads_per_worker": 1,
                       "seeds": [0, 1, 2]},
             "cells": CELLS, "aggregates": aggregate(CELLS[:4] + CELLS[6:], ["a", "b", "c"], [1.0])}
    text = markdown(study)
    assert "| a | 3 | 0.600 [" in text
    assert "| b | 1 | 0.400 (one seed, no CI)" in text
    assert "| c seed 0 | Boom: no |" in text


def test_compare_reads_a_study_directory(tmp_path, capsys):
    from alignkit.compare import compare
    from alignkit.study_report import write_report

    header = {"name": "t", "command": None, "date": "today", "machine": "m", "wall_time_s": 1.0,
              "executor": "inline", "workers": 1, "threads_per_worker": 1, "seeds": [0, 1, 2],
              "methods": ["a", "b"], "config": {}}
    write_report(tmp_path / "study", header, CELLS[:6], [1.0])
    capsys.readouterr()
    compare([str(tmp_path / "study")], out=str(tmp_path / "cmp"))
    assert "| a | 3 | 0.600 [" in capsys.readouterr().out
    assert (tmp_path / "cmp" / "report.md").is_file() and (tmp_path / "cmp" / "gold_vs_sqrt_kl.png").is_file()


# ------------------------------------------------------------------------------------------ bad input


def study_file(tmp_path: Path, seeds: str = "[0, 1]", recipe: str = "dpo.yaml", method: str = "dpo") -> Path:
    path = tmp_path / "study.yaml"
    shutil.copy(RECIPES / "dpo.yaml", tmp_path / "dpo.yaml")
    path.write_text(f"seeds: {seeds}\nmethods:\n  - name: {method}\n    recipe: {recipe}\n")
    return path


@pytest.mark.parametrize("change, message", [
    ({"seeds": "[0, 1, 1]"}, "seeds [1] are listed more than once"),
    ({"recipe": "missing.yaml"}, "missing.yaml does not exist"),
    ({"recipe": "broken.yaml"}, "is not valid YAML"),
    ({"method": "sft/x"}, "method name 'sft/x'"),
])
def test_bad_study_is_one_line_error_before_anything_runs(tmp_path, capsys, change, message):
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    path = study_file(tmp_path, **change)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["study", "--config", path, "--run_dir", tmp_path / "out"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing ran


def test_unknown_method_in_only_is_refused(tmp_path, capsys):
    path = study_file(tmp_path)
    with pytest.raises(SystemExit):
        run_cli(["study", "--config", path, "--only=[ppo]", "--run_dir", tmp_path / "out"])
    assert "unknown methods ['ppo']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ smoke study

SMOKE = f"""
seeds: [0, 1]
upstream:
  - name: sft
    recipe: {RECIPES}/sft.yaml
    args: ["--data.init_args.task.init_args.num_train_prompts=64", "--trainer.max_epochs=1"]
  - name: collect
    command: collect
    args: ["--policy=${{sft}}/model", "--task=alignkit_plugins.tasks.SentimentTask", "--num_prompts=32",
           "--sampling.max_new_tokens=8"]
methods:
  - name: sft
    policy: "${{sft}}/model"
  - name: dpo
    recipe: {RECIPES}/dpo.yaml
    args: ["--model.policy.name_or_path=${{sft}}/model", "--data.init_args.path=${{collect}}/preferences.jsonl",
           "--data.init_args.batch_size=8"]
  - name: broken
    recipe: {RECIPES}/dpo.yaml
    args: ["--model.policy.name_or_path=${{sft}}/model", "--data.init_args.path=${{collect}}/missing.jsonl"]
evaluation:
  reference: "${{sft}}/model"
  reward: null
  every: 2
  num_prompts: 8
  max_new_tokens: 8
"""


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory) -> Path:
    """The 2-seed smoke study through the local process pool (2 workers × 1 thread)."""
    root = tmp_path_factory.mktemp("study")
    (root / "study.yaml").write_text(SMOKE)
    overrides = [*TINY_MODEL, *QUIET, "--trainer.max_steps=4"]
    run_cli(["study", "--config", root / "study.yaml", "--run_dir", root / "run", "--executor=local", "--workers=2",
             "--wandb=false", f"--set={json.dumps(overrides)}"])
    return root


def test_smoke_study_local(smoke_study):
    study = json.loads((smoke_study / "run" / "study.json").read_text())
    methods = study["methods"]
    assert methods["sft"]["n_seeds"] == 2 and methods["dpo"]["n_seeds"] == 2
    assert methods["sft"]["kl_mean"] == 0.0                    # the reference itself
    assert methods["broken"]["n_seeds"] == 0 and methods["broken"]["failed_seeds"] == [0, 1]
    errors = [c["error"] for c in study["cells"] if c["status"] != "ok"]
    assert len(errors) == 2 and all("missing.jsonl" in e for e in errors)
    dpo = [c for c in study["cells"] if c["method"] == "dpo"]
    assert [p["step"] for p in dpo[0]["trajectory"]] == [0, 2, 4]
    # step 0 of DPO is the SFT policy: the same samples as the `sft` method of that seed
    sft = {c["seed"]: c for c in study["cells"] if c["method"] == "sft"}
    for c in dpo:
        assert c["trajectory"][0]["gold"] == pytest.approx(sft[c["seed"]]["final"]["gold"], abs=1e-6)
    # the two seeds are two different upstreams: different SFT policies, different gold
    assert sft[0]["final"]["gold"] != sft[1]["final"]["gold"]
    assert "sft - dpo" in study["pairs"] and study["pairs"]["sft - dpo"]["n"] == 2
    for file in ("report.md", "gold_vs_sqrt_kl.png", "final_gold.png", "proxy_vs_gold.png"):
        assert (smoke_study / "run" / file).is_file()


def test_smoke_study_resumes_on_ray(smoke_study, capsys):
    """Finished cells are skipped on a re-run; the cells removed since run again, here as Ray tasks on a 2-CPU
    local Ray instance, and give the same numbers as the process pool did."""
    pytest.importorskip("ray")
    run = smoke_study / "run"
    before = json.loads((run / "study.json").read_text())
    shutil.rmtree(run / "seed-1" / "dpo")
    overrides = [*TINY_MODEL, *QUIET, "--trainer.max_steps=4"]
    run_cli(["study", "--config", smoke_study / "study.yaml", "--run_dir", run, "--executor=ray", "--workers=2",
             "--wandb=false", "--only=[dpo]", f"--set={json.dumps(overrides)}"])
    out = capsys.readouterr().out
    assert "dpo seed 0: already finished, skipped" in out and "dpo seed 1: done" in out
    after = json.loads((run / "study.json").read_text())
    old = {c["seed"]: c for c in before["cells"] if c["method"] == "dpo"}
    new = {c["seed"]: c for c in after["cells"] if c["method"] == "dpo"}
    assert new[1]["trajectory"] == old[1]["trajectory"]       # bit-identical on another executor
    assert after["methods"]["sft"]["n_seeds"] == 2             # cells of methods not re-run still count


def test_a_stopped_or_killed_study_leaves_no_worker_and_the_same_command_continues(smoke_study, tmp_path):
    """SIGKILL to the study's process: its worker gets SIGTERM (Linux), stops its run at a checkpoint and exits.
    SIGTERM to the study's process alone (``kill PID``, a scheduler): the worker's run stops at a checkpoint, the
    study exits 75 and writes no report. Each time no process is left, and the same command continues the run from
    its checkpoint. (A worker used to be orphaned: training on after the study was gone, then waiting forever.)"""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch

    psutil = pytest.importorskip("psutil")
    run = tmp_path / "run"
    shutil.copytree(smoke_study / "run" / "seed-1" / "upstream", run / "seed-1" / "upstream")  # finished upstream
    study_file = tmp_path / "study.yaml"
    study_file.write_text(SMOKE.replace("seeds: [0, 1]", "seeds: [1]").split("methods:")[0] + f"""
methods:
  - name: dpo
    recipe: {RECIPES}/dpo.yaml
    args: ["--model.policy.name_or_path=${{sft}}/model", "--data.init_args.path=${{collect}}/preferences.jsonl",
           "--data.init_args.batch_size=8", "--trainer.max_epochs=100", "--checkpoint_every=2"]
evaluation:
  reference: "${{sft}}/model"
  reward: null
  every: 20
  num_prompts: 8
  max_new_tokens: 8
""")
    overrides = [*TINY_MODEL, *QUIET, "--trainer.max_steps=40"]
    args = ["study", "--config", str(study_file), "--run_dir", str(run), "--executor=local", "--workers=1",
            "--wandb=false", f"--set={json.dumps(overrides)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    checkpoints = run / "seed-1" / "dpo" / "checkpoints"

    def saved() -> int:
        return torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]

    def start_and_wait_past(step: int):
        """The study in a process of its own, once its run has a checkpoint past ``step``; and its workers."""
        study = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *args], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 240
        while study.poll() is None and time.monotonic() < deadline:
            if max((int(f.stem.split("=")[1]) for f in checkpoints.glob("step=*.ckpt")), default=0) > step:
                break
            time.sleep(0.2)
        assert study.poll() is None, study.communicate(timeout=60)
        return study, psutil.Process(study.pid).children(recursive=True)

    study, workers = start_and_wait_past(0)
    study.kill()
    alive = psutil.wait_procs(workers, timeout=60)[1]
    study.communicate(timeout=30)
    assert alive == [] and workers, "a worker outlived its study"
    killed_at = saved()
    assert 2 <= killed_at < 40 and not (run / "seed-1" / "dpo" / "metrics.json").exists()

    study, workers = start_and_wait_past(killed_at)
    study.send_signal(signal.SIGTERM)
    _, err = study.communicate(timeout=180)
    assert study.returncode == 75, err[-3000:]
    assert ("alignkit: study stopped by SIGTERM: 0 cells finished, 1 stopped part-way (their runs keep their "
            "checkpoints), 0 not started; no report written") in err
    assert psutil.wait_procs(workers, timeout=30)[1] == []
    assert not (run / "study.json").exists() and not (run / "seed-1" / "dpo" / "metrics.json").exists()
    stopped_at = saved()
    assert killed_at < stopped_at < 40

    run_cli(args)  # the same command: the run continues from its checkpoint
    log = (run / "seed-1" / "dpo" / "log.txt").read_text()
    assert log.count(f"alignkit: run directory {run / 'seed-1' / 'dpo'} (resuming after step") == 2
    assert json.loads((run / "seed-1" / "dpo" / "metrics.json").read_text())["global_step"] == 40
    assert json.loads((run / "study.json").read_text())["methods"]["dpo"]["n_seeds"] == 1


def test_claims_are_judged_by_their_intervals():
    from alignkit.study_report import evaluate_claims

    # over-optimisation: gold 0.3 → 0.6 (peak, step 10) → 0.4 while the proxy climbs 0 → 1 → 2, on 3 seeds
    runs = [{**cell("x", s, [(0.0, 0.3), (1.0, 0.6 + 0.01 * s), (2.0, 0.4)]), "trajectory": [
        {"step": 10 * i, "kl": float(i), "gold": g, "proxy": float(i) + 0.1 * s, "win_rate": 0.5}
        for i, g in enumerate([0.3, 0.6 + 0.01 * s, 0.4 - 0.01 * s])]} for s in range(3)]
    cells = CELLS[:6] + runs
    agg = aggregate(cells, ["a", "b", "x"], [1.0])
    claims = evaluate_claims([
        {"name": "b beats a", "kind": "greater", "a": "b", "b": "a"},
        {"name": "x over-optimises", "kind": "overoptimisation", "a": "x", "b": None},
        {"name": "a follows best-of-n", "kind": "best_of_n_fit", "a": "a", "b": None},
    ], cells, agg)
    assert [c["supported"] for c in claims] == [False, True, False]
    assert claims[0]["evidence"].startswith("gold b − a = -0.100")       # the a − b entry, negated
    # seeds drop from their peak by (0.6 + 0.01·s) − (0.4 − 0.01·s) = 0.2 + 0.02·s (0.20, 0.22, 0.24: mean 0.22);
    # the proxy rises by 1 on each
    assert ("gold falls by 0.220 [0.200, 0.240]" in claims[1]["evidence"]
            and "rises by 1.000 [1.000, 1.000]" in claims[1]["evidence"])
    assert "rl: R = d(α − β log d)" in claims[2]["evidence"]             # a trained method: not the best-of-n form


def test_study_summary_is_one_offline_wandb_run(tmp_path):
    from alignkit.study_report import write_report

    header = {"name": "grid", "command": None, "date": "today", "machine": "m", "wall_time_s": 1.0,
              "executor": "inline", "workers": 1, "threads_per_worker": 1, "seeds": [0, 1, 2],
              "methods": ["a", "b"], "config": {"methods": []}}
    write_report(tmp_path, header, CELLS[:6], [1.0], wandb=True)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_a_sweep_expands_into_one_method_per_value():
    from alignkit.study import Method, expand_sweeps

    dpo = Method("dpo", recipe="dpo.yaml", args=["--x=1"],
                 sweep={"model.algorithm.init_args.beta": [0.05, 0.1], "--data.init_args.batch_size": [8]})
    names = [(m.name, m.args) for m in expand_sweeps([dpo, Method("sft", policy="p")])]
    assert names == [
        ("dpo.beta0.05.batch_size8",
         ["--x=1", "--model.algorithm.init_args.beta=0.05", "--data.init_args.batch_size=8"]),
        ("dpo.beta0.1.batch_size8",
         ["--x=1", "--model.algorithm.init_args.beta=0.1", "--data.init_args.batch_size=8"]),
        ("sft", []),
    ]


def test_a_rerun_with_another_configuration_is_refused(tmp_path):
    """A finished cell is reused on a re-run only if the study still describes it the same way."""
    from dataclasses import asdict

    from alignkit.run import atomic_write_json
    from alignkit.study import CellSpec, Method, StudyEvaluation, cell_config, changed_cells

    def spec(args: list[str]) -> CellSpec:
        return CellSpec("method", 0, "dpo", str(tmp_path / "seed-0" / "dpo"), ".", {"sft": "x"},
                        method=asdict(Method("dpo", recipe="dpo.yaml", args=args)),
                        evaluation=asdict(StudyEvaluation()), fit_args=["--trainer.max_steps=4", "--wandb=true"])

    atomic_write_json(tmp_path / "seed-0" / "dpo" / "cell.json",
                      {"status": "ok", "config": cell_config(spec(["--a=1"]))})
    assert changed_cells([spec(["--a=1"])]) == []
    assert changed_cells([spec(["--a=2"])]) == ["dpo seed 0 (method)"]
    same_but_wandb = spec(["--a=1"])
    same_but_wandb.fit_args = ["--trainer.max_steps=4", "--wandb=false"]  # logging does not change results
    assert changed_cells([same_but_wandb]) == []


@pytest.mark.parametrize("recipe", ["study.yaml", "claims.yaml"])
def test_shipped_study_recipes_parse_and_pass_the_checks(recipe):
    from jsonargparse import ActionConfigFile, ArgumentParser

    from alignkit.study import _check, expand_sweeps, study

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(study, as_group=False)
    init = parser.instantiate_classes(parser.parse_args(["--config", str(RECIPES / recipe)]))
    methods = expand_sweeps(init.methods)
    _check(methods, init.seeds, init.upstream, init.evaluation, RECIPES, None)
    assert len(init.seeds) >= 5 and {"ppo", "dpo", "best_of_n", "sft"} <= {m.name for m in methods}
    names = {m.name for m in methods}
    assert all(c.a in names and (c.b is None or c.b in names) for c in init.claims)
