"""GKD (alignkit_plugins.gkd): the divergences on a 3-token vocabulary by hand, their β endpoints, micro-batch
exactness of the aggregated loss, the teacher's vocabulary check, and the recipe end to end with the session SFT
model as teacher of a fresh student."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import QUIET, RECIPES, TINY_MODEL, run_cli

from alignkit import PluginError
from alignkit_plugins.gkd import GKD
from alignkit_plugins.gkd.losses import distillation_loss, forward_kl, generalized_jsd, reverse_kl

# one position, vocabulary of 3: student p_S = (0.5, 0.25, 0.25), teacher p_T = (0.8, 0.1, 0.1)
P_S, P_T = [0.5, 0.25, 0.25], [0.8, 0.1, 0.1]
STUDENT = torch.tensor(P_S).log().view(1, 1, 3)  # logits = log-probs (softmax leaves them unchanged)
TEACHER = torch.tensor(P_T).log().view(1, 1, 3)

# reverse KL(p_S ‖ p_T) = 0.5 ln(0.5/0.8) + 2 · 0.25 ln(0.25/0.1) = 0.5 ln 0.625 + 0.5 ln 2.5 = 0.5 ln 1.5625
REVERSE = 0.5 * math.log(1.5625)  # 0.223144
# forward KL(p_T ‖ p_S) = 0.8 ln(0.8/0.5) + 2 · 0.1 ln(0.1/0.25) = 0.8 ln 1.6 + 0.2 ln 0.4
FORWARD = 0.8 * math.log(1.6) + 0.2 * math.log(0.4)  # 0.192745
# JSD(0.5): M = (0.65, 0.175, 0.175)
#   KL(p_T ‖ M) = 0.8 ln(0.8/0.65) + 0.2 ln(0.1/0.175) = 0.054188
#   KL(p_S ‖ M) = 0.5 ln(0.5/0.65) + 0.5 ln(0.25/0.175) = 0.047156
#   JSD = 0.5 · 0.054188 + 0.5 · 0.047156 = 0.050672
JSD_HALF = 0.5 * (0.8 * math.log(0.8 / 0.65) + 0.2 * math.log(0.1 / 0.175)) \
    + 0.5 * (0.5 * math.log(0.5 / 0.65) + 0.5 * math.log(0.25 / 0.175))
# JSD(0.2): M = 0.2 p_T + 0.8 p_S = (0.56, 0.22, 0.22)
#   0.2 · [0.8 ln(0.8/0.56) + 0.2 ln(0.1/0.22)] + 0.8 · [0.5 ln(0.5/0.56) + 0.5 ln(0.25/0.22)]
JSD_02 = 0.2 * (0.8 * math.log(0.8 / 0.56) + 0.2 * math.log(0.1 / 0.22)) \
    + 0.8 * (0.5 * math.log(0.5 / 0.56) + 0.5 * math.log(0.25 / 0.22))


def test_divergences_on_a_three_token_vocabulary_by_hand():
    assert REVERSE == pytest.approx(0.223144, abs=1e-6) and JSD_HALF == pytest.approx(0.050672, abs=1e-6)
    assert reverse_kl(STUDENT, TEACHER).item() == pytest.approx(REVERSE, abs=1e-6)
    assert forward_kl(STUDENT, TEACHER).item() == pytest.approx(FORWARD, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, 0.5).item() == pytest.approx(JSD_HALF, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, 0.2).item() == pytest.approx(JSD_02, abs=1e-6)
    # logits are shift-invariant: +7 on the teacher's changes nothing
    assert reverse_kl(STUDENT, TEACHER + 7).item() == pytest.approx(REVERSE, abs=1e-6)


def test_jsd_endpoints_are_forward_kl_at_zero_and_reverse_kl_at_one():
    assert generalized_jsd(STUDENT, TEACHER, 0.0).item() == pytest.approx(FORWARD, abs=1e-6)
    assert generalized_jsd(STUDENT, TEACHER, 1.0).item() == pytest.approx(REVERSE, abs=1e-6)
    # and they are the limits of JSD(β)/β (β → 0) and JSD(β)/(1 − β) (β → 1)
    # (to first order in β, resp. 1 − β; the divergences compute in float32)
    small = 1e-3
    assert generalized_jsd(STUDENT, TEACHER, small).item() / small == pytest.approx(FORWARD, rel=1e-2)
    assert generalized_jsd(STUDENT, TEACHER, 1 - small).item() / small == pytest.approx(REVERSE, rel=1e-2)
    for beta in (0.0, 0.3, 1.0):  # no divergence from itself
        assert generalized_jsd(STUDENT, STUDENT, beta).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(STUDENT, TEACHER, 1.5)


def test_reverse_kl_gradient_by_hand():
    # d KL(p_S ‖ p_T) / d z_S,v = p_S,v · (log p_S,v − log p_T,v − KL)
    student = STUDENT.clone().requires_grad_(True)
    reverse_kl(student, TEACHER).sum().backward()
    expected = [p * (math.log(p) - math.log(q) - REVERSE) for p, q in zip(P_S, P_T)]
    assert student.grad.view(-1).tolist() == pytest.approx(expected, abs=1e-6)


def test_distillation_loss_masks_aggregates_and_splits_exactly():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    loss, units, per_token = distillation_loss(student, teacher, mask, beta=1.0)
    expected = reverse_kl(student, teacher)[mask.bool()]
    assert units.item() == 8 and loss.item() == pytest.approx(expected.mean().item(), abs=1e-6)
    assert (per_token[~mask.bool()] == 0).all()
    # two micro-batches weighted by their units give the mean over the whole batch (what the host computes)
    parts = [distillation_loss(student[rows], teacher[rows], mask[rows], beta=1.0) for rows in ([0], [1, 2, 3])]
    step_mean = sum(part * units for part, units, _ in parts) / sum(units for _, units, _ in parts)
    assert step_mean.item() == pytest.approx(loss.item(), abs=1e-6)
    # sequence mean of token sums: (Σ_row0 + Σ_row1 + Σ_row2 + 0) / 4 sequences
    seq, seq_units, _ = distillation_loss(student, teacher, mask, beta=1.0, aggregation="seq-mean-token-sum")
    assert seq_units.item() == 4 and seq.item() == pytest.approx(per_token.sum().item() / 4, abs=1e-6)


def test_gkd_rejects_bad_settings():
    with pytest.raises(ValueError, match="beta"):
        GKD(teacher="x", beta=-0.1)
    with pytest.raises(ValueError, match="lmbda"):
        GKD(teacher="x", lmbda=2.0)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    from alignkit import ModelConfig
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model
    from alignkit.module import AlignModule

    small = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    model, tokenizer = build_tiny_model(TinyModelConfig(**{**small.__dict__, "vocab_size": 300}))
    model.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    with pytest.raises(PluginError, match="vocabularies"):
        AlignModule(algorithm=GKD(teacher=str(tmp_path / "teacher")), policy=ModelConfig(tiny=small))


def test_gkd_recipe_runs_end_to_end(sft_run, tmp_path):
    run_dir = tmp_path / "gkd"
    run_cli(["fit", "--config", RECIPES / "gkd.yaml", *TINY_MODEL, *QUIET,
             f"--model.algorithm.init_args.teacher={sft_run / 'model'}", "--model.algorithm.init_args.lmbda=0.5",
             "--model.rewards=[]",  # GKD needs no reward (needs_rewards = False)
             "--model.algorithm.init_args.sampling.max_new_tokens=12", "--model.optimizer.warmup_steps=0",
             "--data.init_args.task.init_args.num_train_prompts=64", "--data.init_args.batch_size=8",
             "--trainer.max_steps=6", "--run_dir", run_dir])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["algorithm"] == "GKD" and metrics["global_step"] == 6
    assert (run_dir / "model" / "config.json").is_file()
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("loss/distill")]
    assert len(rows) == 6
    assert {float(r["distill/on_policy"]) for r in rows} == {0.0, 1.0}  # λ = 0.5: student and teacher samples
    for r in rows:
        assert float(r["distill/reverse_kl"]) > 0 and float(r["distill/forward_kl"]) > 0
        assert float(r["loss/distill"]) == pytest.approx(float(r["distill/reverse_kl"]), rel=1e-4)  # β = 1
