"""The RLOO/GRPO math on hand-computed values, and the k handed to the host (no model needed)."""

import pytest
import torch
from alignkit_rloo import RLOO, clipped_pg_loss, grpo_advantages, rloo_advantages

# two prompts, k = 3 samples each
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # prompt 1: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5
    # prompt 2: 0 − (0+4)/2 = −2 (twice), 4 − (0+0)/2 = 4
    expected = torch.tensor([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0])
    torch.testing.assert_close(rloo_advantages(REWARDS, 3), expected)


def test_grpo_normalises_by_the_group_std():
    # prompt 1: mean 2, sample std 1 -> (−1, 0, 1)
    # prompt 2: mean 4/3, sample variance ((4/3)² + (4/3)² + (8/3)²)/2 = 16/3 -> (−1/√3, −1/√3, 2/√3)
    s = 3 ** 0.5
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / s, -1 / s, 2 / s])
    torch.testing.assert_close(grpo_advantages(REWARDS, 3), expected, rtol=1e-5, atol=1e-5)


def test_equal_rewards_give_zero_advantage():
    assert torch.equal(rloo_advantages(torch.ones(4), 2), torch.zeros(4))
    assert torch.equal(grpo_advantages(torch.ones(4), 2), torch.zeros(4))


def test_loss_at_ratio_one_is_minus_the_token_weighted_advantage():
    # response lengths 2 and 1 (3 tokens): L = −(2·A_1 + 1·A_2)/3 = −(2·1.5 − 3)/3 = 0
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    loss, stats = clipped_pg_loss(logprobs, logprobs.detach(), torch.tensor([1.5, -3.0]), mask, 0.2)
    torch.testing.assert_close(loss, torch.tensor(0.0))
    assert float(stats["policy/approxkl"]) == 0.0 and float(stats["policy/clipfrac"]) == 0.0
    loss.backward()  # d L / d log π_it = −m_it·A_i / Σm
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-0.5, -0.5], [1.0, 0.0]]))


def test_clipping_stops_the_gradient_beyond_one_plus_eps():
    # ratio e^0.5 ≈ 1.65 > 1.2 with a positive advantage: the clipped term is the minimum, constant in π
    logprobs = torch.tensor([[0.5]], requires_grad=True)
    loss, stats = clipped_pg_loss(logprobs, torch.zeros(1, 1), torch.tensor([2.0]), torch.ones(1, 1), 0.2)
    torch.testing.assert_close(loss, torch.tensor(-2.4))
    assert float(stats["policy/clipfrac"]) == 1.0
    loss.backward()
    assert float(logprobs.grad) == 0.0


def test_k_is_handed_to_the_host_and_must_be_at_least_two():
    # the host reads OnlineAlgorithm.samples_per_prompt and repeats each prompt k times before the rollout
    assert RLOO(samples_per_prompt=3).samples_per_prompt == 3
    assert RLOO().samples_per_prompt == 4
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2"):
        RLOO(samples_per_prompt=1)
