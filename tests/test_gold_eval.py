"""GoldEval (gold-vs-KL trajectory during training) on tiny PPO and SFT fits, its file helpers, and
best-of-n curves (the picking rule on hand values, one real call on the tiny SFT model)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, TINY_MODEL, run_cli
from safetensors.torch import load_file

from alignkit.evaluation import best_of_n_curve, best_of_n_means, best_of_n_pick, sample_responses
from alignkit.gold_eval import GOLD_EVAL_FILE, GoldEval, keep_trajectory, read_trajectory
from alignkit.models.loading import ModelConfig, load_model
from alignkit.plugin import Reward, RewardOutput
from alignkit.rollout import SamplingConfig
from alignkit_plugins.tasks import SentimentTask

ROOT = Path(__file__).resolve().parents[1]
TASK = "alignkit_plugins.tasks.SentimentTask"
EVAL_KEYS = ["eval/gold_reward", "eval/proxy_reward", "eval/kl", "eval/win_rate", "eval/response_len"]
GOLD = {"class_path": "alignkit_plugins.rewards.GoldReward", "init_args": {"task": TASK}}


def gold_eval(**init_args) -> dict:
    return {"class_path": "alignkit.gold_eval.GoldEval",
            "init_args": {"task": TASK, "num_prompts": 16, "sampling": {"max_new_tokens": 12}, **init_args}}


def ppo_args(policy: Path) -> list:
    """PPO from the tiny SFT model on its gold reward; 2 optimiser steps per batch (2 minibatches)."""
    return ["fit", "--config", ROOT / "recipes" / "ppo_rlhf.yaml", f"--model.policy.name_or_path={policy}",
            f"--model.rewards=[{json.dumps(GOLD)}]", "--model.algorithm.init_args.sampling.max_new_tokens=8",
            "--model.algorithm.init_args.update_epochs=1", "--model.algorithm.init_args.num_minibatches=2",
            "--data.init_args.task.init_args.num_train_prompts=16", "--data.init_args.batch_size=4",
            "--model.optimizer.lr=3e-3", "--trainer.max_steps=8", *QUIET]


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def training_rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv without the evaluation rows and columns."""
    return [{k: v for k, v in row.items() if not k.startswith("eval/")} for row in csv_rows(run_dir)
            if not row.get("eval/gold_reward")]


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in rows]


@pytest.fixture(scope="module")
def ppo_runs(sft_run, tmp_path_factory) -> dict[str, Path]:
    """The same PPO fit with GoldEval (added by a YAML override file; every 3 steps) and without it."""
    root = tmp_path_factory.mktemp("gold_eval_ppo")
    override = root / "gold_eval.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [gold_eval(every=3)]}}))
    run_cli([*ppo_args(sft_run / "model"), "--config", override, "--run_dir", root / "with"])
    run_cli([*ppo_args(sft_run / "model"), "--run_dir", root / "without"])
    return {"with": root / "with", "without": root / "without"}


def test_ppo_trajectory_is_logged_at_the_start_every_multiple_and_the_end(ppo_runs):
    rows = read_trajectory(ppo_runs["with"])
    # global_step runs 2, 4, 6, 8: 4 is the first step past 3, 6 a multiple, 8 the final step
    assert [r["step"] for r in rows] == [0, 4, 6, 8]
    assert all(set(r) == {"step", *EVAL_KEYS, "time_s"} for r in rows)
    assert all(0 < r["time_s"] < 30 for r in rows)
    first = rows[0]
    # step 0: the policy is the reference and samples with the same seed: same responses
    assert abs(first["eval/kl"]) < 1e-4 and first["eval/win_rate"] == 0.5
    # the proxy is the module's only reward plugin, the gold reward itself (scored in float32)
    assert all(r["eval/proxy_reward"] == pytest.approx(r["eval/gold_reward"], abs=1e-5) for r in rows)
    assert rows[-1]["eval/kl"] > 0.01  # the policy moved away from the fixed reference
    logged = {int(r["step"]): r for r in csv_rows(ppo_runs["with"]) if r.get("eval/gold_reward")}
    assert sorted(logged) == [0, 4, 6, 8]
    for row in rows:
        assert {k: float(logged[row["step"]][k]) for k in EVAL_KEYS} == {k: row[k] for k in EVAL_KEYS}


def test_training_is_bit_identical_with_and_without_gold_eval(ppo_runs):
    a, b = (load_file(ppo_runs[k] / "model" / "model.safetensors") for k in ("with", "without"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with_eval, plain = training_rows(ppo_runs["with"]), training_rows(ppo_runs["without"])
    assert len(plain) == 4 and with_eval == plain
    assert not (ppo_runs["without"] / GOLD_EVAL_FILE).exists()


def sft_args(policy: Path, run_dir: Path, max_steps: int, *extra: str) -> list:
    """SFT (no reference: KL is measured against a frozen copy of the initial policy), GoldEval every 2 steps
    with its own proxy reward plugin, added with ``--trainer.callbacks+=``."""
    callback = gold_eval(every=2, reward=GOLD)
    return ["fit", "--config", ROOT / "recipes" / "sft.yaml", *TINY_MODEL, *QUIET,
            f"--model.policy.name_or_path={policy}", "--data.init_args.task.init_args.num_train_prompts=48",
            "--data.init_args.batch_size=8", "--data.init_args.val_fraction=0", "--trainer.limit_val_batches=0",
            f"--trainer.max_steps={max_steps}", f"--trainer.callbacks+={json.dumps(callback)}",
            "--run_dir", run_dir, *extra]


def test_resumed_run_trims_the_trajectory_and_continues_it(sft_run, tmp_path):
    policy = sft_run / "model"
    run_cli(sft_args(policy, tmp_path / "full", 6))
    full = read_trajectory(tmp_path / "full")
    assert [r["step"] for r in full] == [0, 2, 4, 6]
    assert abs(full[0]["eval/kl"]) < 1e-4 and full[0]["eval/win_rate"] == 0.5 and full[-1]["eval/kl"] > 0.01
    assert all(r["eval/proxy_reward"] == pytest.approx(r["eval/gold_reward"], abs=1e-5) for r in full)

    # A run stopped after its step-4 checkpoint, having evaluated a later step (5) before it was killed
    run = tmp_path / "killed"
    run_cli(sft_args(policy, run, 4, "--checkpoint_every=2"))
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    shutil.rmtree(run / "model")
    (run / "metrics.json").unlink()
    with (run / GOLD_EVAL_FILE).open("a") as f:
        f.write(json.dumps({"step": 5, "eval/gold_reward": 99.0}) + "\n")
    run_cli(sft_args(policy, run, 6, "--checkpoint_every=2", "--resume", "true", "--resume_with_changes", "true"))

    resumed = read_trajectory(run)
    assert [r["step"] for r in resumed] == [0, 2, 4, 6]  # 5 dropped, 4 not repeated
    # the same numbers as the run that never stopped: same policy, same frozen initial policy as reference
    assert without_time(resumed) == without_time(full)
    logged = [int(r["step"]) for r in csv_rows(run) if r.get("eval/gold_reward")]
    assert logged == [0, 2, 4, 6]


def test_read_trajectory_names_the_file_and_line_of_a_bad_line(tmp_path):
    path = tmp_path / GOLD_EVAL_FILE
    path.write_text('{"step": 0, "eval/kl": 0.0}\n\n{"step": 2, "eval/kl"\n')
    with pytest.raises(ValueError) as info:
        read_trajectory(tmp_path)
    message = str(info.value)
    assert str(path) in message and "line 3" in message and "\n" not in message
    path.write_text('{"step": 0}\n{"kl": 1.0}\n')
    with pytest.raises(ValueError, match="line 2: not a gold evaluation record"):
        read_trajectory(tmp_path)
    with pytest.raises(FileNotFoundError, match="GoldEval"):
        read_trajectory(tmp_path / "nothing")


def test_keep_trajectory_drops_later_steps_and_a_cut_last_line(tmp_path):
    path = tmp_path / GOLD_EVAL_FILE
    lines = [json.dumps({"step": s, "eval/kl": float(s)}) + "\n" for s in (0, 2, 4, 6)]
    path.write_text("".join(lines) + '{"step": 8, "eval/k')
    keep_trajectory(path, 4)
    assert path.read_text() == "".join(lines[:3])
    keep_trajectory(path, 4)  # nothing to drop: unchanged
    assert [r["step"] for r in read_trajectory(tmp_path)] == [0, 2, 4]
    assert [p.name for p in tmp_path.iterdir()] == [GOLD_EVAL_FILE]  # no temporary file left


def test_gold_eval_refuses_bad_settings():
    for bad in ({"every": 0}, {"num_prompts": 0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GoldEval(SentimentTask(num_train_prompts=8, num_eval_prompts=8), **bad)


# ---------------------------------------------------------------------------------------------- best of n


def test_best_of_n_means_picks_the_proxy_best_among_the_first_n():
    # two prompts, N = 4 samples each: prompt 0 owns entries 0-3, prompt 1 entries 4-7
    proxy = [1.0, 3.0, 2.0, 0.0, 5.0, 1.0, 1.0, 9.0]
    gold = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0]
    curve = best_of_n_means(proxy, gold, 4, [1, 2, 3, 4])
    # n=1: the first samples, (10 + 50)/2 = 30
    # n=2: prompt 0 picks proxy 3 (gold 20), prompt 1 proxy 5 (gold 50): 35; n=3: the same picks: 35
    # n=4: prompt 0 still 20, prompt 1 picks proxy 9 (gold 80): (20 + 80)/2 = 50
    assert curve == {1: 30.0, 2: 35.0, 3: 35.0, 4: 50.0}
    # a tie goes to the first sample: proxy 2 = 2 -> gold 1
    assert best_of_n_means([2.0, 2.0, 0.0], [1.0, 7.0, 9.0], 3, [2, 3]) == {2: 1.0, 3: 1.0}
    for args in (([1.0, 2.0], [1.0, 2.0], 2, [3]), ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], 2, [1]),
                 ([1.0], [1.0], 1, [])):
        with pytest.raises(ValueError):
            best_of_n_means(*args)


class WordCount(Reward):
    """A proxy that is not the gold reward: the number of words."""

    def score(self, prompts, responses, rollout):
        return RewardOutput(self.reward_name, torch.tensor([float(len(r.split())) for r in responses]))


def test_best_of_n_curve_on_the_tiny_model(sft_run):
    model, tokenizer = load_model(ModelConfig(name_or_path=str(sft_run / "model")), "causal_lm")
    task = SentimentTask(num_train_prompts=8, num_eval_prompts=8)
    prompts, sampling, reward = task.eval_prompts(), SamplingConfig(max_new_tokens=12), WordCount()
    curve = best_of_n_curve(model, tokenizer, prompts, task, reward, [1, 2, 4], sampling, batch_size=16, seed=3)
    assert list(curve) == [1, 2, 4]
    # by hand: the same 4 samples per prompt (prompts repeated in a row, the same seed and batches)
    repeated = [p for p in prompts for _ in range(4)]
    responses = [r for ro in sample_responses(model, tokenizer, repeated, sampling, 16, 3) for r in ro.responses]
    gold = task.gold_rewards(repeated, responses)
    proxy = [float(len(r.split())) for r in responses]
    assert curve[1] == pytest.approx(sum(gold[::4]) / len(prompts))  # n = 1: the mean gold of the first samples
    assert curve[4] == pytest.approx(sum(best_of_n_pick(proxy, gold, 4)) / len(prompts))
    assert len(set(responses)) > len(prompts)  # the samples of a prompt differ: the picks mean something


def test_one_step_axis_in_metrics_csv_completions_gold_eval_and_checkpoints(ppo_runs):
    """#21: the same update has the same step everywhere. PPO makes 2 optimiser steps a batch: metrics.csv's training
    rows used to count batches (0, 1, 2, 3) while completions.jsonl and gold_eval.jsonl counted updates (2, 4, ...)."""
    run = ppo_runs["with"]
    train_steps = [int(r["step"]) for r in csv_rows(run) if r.get("train/loss")]
    assert train_steps == [2, 4, 6, 8]
    with (run / "completions.jsonl").open() as f:
        completion_steps = sorted({json.loads(line)["step"] for line in f})
    assert completion_steps == train_steps
    assert {r["step"] for r in read_trajectory(run)} - {0} <= set(train_steps)
    assert json.loads((run / "metrics.json").read_text())["global_step"] == train_steps[-1]


def test_the_last_step_reaches_metrics_csv_whatever_log_every_n_steps(sft_run, tmp_path):
    """Lightning writes training rows every ``log_every_n_steps`` batches: a 4-step SFT run logged every 3 had a row
    at step 3 only, and a run shorter than the interval had no training row at all. The last step is written too,
    under automatic (SFT, ended by its epochs) and manual optimisation (PPO: 2 optimiser steps a batch, ended by
    max_steps)."""
    from conftest import SFT_RECIPE, TINY_MODEL

    run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--trainer.max_steps=5",
             "--trainer.log_every_n_steps=3", "--data.init_args.task.init_args.num_train_prompts=20",
             "--run_dir", tmp_path / "sft"])
    last = json.loads((tmp_path / "sft" / "metrics.json").read_text())["global_step"]
    assert last == 4  # the recipe's epochs end it first (20 prompts: 2 batches an epoch), the last batch of the last
    assert [int(r["step"]) for r in csv_rows(tmp_path / "sft") if r.get("train/loss")] == [3, 4]
    run_cli([*ppo_args(sft_run / "model"), "--trainer.log_every_n_steps=3", "--run_dir", tmp_path / "ppo"])
    rows = [r for r in csv_rows(tmp_path / "ppo") if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [6, 8]
    final = json.loads((tmp_path / "ppo" / "metrics.json").read_text())["final"]
    assert float(rows[-1]["train/loss"]) == pytest.approx(final["train/loss"])
