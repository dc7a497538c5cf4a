"""DPO-family losses against hand-computed values.

Shared example (β = 0.5), three pairs with log-ratios chosen/rejected and margin h:
    pair 0: π_c=-1.0 ref_c=-1.5 → +0.5;  π_r=-2.0 ref_r=-1.5 → -0.5;  h = +1,  βh = +0.5
    pair 1: π_c=-3.0 ref_c=-2.0 → -1.0;  π_r=-1.0 ref_r=-2.0 → +1.0;  h = -2,  βh = -1.0
    pair 2: π_c=-2.0 ref_c=-2.0 →  0.0;  π_r=-4.0 ref_r=-4.0 →  0.0;  h =  0,  βh =  0.0
Useful values: -log σ(0.5) = 0.474077, -log σ(-0.5) = 0.974077 (= 0.474077 + 0.5),
               -log σ(-1)  = 1.313262, -log σ(1)    = 0.313262 (= 1.313262 - 1), log 2 = 0.693147.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit_plugins.dpo.losses import (
    DPOLossTerms,
    cdpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    robust_loss,
    sequence_logps,
    sigmoid_loss,
)

BETA = 0.5
LOG2 = math.log(2.0)


def _logps(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    policy_chosen = torch.tensor([-1.0, -3.0, -2.0], requires_grad=requires_grad)
    policy_rejected = torch.tensor([-2.0, -1.0, -4.0], requires_grad=requires_grad)
    reference_chosen = torch.tensor([-1.5, -2.0, -2.0])
    reference_rejected = torch.tensor([-1.5, -2.0, -4.0])
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


def test_sigmoid_loss_hand_values():
    out = sigmoid_loss(*_logps(), beta=BETA)
    assert isinstance(out, DPOLossTerms)
    # -log σ(βh): βh = 0.5 → 0.474077; βh = -1 → 1.313262; βh = 0 → log 2 = 0.693147
    assert_close(out.losses, torch.tensor([0.474077, 1.313262, 0.693147]))


def test_ipo_loss_hand_values():
    out = ipo_loss(*_logps(), beta=BETA)
    # target 1/(2β) = 1: (1 - 1)² = 0; (-2 - 1)² = 9; (0 - 1)² = 1
    assert_close(out.losses, torch.tensor([0.0, 9.0, 1.0]))


def test_cdpo_loss_hand_values():
    out = cdpo_loss(*_logps(), beta=BETA, label_smoothing=0.1)
    # 0.9·(-log σ(βh)) + 0.1·(-log σ(-βh))
    # pair 0: 0.9·0.474077 + 0.1·0.974077 = 0.426669 + 0.097408 = 0.524077
    # pair 1: 0.9·1.313262 + 0.1·0.313262 = 1.181936 + 0.031326 = 1.213262
    # pair 2: 0.9·log2 + 0.1·log2 = 0.693147
    assert_close(out.losses, torch.tensor([0.524077, 1.213262, 0.693147]))


def test_robust_loss_hand_values():
    out = robust_loss(*_logps(), beta=BETA, label_smoothing=0.1)
    # [0.9·(-log σ(βh)) - 0.1·(-log σ(-βh))] / (1 - 0.2)
    # pair 0: (0.426669 - 0.097408) / 0.8 = 0.329261 / 0.8 = 0.411577
    # pair 1: (1.181936 - 0.031326) / 0.8 = 1.150610 / 0.8 = 1.438262
    # pair 2: (0.9·log2 - 0.1·log2) / 0.8 = log2 = 0.693147
    assert_close(out.losses, torch.tensor([0.411577, 1.438262, 0.693147]))


def test_hinge_loss_hand_values():
    out = hinge_loss(*_logps(), beta=BETA)
    # relu(1 - βh): relu(1 - 0.5) = 0.5; relu(1 + 1) = 2; relu(1 - 0) = 1
    assert_close(out.losses, torch.tensor([0.5, 2.0, 1.0]))


@pytest.mark.parametrize("variant", ["sigmoid", "ipo", "cdpo", "robust", "hinge"])
def test_rewards_are_beta_times_log_ratios(variant):
    smoothing = 0.1 if variant in ("cdpo", "robust") else 0.0
    out = dpo_loss(variant, *_logps(), beta=BETA, label_smoothing=smoothing)
    # β·(π_c - ref_c) = 0.5·[0.5, -1, 0]; β·(π_r - ref_r) = 0.5·[-0.5, 1, 0]
    assert_close(out.chosen_rewards, torch.tensor([0.25, -0.5, 0.0]))
    assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.5, 0.0]))


def test_equal_logps_give_reference_values():
    # every log-ratio is 0, so h = 0 for both pairs
    logps = torch.tensor([-3.0, -7.0])
    args = (logps, logps, logps, logps)
    beta = 0.25
    expected = {
        "sigmoid": LOG2,  # -log σ(0) = log 2
        "ipo": 4.0,  # (0 - 1/(2·0.25))² = (-2)² = 4 = (1/(2β))²
        "hinge": 1.0,  # relu(1 - 0) = 1
        "cdpo": LOG2,  # 0.8·log2 + 0.2·log2
        "robust": LOG2,  # (0.8·log2 - 0.2·log2) / 0.6 = log2
    }
    for variant, value in expected.items():
        smoothing = 0.2 if variant in ("cdpo", "robust") else 0.0
        out = dpo_loss(variant, *args, beta=beta, label_smoothing=smoothing)
        assert_close(out.losses, torch.full((2,), value), msg=variant)


def test_sigmoid_small_beta_limit():
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _logps(requires_grad=True)
    beta = 1e-6
    out = sigmoid_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=beta)
    # -log σ(βh) = log 2 - βh/2 + O(β²h²); |βh| ≤ 2e-6 here
    assert_close(out.losses, torch.full((3,), LOG2), atol=1e-5, rtol=0)
    out.losses.sum().backward()
    # ∂L/∂h = -β σ(-βh) → -β/2 = -5e-7; h rises with π_c and falls with π_r
    assert_close(policy_chosen.grad, torch.full((3,), -beta / 2), rtol=1e-4, atol=0)
    assert_close(policy_rejected.grad, torch.full((3,), beta / 2), rtol=1e-4, atol=0)


def test_cdpo_and_robust_with_zero_smoothing_equal_sigmoid():
    expected = sigmoid_loss(*_logps(), beta=BETA).losses
    assert_close(cdpo_loss(*_logps(), beta=BETA, label_smoothing=0.0).losses, expected)
    assert_close(robust_loss(*_logps(), beta=BETA, label_smoothing=0.0).losses, expected)


def test_gradients_reach_policy_but_not_rewards():
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = _logps(requires_grad=True)
    out = sigmoid_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=BETA)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    # ∂L/∂π_c = -β σ(-βh): -0.5·σ(-0.5) = -0.5·0.377541 = -0.188771
    #                      -0.5·σ(1)    = -0.5·0.731059 = -0.365529
    #                      -0.5·σ(0)    = -0.25
    assert_close(policy_chosen.grad, torch.tensor([-0.188771, -0.365529, -0.25]))
    assert_close(policy_rejected.grad, -policy_chosen.grad)


def test_sigmoid_is_stable_for_large_margins():
    logps = _logps()
    out = sigmoid_loss(logps[0] * 1000, logps[1] * 1000, logps[2] * 1000, logps[3] * 1000, beta=BETA)
    # βh = ±500 or 0: -log σ(500) ≈ 0 and -log σ(-500) ≈ 500 without overflow
    assert_close(out.losses, torch.tensor([0.0, 1000.0, LOG2]))


def test_sequence_logps_sum_and_mean():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    # row 0: -2 - 3 - 4 = -9 over 3 tokens → mean -3; row 1: -0.5 - 1.5 = -2 over 2 → mean -1
    assert_close(sequence_logps(token_logps, mask, length_normalize=False), torch.tensor([-9.0, -2.0]))
    assert_close(sequence_logps(token_logps, mask, length_normalize=True), torch.tensor([-3.0, -1.0]))
    # a bool mask works the same; an empty row gives 0
    empty = torch.zeros(1, 4, dtype=torch.bool)
    assert_close(sequence_logps(token_logps[:1], empty, length_normalize=True), torch.tensor([0.0]))
    assert_close(sequence_logps(token_logps, mask.bool(), length_normalize=False), torch.tensor([-9.0, -2.0]))


def test_invalid_arguments_raise():
    logps = _logps()
    with pytest.raises(ValueError, match="unknown DPO variant 'kto'.*sigmoid, ipo, cdpo, robust, hinge"):
        dpo_loss("kto", *logps, beta=BETA)
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        robust_loss(*logps, beta=BETA, label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing=-0.1"):
        cdpo_loss(*logps, beta=BETA, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.1 is only used"):
        dpo_loss("sigmoid", *logps, beta=BETA, label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta=0.0"):
        ipo_loss(*logps, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        sigmoid_loss(logps[0], logps[1][:2], logps[2], logps[3], beta=BETA)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4), length_normalize=False)
