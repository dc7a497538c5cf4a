"""Advantage estimators of the critic-free policy-gradient family, as pure functions on tensors.

Every estimator turns rewards into advantages without a value model; the baseline comes from the other samples of
the same prompt (GRPO, Dr. GRPO, RLOO), from the whole batch (REINFORCE++) or from the greedy response (ReMax).

Shapes: ``N`` responses, ``R`` response length, ``k`` samples per prompt. Group estimators read ``(N,)`` rewards laid
out as ``N / k`` consecutive groups: rows ``i·k … i·k + k − 1`` are the samples of prompt ``i`` (the host's
``PromptBatch.repeat_interleave``). ``mask`` ``(N, R)`` is 1 on real response tokens (right padded). Sequence-level
estimators return ``(N,)`` (one advantage for every token of a response, see :func:`broadcast`); token-level ones
return ``(N, R)``, 0 on padding. Every result is detached: advantages are targets.

References:
    * GRPO — Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
      (arXiv:2402.03300), §4.1.2 (outcome supervision).
    * Dr. GRPO — Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv:2503.20783).
    * RLOO — Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
      Feedback in LLMs" (arXiv:2402.14740), eq. 6.
    * REINFORCE++ — Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models"
      (arXiv:2501.03262).
    * ReMax — Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning
      Large Language Models" (arXiv:2310.10505), Algorithm 1.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from alignkit import Reduce, masked_whiten

__all__ = [
    "AdvantageEstimator",
    "ADVANTAGE_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "grpo_advantages",
    "dr_grpo_advantages",
    "rloo_advantages",
    "token_rewards",
    "token_returns",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
    "remax_advantages",
    "broadcast",
]

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax"]
ADVANTAGE_ESTIMATORS: tuple[str, ...] = get_args(AdvantageEstimator)
#: The estimators whose baseline is the other samples of the prompt: they need k ≥ 2.
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


def _groups(rewards: Tensor, k: int) -> Tensor:
    """``(N,)`` -> ``(N / k, k)``, refusing a length that is not a multiple of k."""
    if k < 1 or rewards.shape[0] % k:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of k = {k}")
    return rewards.detach().view(-1, k)


def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-6) -> Tensor:
    """GRPO's group-normalised advantage (Shao et al. 2024, §4.1.2):

        A_i = (r_i − mean(r_group)) / (std(r_group) + eps)

    with the sample standard deviation (divisor k − 1) of the prompt's k rewards. A group of equal rewards gets 0.

    Args:
        rewards: ``(N,)`` sequence rewards, k consecutive rows per prompt, k ≥ 2.
        k: samples per prompt.
        eps: added to the standard deviation.

    Returns:
        ``(N,)`` advantages.
    """
    groups = _groups(rewards, k)
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)).flatten()


def dr_grpo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Dr. GRPO's advantage (Liu et al. 2025, §3.2): GRPO without the division by the group's standard deviation,
    which weighs too-easy and too-hard prompts up,

        A_i = r_i − mean(r_group).

    Args:
        rewards: ``(N,)`` sequence rewards, k consecutive rows per prompt.
        k: samples per prompt.

    Returns:
        ``(N,)`` advantages.
    """
    groups = _groups(rewards, k)
    return (groups - groups.mean(-1, keepdim=True)).flatten()


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, eq. 6): each reward minus the mean of the other k − 1,

        A_i = r_i − 1/(k−1) · Σ_{j≠i} r_j = k/(k−1) · (r_i − mean(r_group)).

    Args:
        rewards: ``(N,)`` sequence rewards, k consecutive rows per prompt, k ≥ 2.
        k: samples per prompt.

    Returns:
        ``(N,)`` advantages.
    """
    if k < 2:
        raise ValueError(f"the leave-one-out baseline needs k >= 2 samples per prompt, got {k}")
    groups = _groups(rewards, k)
    return (k / (k - 1) * (groups - groups.mean(-1, keepdim=True))).flatten()


def token_rewards(scores: Tensor, kl: Tensor | None, mask: Tensor, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards with the KL penalty spread over tokens (Ziegler et al. 2019; REINFORCE++, §3.1):

        r_t = −β · kl_t + 1[t = last real token] · score

    Args:
        scores: ``(N,)`` sequence scores.
        kl: ``(N, R)`` per-token KL estimates (e.g. k1 = log π_old − log π_ref), or None for no penalty.
        mask: ``(N, R)`` response mask.
        kl_coef: β.

    Returns:
        ``(N, R)`` rewards, 0 on padding (an empty response gets nothing: its score has no token to land on).
    """
    m = mask.to(torch.float32)
    positions = torch.arange(m.shape[-1], device=m.device)
    last = torch.where(m.bool(), positions, torch.zeros_like(positions)).amax(-1, keepdim=True)  # (N, 1)
    rewards = torch.zeros_like(m).scatter(1, last, scores.detach().float().unsqueeze(1))
    if kl is not None:
        rewards = rewards - kl_coef * kl.detach().float()
    return rewards * m


def token_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Discounted return-to-go of every token, by a reverse scan: ``G_t = r_t + γ · G_{t+1}``, 0 after the last real
    token. ``rewards``, ``mask``: ``(N, R)`` -> ``(N, R)``, 0 on padding."""
    m = mask.to(torch.float32)
    rewards = rewards.detach().float() * m
    running = torch.zeros_like(rewards[:, 0])
    returns = []
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        returns.append(running)
    return torch.stack(returns[::-1], dim=1)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float = 1.0, reduce: Reduce | None = None) -> Tensor:
    """REINFORCE++ (Hu 2025, §3): the return-to-go of the KL-shaped token rewards, normalised over every real token
    of the global batch (no per-prompt baseline),

        G_t = Σ_{s ≥ t} γ^{s−t} r_s,        A_t = (G_t − mean(G)) / std(G)

    (``masked_whiten``: mean and unbiased variance over the real tokens of every rank).

    Args:
        rewards: ``(N, R)`` token rewards (:func:`token_rewards`: score on the last token, −β·kl_t on every token).
        mask: ``(N, R)`` response mask.
        gamma: discount γ (1 in the paper).
        reduce: sum across data-parallel ranks, so every rank normalises with the global statistics.

    Returns:
        ``(N, R)`` advantages, 0 on padding.
    """
    returns = token_returns(rewards, mask, gamma)
    return masked_whiten(returns, mask, reduce=reduce) * mask.to(returns.dtype)


def reinforce_pp_baseline_advantages(rewards: Tensor, mask: Tensor, k: int, gamma: float = 1.0,
                                     reduce: Reduce | None = None) -> Tensor:
    """REINFORCE++-baseline (Hu 2025, §3.3): subtract the group mean of the prompt's whole-response returns, then
    normalise over the global batch,

        G_t = Σ_{s ≥ t} γ^{s−t} r_s,   b_i = mean_{j ∈ group(i)} G_{j,0},   A_t = whiten(G_t − b_i)

    Without a KL term ``G_{j,0}`` is the score, so ``b_i`` is the group's mean score.

    Args:
        rewards: ``(N, R)`` token rewards, k consecutive rows per prompt.
        mask: ``(N, R)`` response mask.
        k: samples per prompt.
        gamma: discount γ.
        reduce: sum across data-parallel ranks.

    Returns:
        ``(N, R)`` advantages, 0 on padding.
    """
    returns = token_returns(rewards, mask, gamma)
    baseline = _groups(returns[:, 0], k).mean(-1, keepdim=True).expand(-1, k).flatten()  # (N,)
    m = mask.to(returns.dtype)
    return masked_whiten((returns - baseline[:, None]) * m, mask, reduce=reduce) * m


def remax_advantages(rewards: Tensor, greedy_rewards: Tensor, k: int = 1) -> Tensor:
    """ReMax (Li et al. 2023, Algorithm 1): the baseline is the reward of the greedy response to the same prompt,

        A_i = r(x, y_i) − r(x, ŷ),    ŷ = argmax decoding of π for x

    Args:
        rewards: ``(N,)`` rewards of the sampled responses, k consecutive rows per prompt.
        greedy_rewards: ``(N / k,)`` reward of each prompt's greedy response.
        k: samples per prompt (1 in the paper).

    Returns:
        ``(N,)`` advantages.
    """
    groups = _groups(rewards, k)
    if greedy_rewards.shape != (groups.shape[0],):
        raise ValueError(f"expected {groups.shape[0]} greedy rewards, got shape {tuple(greedy_rewards.shape)}")
    return (groups - greedy_rewards.detach().to(groups)[:, None]).flatten()


def broadcast(advantages: Tensor, mask: Tensor) -> Tensor:
    """A sequence-level advantage on every real token: ``(N,)`` -> ``(N, R)``, 0 on padding; ``(N, R)`` is masked."""
    m = mask.to(torch.float32)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    return advantages.detach().float() * m
