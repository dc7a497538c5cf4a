"""Tests for ``alignkit compare``: fake training and evaluation run directories written here, the side-by-side
tables against the numbers written, the plotted series (√KL, per-step curves) apart from the plotting, the
PNG files, and the errors for directories that are not finished runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from matplotlib.image import imread

from alignkit import cli, commands
from alignkit.compare import (
    STEP_METRICS,
    compare,
    default_names,
    kl_series,
    load_run,
    sqrt_kl,
    step_series,
)
from alignkit.data.formats import DataError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BON_KL = math.log(4) - 3 / 4


def write_run(path: Path, summary: dict, csv_lines: list[str] | None = None) -> str:
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(summary))
    if csv_lines is not None:
        (path / "metrics.csv").write_text("\n".join(csv_lines) + "\n")
    return str(path)


@pytest.fixture
def runs(tmp_path) -> dict[str, str]:
    """A PPO run, a DPO run (with a validation row in its CSV) and an evaluation of three policies."""
    ppo = write_run(tmp_path / "ppo", {
        "recipe": "recipes/ppo_rlhf.yaml", "algorithm": "PPO", "global_step": 12, "wall_time_s": 3.5,
        "first": {"train/loss": 0.9, "objective/scores": 0.1},
        "final": {"train/loss": 0.4, "objective/scores": 0.7, "objective/kl": 2.25},
    }, ["epoch,objective/scores,step,train/loss",
        "0,0.1,0,0.9", "0,0.3,1,0.7", "0,0.7,2,0.4"])
    dpo = write_run(tmp_path / "dpo", {
        "recipe": "recipes/dpo.yaml", "algorithm": "DPO", "global_step": 20, "wall_time_s": 8.0,
        "first": {"train/loss": 0.6931, "rewards/margins": 0.0},
        "final": {"train/loss": 0.5, "rewards/margins": 0.25, "rewards/accuracies": 0.75, "val/loss": 0.55},
    }, ["epoch,rewards/margins,step,train/loss,val/loss",
        "0,0.05,9,0.68,", "0,0.25,19,0.5,", "0,,19,,0.55"])
    evaluation = write_run(tmp_path / "eval", {
        "settings": {"reference": "sft", "best_of_n": 4, "best_of_n_kl": BON_KL},
        "policies": {
            "sft": {"path": "runs/sft/model", "metrics": {
                "eval/gold_reward": 0.1, "eval/proxy_reward": -0.05, "eval/kl": 0.0, "eval/best_of_n_gold": 0.3}},
            "ppo": {"path": "runs/ppo/model", "metrics": {
                "eval/gold_reward": 0.5, "eval/proxy_reward": 0.9, "eval/kl": 4.0, "eval/win_rate": 0.625}},
            "dpo": {"path": "runs/dpo/model", "metrics": {
                "eval/gold_reward": 0.35, "eval/proxy_reward": 0.2, "eval/kl": -0.01, "eval/win_rate": 0.5}},
        },
    })
    return {"ppo": ppo, "dpo": dpo, "eval": evaluation}


def table_rows(markdown: str) -> dict[str, list[str]]:
    """label -> cells of every markdown table row (the header's label is '')."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            rows.setdefault(cells[0], cells[1:])
    return rows


def test_compare_writes_tables_and_plots(runs, tmp_path, capsys):
    out = compare([runs["ppo"], runs["dpo"], runs["eval"]], out=str(tmp_path / "cmp"))
    assert out == tmp_path / "cmp"
    markdown = (out / "comparison.md").read_text()
    assert markdown.strip() in capsys.readouterr().out  # printed as well

    training, evaluation = markdown.split("## Evaluated policies")
    train_rows, eval_rows = table_rows(training), table_rows(evaluation)
    assert train_rows[""] == ["ppo", "dpo"]
    assert train_rows["algorithm"] == ["PPO", "DPO"]
    assert train_rows["steps"] == ["12", "20"]
    assert train_rows["wall time (s)"] == ["3.5", "8"]
    assert train_rows["train/loss (first)"] == ["0.9", "0.6931"]
    assert train_rows["train/loss (final)"] == ["0.4", "0.5"]
    assert train_rows["objective/scores (final)"] == ["0.7", "-"]
    assert train_rows["rewards/accuracies (final)"] == ["-", "0.75"]
    assert "ppl" not in training  # no run logged it: no row

    assert eval_rows[""] == ["sft", "ppo", "dpo"]
    assert eval_rows["gold reward"] == ["0.1", "0.5", "0.35"]
    assert eval_rows["proxy reward"] == ["-0.05", "0.9", "0.2"]
    assert eval_rows["KL (nats)"] == ["0", "4", "-0.01"]
    assert eval_rows["√KL"] == ["0", "2", "0"]
    assert eval_rows["gold win rate vs reference"] == ["-", "62.5%", "50.0%"]
    assert eval_rows["best-of-n gold (proxy pick)"] == ["0.3", "-", "-"]
    assert eval_rows["reference policy"] == ["sft", "sft", "sft"]

    data = json.loads((out / "comparison.json").read_text())
    assert [(r["name"], r["kind"]) for r in data["runs"]] == [("ppo", "train"), ("dpo", "train"), ("eval", "eval")]
    ppo_column = data["training"]["columns"][0]["values"]
    assert ppo_column["final/objective/kl"] == 2.25 and ppo_column["global_step"] == 12
    policies = {c["name"]: c["values"] for c in data["evaluation"]["columns"]}
    assert policies["ppo"]["eval/gold_reward"] == 0.5 and policies["ppo"]["sqrt_kl"] == 2.0
    assert policies["ppo"]["path"] == "runs/ppo/model"
    assert data["plots"] == ["gold_vs_kl.png", "gold_vs_sqrt_kl.png", "reward_over_steps.png"]
    assert data["skipped_plots"] == []

    sizes = {"gold_vs_kl.png": (528, 1344), "gold_vs_sqrt_kl.png": (528, 1344), "reward_over_steps.png": (528, 1248)}
    for name, (height, width) in sizes.items():
        png = out / name
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 10_000
        assert imread(png).shape[:2] == (height, width)  # two panels each (the steps: one per metric)


def test_kl_series_takes_square_roots(runs):
    loaded = [load_run(runs["ppo"]), load_run(runs["eval"])]
    (series,) = kl_series(loaded)  # the training run contributes no series
    assert series.name == "eval"
    by_label = {p.label: p for p in series.points}
    assert list(by_label) == ["sft", "best-of-4 (KL bound)", "ppo", "dpo"]
    for point in series.points:
        assert point.sqrt_kl == pytest.approx(math.sqrt(max(point.kl, 0.0)))
    assert by_label["ppo"].sqrt_kl == 2.0 and by_label["ppo"].gold == 0.5 and by_label["ppo"].proxy == 0.9
    assert by_label["dpo"].kl == -0.01 and by_label["dpo"].sqrt_kl == 0.0  # a negative estimate sits at 0
    bon = by_label["best-of-4 (KL bound)"]
    assert bon.best_of_n and bon.kl == pytest.approx(BON_KL) and bon.sqrt_kl == pytest.approx(math.sqrt(BON_KL))
    assert bon.gold == 0.3 and bon.proxy is None
    assert sqrt_kl(9.0) == 3.0 and sqrt_kl(-1e-3) == 0.0


def test_step_series_picks_the_first_logged_metric(runs, tmp_path):
    ppo = step_series(load_run(runs["ppo"]))
    assert (ppo.metric, ppo.steps, ppo.values) == ("objective/scores", [0.0, 1.0, 2.0], [0.1, 0.3, 0.7])
    assert ppo.label == "ppo"  # the name already says the algorithm
    dpo = step_series(load_run(runs["dpo"], name="run-b"))
    assert (dpo.metric, dpo.steps, dpo.values) == ("rewards/margins", [9.0, 19.0], [0.05, 0.25])  # no val row
    assert dpo.label == "run-b (DPO)"
    loss = step_series(load_run(runs["dpo"]), ("train/loss", *STEP_METRICS))
    assert (loss.metric, loss.values) == ("train/loss", [0.68, 0.5])
    assert step_series(load_run(runs["eval"])) is None  # an evaluation has no training curve
    assert step_series(load_run(runs["ppo"]), ("val/loss",)) is None


def test_evaluations_only_skip_the_steps_plot_and_x_picks_the_kl_plots(runs, tmp_path):
    compare([runs["ppo"], runs["eval"]], out=str(tmp_path / "cmp"))  # its three plots are removed below
    out = compare([runs["eval"]], out=str(tmp_path / "cmp"), names=["sweep"], x="sqrt_kl")
    assert sorted(p.name for p in out.iterdir()) == ["comparison.json", "comparison.md", "gold_vs_sqrt_kl.png"]
    data = json.loads(out.joinpath("comparison.json").read_text())
    assert data["training"] is None and data["plots"] == ["gold_vs_sqrt_kl.png"]
    assert data["skipped_plots"][0].startswith("reward_over_steps.png")
    assert table_rows(out.joinpath("comparison.md").read_text())["evaluation"] == ["sweep"] * 3


def test_policy_names_shared_by_evaluations_get_the_run_prefixed(runs, tmp_path):
    other = tmp_path / "other" / "eval"
    other.parent.mkdir()
    (other).mkdir()
    (other / "metrics.json").write_text((Path(runs["eval"]) / "metrics.json").read_text())
    out = compare([runs["eval"], str(other)], out=str(tmp_path / "cmp"))
    header = table_rows(out.joinpath("comparison.md").read_text())[""]
    assert header[:3] == [f"{tmp_path.name}/eval/sft", f"{tmp_path.name}/eval/ppo", f"{tmp_path.name}/eval/dpo"]
    assert header[3:] == ["other/eval/sft", "other/eval/ppo", "other/eval/dpo"]


def test_default_names():
    assert default_names([Path("a/ppo"), Path("b/dpo")]) == ["ppo", "dpo"]
    assert default_names([Path("qs1/eval"), Path("qs2/eval"), Path("x")]) == ["qs1/eval", "qs2/eval", "x"]
    assert default_names([Path("a/eval"), Path("b/a/eval")]) == ["a/eval#1", "a/eval#2"]


def test_errors_name_the_run(runs, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "not_a_run"
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="not_a_run"):
        compare([runs["eval"], str(missing)], out=str(tmp_path / "cmp"))
    assert not (tmp_path / "cmp").exists()  # nothing written before every run was read

    collect = write_run(tmp_path / "collect", {"pairs": 10, "task": "sentiment"})
    with pytest.raises(DataError, match="collect.*neither a training run"):
        load_run(collect)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(DataError, match="broken.*not valid JSON"):
        load_run(broken)
    with pytest.raises(ValueError, match="one name per run"):
        compare([runs["eval"]], names=["a", "b"])

    # Through the command line: a one-line error that names the directory.
    monkeypatch.setitem(commands.COMMANDS, "compare", compare)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--runs", json.dumps([runs["ppo"], str(missing)]), "--out", str(tmp_path / "c2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{missing}/metrics.json does not exist" in err


def test_compare_through_the_cli(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(commands.COMMANDS, "compare", compare)
    out = commands.run("compare", ["--runs", json.dumps([runs["ppo"], runs["eval"]]), "--out",
                                   str(tmp_path / "cmp"), "--names", "[A, B]", "--x", "kl",
                                   "--step_metric", "train/loss"])
    data = json.loads(out.joinpath("comparison.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["A", "B"]
    assert data["plots"] == ["gold_vs_kl.png", "reward_over_steps.png"]
