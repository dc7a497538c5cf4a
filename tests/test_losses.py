"""The SFT and Bradley–Terry losses against values computed by hand."""

import math

import pytest
import torch

from alignkit_plugins.reward_model import RewardModel, bradley_terry_loss
from alignkit_plugins.sft import SFT, sft_loss

LN3 = math.log(3.0)
NLL_HALF = 0.693147  # −log(1/2): two equal logits
NLL_3_4 = 0.287682  # −log(3/4): logits [ln 3, 0], target the first  (e^ln3 / (e^ln3 + 1) = 3/4)
NLL_1_4 = 1.386294  # −log(1/4): logits [ln 3, 0], target the second


def test_sft_loss_shifts_by_one_and_masks_prompt_and_padding():
    # Row 0: prompt token (label −100) then two response tokens, then one padding position.
    # Position t predicts labels[t + 1]:
    #   t=0 → labels[1] = 0 with logits [ln3, 0]: −log 3/4 = 0.287682
    #   t=1 → labels[2] = 1 with logits [0, 0]:   −log 1/2 = 0.693147
    #   t=2 → labels[3] = −100 (padding): not counted; t=3 has no target.
    # Row 1: a single response target at t=0 → labels[1] = 1 with logits [ln3, 0]: −log 1/4 = 1.386294.
    logits = torch.tensor([
        [[LN3, 0.0], [0.0, 0.0], [50.0, -50.0], [-50.0, 50.0]],
        [[LN3, 0.0], [7.0, -7.0], [7.0, -7.0], [7.0, -7.0]],
    ])
    labels = torch.tensor([
        [-100, 0, 1, -100],
        [-100, 1, -100, -100],
    ])
    loss, count = sft_loss(logits, labels)
    assert int(count) == 3
    # (0.287682 + 0.693147 + 1.386294) / 3 = 0.789041
    assert float(loss) == pytest.approx((NLL_3_4 + NLL_HALF + NLL_1_4) / 3, abs=1e-5)
    assert float(loss) == pytest.approx(0.789041, abs=1e-5)


def test_sft_loss_ignores_logits_at_masked_positions():
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0], [3.0, 1.0]]], requires_grad=True)
    labels = torch.tensor([[-100, 0, 1]])
    loss, count = sft_loss(logits, labels)
    # t=0 → 0 with [ln3, 0]: 0.287682; t=1 → 1 with [0, 0]: 0.693147; mean 0.490415
    assert int(count) == 2
    assert float(loss) == pytest.approx(0.490415, abs=1e-5)
    loss.backward()
    assert torch.all(logits.grad[0, 2] == 0), "the last position predicts nothing"
    # Changing the logits of a position whose target is masked leaves the loss unchanged.
    labels_masked = torch.tensor([[-100, -100, 1]])
    a, n = sft_loss(logits.detach(), labels_masked)
    b, _ = sft_loss(logits.detach().clone().index_fill_(1, torch.tensor([0]), 9.0), labels_masked)
    assert int(n) == 1 and float(a) == pytest.approx(float(b)) == pytest.approx(NLL_HALF, abs=1e-5)


def test_sft_loss_without_shift_would_differ():
    # Unshifted, position 0 would be scored on labels[0]; the shifted loss scores labels[1].
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0]])
    loss, count = sft_loss(logits, labels)
    assert int(count) == 1
    assert float(loss) == pytest.approx(NLL_1_4, abs=1e-5)  # −log p(0 | logits [0, ln3]) = −log 1/4


def test_sft_loss_label_smoothing_off_is_plain_nll_and_on_differs():
    logits = torch.tensor([[[LN3, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0]])
    off, _ = sft_loss(logits, labels, label_smoothing=0.0)
    assert float(off) == pytest.approx(NLL_3_4, abs=1e-5)
    # ε = 0.2 over V = 2: 0.9·(−log 3/4) + 0.1·(−log 1/4) = 0.258914 + 0.138629 = 0.397543
    on, _ = sft_loss(logits, labels, label_smoothing=0.2)
    assert float(on) == pytest.approx(0.397543, abs=1e-5)


def test_sft_loss_all_masked_is_zero_not_nan():
    loss, count = sft_loss(torch.zeros(1, 3, 4), torch.full((1, 3), -100))
    assert int(count) == 0 and float(loss) == 0.0


def test_sft_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        SFT(label_smoothing=1.0)


# ------------------------------------------------------------------------------------ Bradley–Terry

def test_bradley_terry_single_pair():
    # r_c − r_r = 0.5: σ(0.5) = 0.622459, −log → 0.474077
    out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.5]))
    assert float(out.loss) == pytest.approx(0.474077, abs=1e-5)
    assert float(out.accuracy) == 1.0


def test_bradley_terry_mean_over_pairs_and_accuracy():
    # diffs 0.5 and −2: 0.474077 and −log σ(−2) = log(1 + e²) = 2.126928; mean 1.300503
    out = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0]))
    assert float(out.loss) == pytest.approx(1.300503, abs=1e-5)
    assert float(out.accuracy) == 0.5  # one pair of two has r_c > r_r


def test_bradley_terry_ties_are_not_accurate():
    out = bradley_terry_loss(torch.tensor([0.3, 0.3]), torch.tensor([0.3, 0.3]))
    assert float(out.loss) == pytest.approx(NLL_HALF, abs=1e-5)  # −log σ(0)
    assert float(out.accuracy) == 0.0


def test_bradley_terry_margin():
    # margin 0.5 cancels the 0.5 gap: −log σ(0) = log 2 = 0.693147
    out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.5]), margin=torch.tensor([0.5]))
    assert float(out.loss) == pytest.approx(NLL_HALF, abs=1e-5)
    # margin −1.5: σ(2) = 0.880797, −log → 0.126928
    out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.5]), margin=torch.tensor([-1.5]))
    assert float(out.loss) == pytest.approx(0.126928, abs=1e-5)
    # The margin changes the loss, never the accuracy (which compares raw rewards).
    assert float(out.accuracy) == 1.0


def test_bradley_terry_centring_term():
    # 0.474077 + 0.01 · (1.0 + 0.5)² = 0.474077 + 0.0225 = 0.496577
    out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.5]), center_coef=0.01)
    assert float(out.loss) == pytest.approx(0.496577, abs=1e-5)
    # two pairs: 1.300503 + 0.1 · mean(1.5², 2.0²) = 1.300503 + 0.1 · 3.125 = 1.613003
    out = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 2.0]), center_coef=0.1)
    assert float(out.loss) == pytest.approx(1.613003, abs=1e-5)


def test_bradley_terry_margin_and_centring_together():
    # diff 1 − 0.5 − 0.5 = 0 → 0.693147; centring 0.01 · 1.5² = 0.0225 → 0.715647
    out = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.5]), margin=torch.tensor([0.5]), center_coef=0.01)
    assert float(out.loss) == pytest.approx(0.715647, abs=1e-5)


def test_bradley_terry_gradient_pushes_rewards_apart():
    chosen = torch.tensor([1.0], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    bradley_terry_loss(chosen, rejected).loss.backward()
    # d/dr_c −log σ(d) = −(1 − σ(d)) = −0.377541; d/dr_r = +0.377541
    assert float(chosen.grad) == pytest.approx(-0.377541, abs=1e-5)
    assert float(rejected.grad) == pytest.approx(0.377541, abs=1e-5)
    assert not out_requires_grad_accuracy(chosen, rejected)


def out_requires_grad_accuracy(chosen, rejected) -> bool:
    return bradley_terry_loss(chosen, rejected).accuracy.requires_grad


def test_reward_model_declares_its_head_and_data():
    assert RewardModel.model_head == "sequence_classification"
    assert RewardModel.data_kind == "preference"
    assert SFT.model_head == "causal_lm" and SFT.data_kind == "sft"


def test_bradley_terry_with_soft_labels():
    from alignkit_plugins.reward_model import bradley_terry_loss

    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    # d = [0.5, 0]; p = [0.8, 0.5]
    # pair 1: −0.8·log σ(0.5) − 0.2·log σ(−0.5) = 0.8·0.474077 + 0.2·0.974077 = 0.379262 + 0.194815 = 0.574077
    # pair 2: −0.5·log σ(0) − 0.5·log σ(0) = log 2 = 0.693147;  mean = 0.633612
    terms = bradley_terry_loss(chosen, rejected, soft_label=torch.tensor([0.8, 0.5]))
    torch.testing.assert_close(terms.loss, torch.tensor(0.633612), atol=1e-5, rtol=0)
    # p = 1 is the hard-label loss
    hard = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, soft_label=torch.ones(2)).loss, hard.loss)
