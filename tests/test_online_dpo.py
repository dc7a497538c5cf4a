"""Online DPO (alignkit_plugins.online_dpo): pair construction from judge scores (ties, identical responses), the
masked DPO loss by hand, and the recipe end to end on the session SFT model with both judges."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import QUIET, RECIPES, run_cli

from alignkit_plugins.online_dpo import OnlineDPO
from alignkit_plugins.online_dpo.losses import build_pairs, identical_responses, judge_by_scores, online_dpo_loss


def test_judge_by_scores_prefers_the_higher_score_and_finds_ties():
    # pairs (a, b): (1, 0) a wins; (0, 2) b wins; (3, 3) tie; (0.5, 0.45) a wins by 0.05
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 3.0, 3.0, 0.5, 0.45])
    a_wins, ties = judge_by_scores(scores)
    assert a_wins.tolist() == [True, False, False, True]
    assert ties.tolist() == [False, False, True, False]
    a_wins, ties = judge_by_scores(scores, tie_margin=0.1)  # |0.05| <= 0.1: the last pair is a tie too
    assert a_wins.tolist() == [True, False, False, False]
    assert ties.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match=r"\(2N,\)"):
        judge_by_scores(torch.zeros(3))


def test_identical_responses_compare_real_tokens_only():
    ids = torch.tensor([[5, 6, 0, 0], [5, 6, 9, 9],    # same tokens, different padding -> identical
                        [5, 6, 7, 0], [5, 6, 0, 0],    # one is a prefix of the other -> different
                        [1, 2, 3, 4], [1, 2, 3, 5]])   # last token differs -> different
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert identical_responses(ids, mask).tolist() == [True, False, False]


def test_build_pairs_orders_rows_and_drops_ties_and_identical_pairs():
    a_wins = torch.tensor([True, False, False, True])
    ties = torch.tensor([False, False, True, True])
    identical = torch.tensor([False, False, False, True])  # identical and tied: counted as identical only
    pairs = build_pairs(a_wins, ties, identical)
    assert pairs.chosen.tolist() == [0, 3, 5, 6]    # pair i is rows 2i (a) and 2i + 1 (b)
    assert pairs.rejected.tolist() == [1, 2, 4, 7]
    assert pairs.keep.tolist() == [True, True, False, False]
    assert pairs.ties.tolist() == [False, False, True, False]
    assert pairs.identical.tolist() == [False, False, False, True]


def test_online_dpo_loss_by_hand_averages_over_kept_pairs_only():
    policy_chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0, -1.0], requires_grad=True)
    reference = torch.tensor([-1.5, -1.5])
    keep = torch.tensor([True, False])
    out = online_dpo_loss("sigmoid", policy_chosen, policy_rejected, reference, reference, keep, beta=0.5)
    # pair 0: h = (-1 + 1.5) - (-2 + 1.5) = 1; loss = -log σ(0.5 · 1) = log(1 + e^-0.5) = 0.474077
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)
    assert out.units.item() == 1.0
    # implicit rewards β·(log π − log π_ref): chosen 0.5·0.5 = 0.25, rejected 0.5·(-0.5) = -0.25
    assert out.terms.chosen_rewards[0].item() == pytest.approx(0.25)
    assert out.terms.rejected_rewards[0].item() == pytest.approx(-0.25)
    out.loss.backward()
    # d/dh −log σ(βh) = −β σ(−βh) = −0.5 · σ(−0.5) = −0.5 · 0.377541 = −0.188771; the dropped pair gets nothing
    assert policy_chosen.grad.tolist() == pytest.approx([-0.5 * (1 / (1 + math.exp(0.5))), 0.0], abs=1e-6)
    assert policy_rejected.grad.tolist() == pytest.approx([0.5 * (1 / (1 + math.exp(0.5))), 0.0], abs=1e-6)
    # IPO with β = 0.25: (h − 1/(2β))² = (1 − 2)² = 1
    ipo = online_dpo_loss("ipo", policy_chosen, policy_rejected, reference, reference, keep, beta=0.25)
    assert ipo.loss.item() == pytest.approx(1.0)
    # nothing kept: loss 0, units 0 (an empty micro-batch adds nothing to the step's mean)
    none = online_dpo_loss("sigmoid", policy_chosen, policy_rejected, reference, reference, torch.zeros(2), beta=0.5)
    assert none.loss.item() == 0.0 and none.units.item() == 0.0


def test_online_dpo_rejects_bad_settings():
    with pytest.raises(ValueError, match="judge"):
        OnlineDPO(judge="oracle")
    with pytest.raises(ValueError, match="beta"):
        OnlineDPO(beta=0.0)
    assert OnlineDPO().samples_per_prompt == 2
    assert OnlineDPO(loss_type="ipo").length_normalize is True


def _rows(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


FAST = ["--data.init_args.task.init_args.num_train_prompts=64", "--data.init_args.batch_size=8",
        "--model.algorithm.init_args.sampling.max_new_tokens=12", "--trainer.max_steps=3",
        "--model.optimizer.warmup_steps=0"]


@pytest.mark.parametrize("judge", ["annotator", "rewards"])
def test_online_dpo_recipe_runs_end_to_end(sft_run, tmp_path, judge):
    run_dir = tmp_path / judge
    run_cli(["fit", "--config", RECIPES / "online_dpo.yaml", *QUIET, *FAST,
             f"--model.policy.name_or_path={sft_run / 'model'}", f"--model.algorithm.init_args.judge={judge}",
             "--run_dir", run_dir])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["algorithm"] == "OnlineDPO" and metrics["global_step"] == 3
    assert (run_dir / "model" / "config.json").is_file()
    rows = [r for r in _rows(run_dir) if r.get("judge/pairs")]
    assert len(rows) == 3
    for row in rows:
        pairs, kept = float(row["judge/pairs"]), float(row["judge/kept"])
        assert pairs == 8  # batch_size prompts, two samples each
        assert kept + float(row["judge/ties"]) + float(row["judge/identical"]) == pairs
        assert math.isfinite(float(row["rewards/margins"])) and math.isfinite(float(row["objective/kl"]))
    assert any(r.get("judge/gold_agreement") for r in rows)  # the data module's task measures the judge
