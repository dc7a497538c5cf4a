"""RLOO, REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024), and GRPO's group-normalised
advantages (Shao et al. 2024): critic-free online RLHF, the other samples of a prompt being the baseline.
Step: k samples per prompt → reward plugins → r = score − β·KL(π_old‖π_ref) → group baseline → clipped PG.
Shapes: ``B`` prompts, ``k`` samples each, ``N = B·k`` responses (row ``i·k + j`` is sample ``j`` of prompt
``i``), ``R`` response length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from alignkit import (
    LossOutput,
    OnlineAlgorithm,
    Rollout,
    SamplingConfig,
    TensorRecord,
    hookimpl,
    masked_mean,
    response_logprobs,
)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages: each reward minus the mean reward of the other k − 1 samples of its prompt,

        A_i = r_i − 1/(k−1) · Σ_{j≠i} r_j = k/(k−1) · (r_i − r̄),   r̄ = mean of the prompt's k rewards.

    rewards: ``(N,)``, k consecutive rows per prompt, k ≥ 2. Returns ``(N,)``.
    """
    groups = rewards.view(-1, k)
    return (k / (k - 1) * (groups - groups.mean(-1, keepdim=True))).flatten()


def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages (GRPO): ``A_i = (r_i − r̄) / (s + eps)``, with r̄ and s the mean and the
    sample standard deviation (divisor k − 1) of the prompt's k rewards. rewards ``(N,)`` -> ``(N,)``."""
    groups = rewards.view(-1, k)
    return ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + eps)).flatten()


def clipped_pg_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped policy-gradient loss with one advantage per sequence, averaged over all response tokens:

        L = −(1/Σm) · Σ_{i,t} m_it · min(ρ_it·A_i, clip(ρ_it, 1−ε, 1+ε)·A_i),   ρ_it = π(y_it)/π_old(y_it)

    While the policy is still the sampling policy (ρ = 1) this is REINFORCE with the baseline.
    logprobs, old_logprobs, mask: ``(N, R)``; advantages: ``(N,)``. Returns the scalar loss and detached
    stats: ``policy/approxkl`` = mean(ρ − 1 − log ρ) (read by the host's early stop) and ``policy/clipfrac``.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = log_ratio.exp()
    adv = advantages[:, None]
    loss = -masked_mean(torch.min(ratio * adv, ratio.clamp(1 - clip_range, 1 + clip_range) * adv), mask)
    return loss, {"policy/approxkl": masked_mean(ratio - 1 - log_ratio, mask).detach(),
                  "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).detach()}


@dataclass
class GroupExperience(TensorRecord):
    """A scored rollout ready for updates: ``N`` rows in groups of k."""

    sequences: Tensor  # (N, P + R)
    attention_mask: Tensor  # (N, P + R)
    response_mask: Tensor  # (N, R)
    old_logprobs: Tensor  # (N, R) log π_old of the sampled tokens
    advantages: Tensor  # (N,)
    rewards: Tensor  # (N,) score − β·kl
    kl: Tensor  # (N,) Σ_t (log π_old − log π_ref)
    prompt_length: int

    def select(self, rows: Tensor) -> GroupExperience:
        return replace(self, **{k: v[rows] for k, v in vars(self).items() if isinstance(v, Tensor)})


class RLOO(OnlineAlgorithm):
    """REINFORCE leave-one-out (or GRPO's group-normalised advantages): k samples per prompt, no critic."""

    needs_reference = True

    def __init__(self, samples_per_prompt: int = 4, baseline: Literal["rloo", "grpo"] = "rloo", kl_coef: float = 0.05,
                 clip_range: float = 0.2, num_minibatches: int = 1,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=24), **kwargs):
        """
        Args:
            samples_per_prompt: k, responses sampled per prompt (≥ 2: each one's baseline is the others).
            baseline: ``rloo`` (leave-one-out mean) or ``grpo`` (group mean and standard deviation).
            kl_coef: β of the sequence-level KL penalty subtracted from each reward.
            clip_range: ε of the clipped ratio (it bites from the second minibatch or epoch on).
            num_minibatches: optimiser steps per update epoch (rows shuffled with the global seed).
            sampling: how responses are sampled (read by the rollout engine).
            **kwargs: ``update_epochs``, ``target_approx_kl`` and ``max_grad_norm`` of OnlineAlgorithm.
        """
        if samples_per_prompt < 2:
            raise ValueError(f"algorithm.samples_per_prompt must be >= 2, got {samples_per_prompt}")
        super().__init__(samples_per_prompt=samples_per_prompt, **kwargs)  # the host samples k per prompt
        self.baseline, self.kl_coef = baseline, kl_coef
        self.clip_range, self.num_minibatches, self.sampling = clip_range, num_minibatches, sampling

    @hookimpl
    def alignkit_experience(self, module, rollout: Rollout, scores: Tensor) -> GroupExperience:
        rollout = rollout.to(module.device)
        mask, P = rollout.response_mask.float(), rollout.prompt_length
        with torch.no_grad(), module.reference_model() as reference:
            ref_logprobs = response_logprobs(reference, rollout.sequences, rollout.attention_mask, P,
                                             self.sampling.temperature)
        kl = ((rollout.logprobs - ref_logprobs) * mask).sum(-1)
        rewards = scores.to(kl) - self.kl_coef * kl
        advantages = (rloo_advantages if self.baseline == "rloo" else grpo_advantages)(rewards, self.samples_per_prompt)
        return GroupExperience(rollout.sequences, rollout.attention_mask, mask, rollout.logprobs * mask,
                               advantages, rewards, kl, P)

    @hookimpl
    def alignkit_minibatches(self, module, experience: GroupExperience) -> Iterator[list[GroupExperience]]:
        order = torch.randperm(experience.sequences.shape[0])
        for rows in order.chunk(self.num_minibatches):
            yield [experience.select(rows)]  # one micro-batch per optimiser step

    @hookimpl
    def alignkit_loss(self, module, batch: GroupExperience) -> LossOutput:
        logprobs = response_logprobs(module.policy, batch.sequences, batch.attention_mask, batch.prompt_length,
                                     self.sampling.temperature)  # differentiable: the training forward
        loss, stats = clipped_pg_loss(logprobs, batch.old_logprobs, batch.advantages, batch.response_mask,
                                      self.clip_range)
        return LossOutput(loss, {"train/loss": loss.detach(), **stats}, approx_kl=stats["policy/approxkl"])

    @hookimpl
    def alignkit_metrics(self, module, rollout: Rollout, experience: GroupExperience) -> dict[str, float]:
        return {"objective/kl": float(experience.kl.mean()), "objective/rlhf_reward": float(experience.rewards.mean()),
                "tokens/response_len_mean": float(experience.response_mask.sum(-1).mean())}
