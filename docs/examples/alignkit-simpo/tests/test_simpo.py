"""The SimPO loss on hand-computed values (no model needed)."""

import math

import pytest
import torch
from alignkit_simpo import SimPO, simpo_loss


def test_simpo_loss_by_hand():
    # β = 2, γ = 1: pair 1: 2·(−1) − 2·(−2) − 1 = 1  -> −log σ(1) = log(1 + e^−1) ≈ 0.3133
    #               pair 2: 2·(−2) − 2·(−1) − 1 = −3 -> −log σ(−3) = log(1 + e^3) ≈ 3.0486
    losses, chosen, rejected = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(losses, torch.tensor([math.log(1 + math.exp(-1)), math.log(1 + math.exp(3))]))
    torch.testing.assert_close(chosen, torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(rejected, torch.tensor([-4.0, -2.0]))


def test_margin_equal_to_gamma_costs_log_two():
    losses, *_ = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.0]), beta=2.0, gamma=1.0)  # 2·0.5 − 1 = 0
    torch.testing.assert_close(losses, torch.tensor([math.log(2.0)]))


def test_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    simpo_loss(chosen, rejected, beta=2.0, gamma=0.0)[0].sum().backward()
    # d/dc −log σ(β(c − r)) = −β·σ(−β(c − r)) = −2·½ = −1 at c = r
    assert float(chosen.grad) == pytest.approx(-1.0) and float(rejected.grad) == pytest.approx(1.0)


def test_declares_a_reference_free_preference_algorithm():
    assert SimPO.data_kind == "preference" and SimPO.needs_reference is False and SimPO.online is False
    with pytest.raises(ValueError, match="beta"):
        SimPO(beta=0.0)
