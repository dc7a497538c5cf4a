"""Hand-computed checks of the PPO math in ``alignkit_plugins.ppo.math``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit_plugins.ppo.math import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    gae,
    kl_penalty,
    place_scores,
    policy_loss,
    score_positions,
    shaped_rewards,
    value_loss,
    whiten_advantages,
)

# --------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------

# token 0: logp = −1, ref = −2  → k1 = 1,  log r = −1
# token 1: logp = −2, ref = −1  → k1 = −1, log r = 1
# token 2: logp = ref = −0.5    → k1 = 0,  log r = 0
LOGP = torch.tensor([[-1.0, -2.0, -0.5]])
REF = torch.tensor([[-2.0, -1.0, -0.5]])


def test_kl_k1():
    assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))


def test_kl_k3():
    # k3 = (r − 1) − log r
    # token 0: r = e^{−1} = 0.367879 → (0.367879 − 1) + 1 = 0.367879
    # token 1: r = e       = 2.718282 → (2.718282 − 1) − 1 = 0.718282
    # token 2: r = 1                 → 0
    expected = torch.tensor([[math.exp(-1.0), math.e - 2.0, 0.0]])
    assert_close(kl_penalty(LOGP, REF, "k3"), expected)


def test_kl_abs_and_mse():
    # abs = |k1| = [1, 1, 0];  mse = ½ k1² = [½·1, ½·1, 0]
    assert_close(kl_penalty(LOGP, REF, "abs"), torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(kl_penalty(LOGP, REF, "mse"), torch.tensor([[0.5, 0.5, 0.0]]))


def test_kl_k3_is_nonnegative():
    generator = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 8, generator=generator) * 3, torch.randn(4, 8, generator=generator) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_kl_unknown_estimator_lists_options():
    with pytest.raises(ValueError) as info:
        kl_penalty(LOGP, REF, "k2")  # type: ignore[arg-type]
    for name in KL_ESTIMATORS:
        assert name in str(info.value)


# --------------------------------------------------------------------------------------------------
# Score placement and shaped rewards
# --------------------------------------------------------------------------------------------------

# response lengths 3, 1, 4 and 0 (empty) in R = 4
MASK = torch.tensor([
    [1, 1, 1, 0],
    [1, 0, 0, 0],
    [1, 1, 1, 1],
    [0, 0, 0, 0],
])


def test_score_positions_last_real_token():
    # last real token = length − 1 → [2, 0, 3]; the empty row falls back to 0
    assert_close(score_positions(MASK), torch.tensor([2, 0, 3, 0]))
    assert_close(score_positions(MASK.bool()), torch.tensor([2, 0, 3, 0]))


def test_place_scores():
    scores = torch.tensor([1.5, -2.0, 0.5, 9.0])
    expected = torch.tensor([
        [0.0, 0.0, 1.5, 0.0],
        [-2.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.5],
        [9.0, 0.0, 0.0, 0.0],  # empty row: index 0, for the caller to mask
    ])
    assert_close(place_scores(scores, MASK), expected)


def test_shaped_rewards():
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, -7.0]])
    ref = torch.tensor([[-2.0, -1.0, -0.5], [-1.5, -1.0, -3.0]])
    # k1 = logp − ref = [[1, 0, −0.5], [0.5, −1, (pad) −4]] → masked [[1, 0, −0.5], [0.5, −1, 0]]
    # β = 0.1, scores = [2, −1] on tokens 2 and 1:
    # row 0: [−0.1·1, −0.1·0, −0.1·(−0.5) + 2] = [−0.1, 0, 2.05]
    # row 1: [−0.1·0.5, −0.1·(−1) − 1, 0]       = [−0.05, −0.9, 0]
    rewards, kl = shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, kl_coef=0.1, estimator="k1")
    assert_close(kl, torch.tensor([[1.0, 0.0, -0.5], [0.5, -1.0, 0.0]]))
    assert_close(rewards, torch.tensor([[-0.1, 0.0, 2.05], [-0.05, -0.9, 0.0]]))


def test_shaped_rewards_empty_response_gets_nothing():
    mask = torch.tensor([[0, 0]])
    rewards, kl = shaped_rewards(torch.tensor([3.0]), torch.tensor([[-1.0, -1.0]]),
                                 torch.tensor([[-2.0, -2.0]]), mask, kl_coef=0.1, estimator="k3")
    assert_close(rewards, torch.zeros(1, 2))
    assert_close(kl, torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------------
# GAE and whitening
# --------------------------------------------------------------------------------------------------


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [2.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # With γ = λ = 1 the δ's telescope: A_t = Σ_{k≥t} r_k − V_t (V after the end = 0).
    # row 0: reward-to-go [6, 5, 3]; A = [6 − 0.5, 5 − 1, 3 − 1.5] = [5.5, 4, 1.5]
    # row 1: reward-to-go [1.5, 1, pad]; A = [1.5 − 2, 1 − (−1), 0] = [−0.5, 2, 0]
    # returns = A + V = reward-to-go, 0 on padding
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, torch.tensor([[5.5, 4.0, 1.5], [-0.5, 2.0, 0.0]]))
    assert_close(returns, torch.tensor([[6.0, 5.0, 3.0], [1.5, 1.0, 0.0]]))


def test_gae_by_hand():
    # γ = 0.9, λ = 0.8, γλ = 0.72
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 7.0]])  # 7 sits on padding
    values = torch.tensor([[0.5, 1.0, 1.5], [0.2, 0.4, 10.0]])  # 10 sits on padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0:
    #   t=2: δ = 2 + 0.9·0 − 1.5 = 0.5;            A = 0.5
    #   t=1: δ = 0 + 0.9·1.5 − 1.0 = 0.35;         A = 0.35 + 0.72·0.5 = 0.71
    #   t=0: δ = 1 + 0.9·1.0 − 0.5 = 1.4;          A = 1.4 + 0.72·0.71 = 1.9112
    #   returns = A + V = [2.4112, 1.71, 2.0]
    # row 1 (length 2; the padded V = 10 and r = 7 must not leak):
    #   t=2: padding → A = 0
    #   t=1: δ = −1 + 0.9·0 − 0.4 = −1.4;          A = −1.4
    #   t=0: δ = 0.5 + 0.9·0.4 − 0.2 = 0.66;       A = 0.66 + 0.72·(−1.4) = −0.348
    #   returns = [−0.348 + 0.2, −1.4 + 0.4, 0] = [−0.148, −1.0, 0]
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert_close(advantages, torch.tensor([[1.9112, 0.71, 0.5], [-0.348, -1.4, 0.0]]))
    assert_close(returns, torch.tensor([[2.4112, 1.71, 2.0], [-0.148, -1.0, 0.0]]))


def test_whiten_advantages_over_masked_entries():
    advantages = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # real entries [1, 2, 3, 4]: mean 2.5, unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3,
    # 1/std = 1/√(5/3) = 0.774597 → [−1.5, −0.5, 0.5, 1.5] · 0.774597 = [−1.161895, −0.387298, 0.387298, 1.161895]
    whitened = whiten_advantages(advantages, mask)
    assert_close(whitened, torch.tensor([[-1.161895, -0.387298, 0.387298], [1.161895, 0.0, 0.0]]))
    real = whitened[mask.bool()]
    assert_close(real.mean(), torch.tensor(0.0))
    assert_close(real.std(), torch.tensor(1.0))


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def test_policy_loss_both_branches():
    eps = 0.2
    # one row: five real tokens and one padded token (ratio 3, A = 5: must not count)
    ratio = torch.tensor([[1.1, 1.5, 0.5, 1.5, 0.5, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.full((1, 6), -1.0)
    logp = (old + ratio.log()).requires_grad_()
    # token  ρ    A    ρA     clip(ρ)·A     min    L = −min   clipped branch active?
    #  a    1.1   1    1.1    1.1·1 = 1.1   1.1    −1.1       no (inside the range)
    #  b    1.5   1    1.5    1.2·1 = 1.2   1.2    −1.2       yes
    #  c    0.5  −1   −0.5    0.8·−1 = −0.8 −0.8    0.8       yes
    #  d    1.5  −1   −1.5    1.2·−1 = −1.2 −1.5    1.5       no (pessimistic unclipped term)
    #  e    0.5   2    1.0    0.8·2 = 1.6   1.0    −1.0       no
    # loss = (−1.1 − 1.2 + 0.8 + 1.5 − 1.0) / 5 = −1.0 / 5 = −0.2;  clipfrac = 2/5 = 0.4
    terms = policy_loss(logp, old, advantages, mask, clip_range=eps)
    assert_close(terms.loss, torch.tensor(-0.2))
    assert_close(terms.clipfrac, torch.tensor(0.4))
    # ratio_mean = (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5 = 5.1 / 5 = 1.02
    assert_close(terms.ratio_mean, torch.tensor(1.02))
    # approxkl = mean of ½ (log ρ)² over the five tokens
    #   (log 1.1)² = 0.0090840, (log 1.5)² = 0.1644020 (×2), (log 0.5)² = 0.4804530 (×2)
    #   ½ · (0.0090840 + 2·0.1644020 + 2·0.4804530) / 5 = ½ · 1.2987940 / 5 = 0.1298794
    assert_close(terms.approxkl, torch.tensor(0.1298794))
    assert not (terms.clipfrac.requires_grad or terms.approxkl.requires_grad or terms.ratio_mean.requires_grad)
    # gradient: d(−ρA/5)/d logp = −ρA/5 on unclipped tokens, 0 where the clipped branch is active
    #   a: −1.1/5 = −0.22; b, c: 0; d: 1.5/5 = 0.3; e: −1.0/5 = −0.2; padding: 0
    terms.loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.22, 0.0, 0.0, 0.3, -0.2, 0.0]]))


def test_value_loss_both_branches():
    eps_v = 0.2
    values = torch.tensor([[1.0, 2.0, 2.0, 0.0, 0.0, 100.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.5, 0.0, 3.0, 0.5, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    # token  V   V_old  R     V_clip         (V−R)²   (V_clip−R)²   max    clipped larger?
    #  a    1.0  1.0   1.5    1.0            0.25     0.25          0.25   no (equal)
    #  b    2.0  1.0   0.0    1.0+0.2 = 1.2  4.0      1.44          4.0    no
    #  c    2.0  1.0   3.0    1.2            1.0      3.24          3.24   yes
    #  d    0.0  1.0   0.5    1.0−0.2 = 0.8  0.25     0.09          0.25   no
    #  e    0.0  1.0  −1.0    0.8            1.0      3.24          3.24   yes
    # loss = ½ · (0.25 + 4 + 3.24 + 0.25 + 3.24) / 5 = ½ · 10.98 / 5 = 1.098;  clipfrac = 2/5 = 0.4
    terms = value_loss(values, old_values, returns, mask, clip_range_value=eps_v)
    assert_close(terms.loss, torch.tensor(1.098))
    assert_close(terms.clipfrac, torch.tensor(0.4))
    assert not terms.clipfrac.requires_grad
    # gradient (V − R)/5 where the unclipped error wins, 0 where the saturated clipped one wins:
    #   a: −0.5/5 = −0.1; b: 2/5 = 0.4; c: 0; d: −0.5/5 = −0.1; e: 0; padding: 0
    terms.loss.backward()
    assert_close(values.grad, torch.tensor([[-0.1, 0.4, 0.0, -0.1, 0.0, 0.0]]))


def test_entropy_bonus():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: p = [½, ½] → H = ln 2 = 0.693147
    # token 1: p = [¾, ¼] → H = −(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335
    # token 2: padding
    # mean = (0.693147 + 0.562335) / 2 = 0.627741
    assert_close(entropy_bonus(logits, mask), torch.tensor(0.627741))


# --------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_update_rule():
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10000)
    # kl 9: e = clip(9/6 − 1 = 0.5, −0.2, 0.2) = 0.2 → β = 0.1 · (1 + 0.2 · 256/10000) = 0.1 · 1.00512
    controller.update(current_kl=9.0, n_steps=256)
    assert_close(controller.value, 0.100512)
    # kl 3: e = clip(3/6 − 1 = −0.5) = −0.2 → β = 0.100512 · (1 − 0.00512) = 0.100512 · 0.99488
    controller.update(current_kl=3.0, n_steps=256)
    assert_close(controller.value, 0.100512 * 0.99488)
    # kl 6.6: e = 6.6/6 − 1 = 0.1 (inside the clip) → factor 1 + 0.1 · 256/10000 = 1.00256
    controller.update(current_kl=6.6, n_steps=256)
    assert_close(controller.value, 0.100512 * 0.99488 * 1.00256)


def test_adaptive_kl_controller_state_round_trip():
    controller = AdaptiveKLController(value=0.2, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, n_steps=512)  # 0.2 · (1 + 0.2 · 0.0512) = 0.202048
    state = controller.state_dict()
    assert all(type(v) is float for v in state.values())
    restored = AdaptiveKLController(value=0.05, target=1.0, horizon=1)
    restored.load_state_dict(state)
    assert restored == controller
    assert_close(restored.value, 0.202048)


def test_fixed_kl_controller_ignores_updates():
    controller = FixedKLController(value=0.05)
    controller.update(current_kl=100.0, n_steps=1024)
    assert controller.value == 0.05
    restored = FixedKLController(value=1.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.value == 0.05 and type(restored.state_dict()["value"]) is float
