"""Policy losses of the critic-free policy-gradient family, as pure functions on tensors.

Each loss takes per-token log-probs of the current policy (with gradient), those of the sampling policy π_old, the
advantages broadcast to tokens and the response mask, and aggregates its per-token terms with the shared,
split-invariant :func:`alignkit.agg_loss` (``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``). It
returns the ``units`` it averaged over, which the algorithm hands to the host in ``LossOutput.units`` so that an
optimiser step's gradient is that of one mean over all of its micro-batches and ranks.

Shapes: ``N`` responses, ``R`` response length; ``mask`` ``(N, R)`` is 1 on real response tokens.

References:
    * PPO-clip — Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347), eq. 7.
    * DAPO — Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv:2503.14476):
      clip-higher (eq. 10), token-level loss, dynamic sampling, overlong reward shaping (eq. 13).
    * GSPO — Zheng et al. 2025, "Group Sequence Policy Optimization" (arXiv:2507.18071), eqs. 5–7 and GSPO-token.
    * CISPO — MiniMax 2025, "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention"
      (arXiv:2506.13585), §3.1.
    * k1/k3 KL estimators — J. Schulman, "Approximating KL Divergence" (blog post, 2020); k3 as a loss term is
      GRPO's (Shao et al. 2024, eq. 4) and verl's ``low_var_kl``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from alignkit import LossAggregation, agg_loss, masked_mean

__all__ = [
    "PolicyLoss",
    "POLICY_LOSSES",
    "KLLossEstimator",
    "PGLossTerms",
    "decoupled_clip_loss",
    "ppo_clip_loss",
    "gspo_loss",
    "cispo_loss",
    "kl_loss",
]

PolicyLoss = Literal["ppo_clip", "gspo", "cispo"]
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLoss)
KLLossEstimator = Literal["k1", "k3"]


@dataclass
class PGLossTerms:
    """What a policy loss returns: ``loss`` carries the gradient; the rest are detached."""

    loss: Tensor  # () aggregated loss
    units: Tensor  # () the count ``loss`` averages over (tokens or sequences, see ``agg_loss``)
    clipfrac: Tensor  # () fraction of real tokens whose ratio was clipped (no gradient, or a clipped weight)
    approxkl: Tensor  # () masked mean of (ρ − 1) − log ρ, the k3 estimate of KL(π_old ‖ π)
    ratio_mean: Tensor  # () masked mean of the ratio the loss uses (per token, or GSPO's per sequence)

    def stats(self) -> dict[str, Tensor]:
        """Detached logging scalars under the shared metric names."""
        return {"loss/policy": self.loss.detach(), "policy/clipfrac": self.clipfrac, "policy/approxkl": self.approxkl,
                "policy/ratio_mean": self.ratio_mean}


def _approxkl(log_ratio: Tensor, mask: Tensor) -> Tensor:
    log_ratio = log_ratio.detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def decoupled_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        clip_low: float = 0.2, clip_high: float = 0.28,
                        aggregation: LossAggregation = "token-mean") -> PGLossTerms:
    """DAPO's clipped surrogate with decoupled ranges ("clip-higher", Yu et al. 2025, eq. 10), negated:

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t)
        L   = agg(L_t)

    A larger ε_high lets unlikely tokens with a positive advantage grow further (against entropy collapse);
    ``clip_low == clip_high`` is PPO's clip (:func:`ppo_clip_loss`).

    Args:
        logprobs: ``(N, R)`` log π of the sampled tokens (with gradient).
        old_logprobs: ``(N, R)`` log π_old of the same tokens.
        advantages: ``(N, R)`` advantages (a sequence's advantage on each of its tokens).
        mask: ``(N, R)`` response mask.
        clip_low: ε_low.
        clip_high: ε_high.
        aggregation: how per-token terms become the scalar (:func:`alignkit.agg_loss`).

    Returns:
        :class:`PGLossTerms`; ``clipfrac`` counts tokens where the clipped term is strictly the smaller one.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss, units = agg_loss(-torch.minimum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PGLossTerms(loss, units, clipfrac, _approxkl(log_ratio, mask), ratio_mean)


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float = 0.2,
                  aggregation: LossAggregation = "token-mean") -> PGLossTerms:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7): ``L_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)``,
    aggregated with ``aggregation``; :func:`decoupled_clip_loss` with ``ε_low = ε_high = clip_range``."""
    return decoupled_clip_loss(logprobs, old_logprobs, advantages, mask, clip_range, clip_range, aggregation)


def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 3e-4,
              clip_high: float = 4e-4, aggregation: LossAggregation = "seq-mean-token-mean") -> PGLossTerms:
    """GSPO's sequence-level importance ratio (Zheng et al. 2025, eqs. 5–7), in its token form (GSPO-token):

        s_i    = exp( (1/|y_i|) Σ_t (log π(y_it) − log π_old(y_it)) )          length-normalised sequence ratio
        s_it   = sg[s_i] · π(y_it) / sg[π(y_it)]                              value s_i, gradient s_i ∇log π(y_it)
        L_it   = −min(s_it A_it, clip(s_it, 1 − ε_low, 1 + ε_high) A_it)
        L      = agg(L_it)

    With one advantage per sequence and ``seq-mean-token-mean`` (the default) this is exactly the paper's sequence
    objective ``−1/G Σ_i min(s_i A_i, clip(s_i) A_i)`` and its gradient ``s_i A_i · 1/|y_i| Σ_t ∇log π(y_it)``;
    the clip acts on whole sequences (ε of order 1e-4, as the paper's 3e-4 / 4e-4). ``clipfrac`` counts tokens of
    clipped sequences.

    Args:
        logprobs, old_logprobs, advantages, mask: ``(N, R)``, as :func:`decoupled_clip_loss`.
        clip_low: ε_low of the sequence ratio.
        clip_high: ε_high of the sequence ratio.
        aggregation: how per-token terms become the scalar.

    Returns:
        :class:`PGLossTerms`; ``ratio_mean`` is the mean sequence ratio s over responses with a token.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    m = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * m
    lengths = m.sum(-1)  # (N,)
    seq_log_ratio = log_ratio.sum(-1) / lengths.clamp(min=1.0)  # (N,)
    token_log_ratio = seq_log_ratio.detach()[:, None] + logprobs - logprobs.detach()  # value: log s_i on every token
    ratio = torch.exp(token_log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    loss, units = agg_loss(-torch.minimum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).float(), mask)
        has_tokens = lengths > 0
        ratio_mean = seq_log_ratio.detach().exp()[has_tokens].mean() if has_tokens.any() else torch.ones(())
    return PGLossTerms(loss, units, clipfrac, _approxkl(log_ratio, mask), ratio_mean)


def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 1.0,
               clip_high: float = 0.28, aggregation: LossAggregation = "token-mean") -> PGLossTerms:
    """CISPO (MiniMax 2025, §3.1): REINFORCE with a clipped, stop-gradient importance-sampling weight, so that no
    token loses its gradient (PPO's clip drops clipped tokens altogether):

        ρ_t  = π(a_t) / π_old(a_t)
        w_t  = sg[clip(ρ_t, 1 − ε_low, 1 + ε_high)]
        L_t  = −w_t · A_t · log π(a_t)          ∇L_t = −w_t A_t ∇log π(a_t)
        L    = agg(L_t)

    MiniMax-M1 sets no lower bound (``clip_low = 1``: the weight is only cut above) and tunes ε_high.

    Args:
        logprobs, old_logprobs, advantages, mask: ``(N, R)``, as :func:`decoupled_clip_loss`.
        clip_low: ε_low of the weight (1: no lower bound, since ρ ≥ 0).
        clip_high: ε_high of the weight.
        aggregation: how per-token terms become the scalar.

    Returns:
        :class:`PGLossTerms`; ``clipfrac`` counts tokens whose weight was clipped.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss, units = agg_loss(-weight * advantages * logprobs, mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((weight != ratio).float(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PGLossTerms(loss, units, clipfrac, _approxkl(log_ratio, mask), ratio_mean)


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: KLLossEstimator = "k3",
            aggregation: LossAggregation = "token-mean") -> tuple[Tensor, Tensor]:
    """KL(π ‖ π_ref) as a loss term (GRPO, Shao et al. 2024, eq. 4), per token on tokens sampled from π_old:

        k1_t = log π(a_t) − log π_ref(a_t)
        k3_t = exp(log π_ref − log π) − (log π_ref − log π) − 1     (≥ 0, low variance: verl's ``low_var_kl``)
        L    = agg(kl_t)

    The algorithm adds ``β · L`` to the policy loss (same mask and aggregation, so the same ``units``). The k3
    log-ratio is clamped to [−10, 10] against overflow, as verl does.

    Args:
        logprobs: ``(N, R)`` log π (with gradient).
        ref_logprobs: ``(N, R)`` log π_ref.
        mask: ``(N, R)`` response mask.
        estimator: ``k1`` or ``k3``.
        aggregation: how per-token terms become the scalar.

    Returns:
        ``(loss, units)`` as :func:`alignkit.agg_loss`.

    Raises:
        ValueError: for an unknown estimator.
    """
    ref_logprobs = ref_logprobs.detach()
    if estimator == "k1":
        values = logprobs - ref_logprobs
    elif estimator == "k3":
        log_r = torch.clamp(ref_logprobs - logprobs, -10.0, 10.0)
        values = torch.expm1(log_r) - log_r
    else:
        raise ValueError(f"unknown KL loss estimator {estimator!r}; expected k1 or k3")
    return agg_loss(values, mask, aggregation)
