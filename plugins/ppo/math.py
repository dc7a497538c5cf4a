"""The math of PPO for RLHF, as pure functions on tensors plus the two KL-coefficient controllers.

References:
    * PPO — Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347).
    * GAE — Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
      Estimation" (arXiv:1506.02438).
    * KL-shaped rewards and the adaptive KL controller — Ziegler et al. 2019, "Fine-Tuning Language
      Models from Human Preferences" (arXiv:1909.08593).
    * k1/k2/k3 KL estimators — J. Schulman, "Approximating KL Divergence" (blog post, 2020).

Shapes: ``B`` responses, ``R`` response length, ``V`` vocabulary size. ``mask`` ``(B, R)`` is 1 (or
``True``) on real response tokens and 0 on padding; responses are right padded, so each row is a run of
ones followed by zeros, and a row may be all zeros (an empty response).

Losses are aggregated over tokens by :func:`alignkit.aggregation.agg_loss` (``token-mean`` by default: a mean over
every real token, so long responses weigh more than short ones); each loss also returns the count it averaged
over, with which the host makes the mean exact over all micro-batches and ranks of an optimiser step.
Everything returned for logging is detached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from alignkit import LossAggregation, Reduce, agg_loss, entropy_from_logits, masked_mean, masked_whiten

__all__ = [
    "KLEstimator",
    "KL_ESTIMATORS",
    "kl_penalty",
    "score_positions",
    "place_scores",
    "shaped_rewards",
    "gae",
    "whiten_advantages",
    "PolicyLossTerms",
    "policy_loss",
    "ValueLossTerms",
    "value_loss",
    "entropy_bonus",
    "FixedKLController",
    "AdaptiveKLController",
    "KLController",
]

KLEstimator = Literal["k1", "k3", "abs", "mse"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)


# --------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π (Schulman, "Approximating KL
    Divergence"). With ``log r = log π_ref(x) − log π(x)``:

    * ``"k1"``: ``−log r = log π − log π_ref`` — unbiased, high variance, can be negative.
    * ``"k3"``: ``(r − 1) − log r`` — unbiased, lower variance, always ≥ 0 (since ``log r ≤ r − 1``).
      Computed as ``expm1(log r) − log r`` for accuracy when ``r ≈ 1``.
    * ``"abs"``: ``|k1|`` — biased, ≥ 0.
    * ``"mse"``: ``½ k1²`` (the blog's k2) — biased, ≥ 0, low variance.

    Args:
        logprobs: ``(B, R)`` log π of the sampled tokens.
        ref_logprobs: ``(B, R)`` log π_ref of the same tokens.
        estimator: one of ``"k1"``, ``"k3"``, ``"abs"``, ``"mse"``.

    Returns:
        ``(B, R)`` per-token estimates. Padding positions are whatever the inputs give there; callers
        mask them (``shaped_rewards`` does).

    Raises:
        ValueError: for an unknown ``estimator``, listing the valid names.
    """
    if estimator not in KL_ESTIMATORS:
        options = ", ".join(KL_ESTIMATORS)
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {options}")
    k1 = logprobs - ref_logprobs
    if estimator == "k1":
        return k1
    if estimator == "k3":
        log_r = -k1
        return torch.expm1(log_r) - log_r
    if estimator == "abs":
        return k1.abs()
    return 0.5 * k1.square()


def score_positions(mask: Tensor) -> Tensor:
    """Index of the last real response token of each row — where a sequence-level score is credited.

    This is the last position where ``mask`` is set (for right padding: ``length − 1``), not the first
    padding position after it. A row with an empty response (mask all 0) gets index 0; it has no token
    to credit, so callers must mask that position (``shaped_rewards`` multiplies by ``mask``).

    Args:
        mask: ``(B, R)`` response mask.

    Returns:
        ``(B,)`` int64 indices in ``[0, R)``.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(dim=-1)


def place_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Scatter one score per response onto its last real token (Ziegler et al. 2019, §2: the reward
    model's score is a terminal reward).

    Args:
        scores: ``(B,)`` sequence-level scores.
        mask: ``(B, R)`` response mask.

    Returns:
        ``(B, R)`` zeros except ``scores[b]`` at ``score_positions(mask)[b]``. For an empty response the
        score sits at index 0, a padding position, so multiplying by ``mask`` drops it.
    """
    placed = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    return placed.scatter(1, score_positions(mask).unsqueeze(1), scores.unsqueeze(1))


def shaped_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """KL-shaped per-token rewards (Ziegler et al. 2019, eq. 2, spread over tokens):

        r_t = −β · KL_t + 1[t = last real token] · score

    with ``KL_t = kl_penalty(logprobs, ref_logprobs, estimator)`` and ``β = kl_coef``. Rewards are
    targets, so the result is detached.

    Args:
        scores: ``(B,)`` reward-model scores.
        logprobs: ``(B, R)`` log π_old of the sampled tokens (the rollout policy).
        ref_logprobs: ``(B, R)`` log π_ref of the same tokens.
        mask: ``(B, R)`` response mask.
        kl_coef: β ≥ 0.
        estimator: KL estimator name, see ``kl_penalty``.

    Returns:
        ``(rewards, kl)``, both ``(B, R)``, detached and 0 on padding. An empty response gets no reward
        at all (its score has no token to land on).
    """
    logprobs, ref_logprobs = logprobs.detach(), ref_logprobs.detach()
    m = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * m
    rewards = (-kl_coef * kl + place_scores(scores.detach().to(logprobs.dtype), mask)) * m
    return rewards, kl


# --------------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11–16), by a reverse scan:

        δ_t = r_t + γ V_{t+1} − V_t
        A_t = δ_t + γλ A_{t+1}
        returns_t = A_t + V_t     (the λ-return, the value target)

    ``V_{t+1}`` and ``A_{t+1}`` are 0 after the last real token: a finished response is terminal, so
    bootstrapping is 0. Whatever ``rewards`` and ``values`` hold on padding never enters the result.
    Advantages and returns are targets, so the inputs are detached.

    Args:
        rewards: ``(B, R)`` per-token rewards (e.g. from ``shaped_rewards``).
        values: ``(B, R)`` value estimates V_old of each response position.
        mask: ``(B, R)`` response mask (right padded).
        gamma: discount γ.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``(B, R)``, detached and 0 on padding.
    """
    rewards, values = rewards.detach(), values.detach()
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m[:, t]
        advantages.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages_t = torch.stack(advantages[::-1], dim=1)
    return advantages_t, (advantages_t + values) * m


def whiten_advantages(advantages: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """Normalise advantages to mean 0 and (unbiased) standard deviation 1 over the real tokens of the
    batch — the usual PPO practice (``ops.masked_whiten``) — and zero the padding.

    Args:
        advantages: ``(B, R)``.
        mask: ``(B, R)`` response mask.
        reduce: sum across data-parallel ranks, so every rank whitens with the global statistics.

    Returns:
        ``(B, R)`` whitened advantages, 0 on padding.
    """
    return masked_whiten(advantages, mask, reduce=reduce) * mask.to(advantages.dtype)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


@dataclass
class PolicyLossTerms:
    """Result of ``policy_loss``. ``loss`` carries the gradient; the rest are detached scalars."""

    loss: Tensor  # () clipped surrogate loss
    clipfrac: Tensor  # () fraction of real tokens where the clipped objective is the smaller one
    approxkl: Tensor  # () masked mean of ½ (log π − log π_old)²
    ratio_mean: Tensor  # () masked mean of π / π_old
    units: Tensor  # () the count ``loss`` averages over (tokens or sequences, see ``agg_loss``)

    def stats(self) -> dict[str, Tensor]:
        """Detached logging scalars, keyed by metric name."""
        return {
            "policy_loss": self.loss.detach(),
            "policy_clipfrac": self.clipfrac,
            "approxkl": self.approxkl,
            "ratio_mean": self.ratio_mean,
        }


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregation: LossAggregation = "token-mean",
) -> PolicyLossTerms:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated to be minimised:

        ρ_t = exp(log π(a_t) − log π_old(a_t))
        L_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε) A_t)
        L   = agg(L_t)              (``aggregation``; token-mean: Σ_t mask_t L_t / number of real tokens)

    Stats: ``clipfrac`` is the fraction of real tokens where the clipped term is strictly the smaller
    one (those tokens get no gradient); ``approxkl`` uses the ``½ (log ρ)²`` estimator (k2 in
    Schulman's blog) of KL(π_old ‖ π) on tokens sampled from π_old; ``ratio_mean`` is the mean ρ.

    Args:
        logprobs: ``(B, R)`` log π of the sampled tokens under the current policy (with gradient).
        old_logprobs: ``(B, R)`` log π_old from the rollout.
        advantages: ``(B, R)`` advantage estimates (usually whitened).
        mask: ``(B, R)`` response mask.
        clip_range: ε.
        aggregation: how per-token losses become the scalar (:func:`alignkit.aggregation.agg_loss`).

    Returns:
        ``PolicyLossTerms`` with a scalar ``loss``, detached scalar stats and the ``units`` it averages over.
    """
    old_logprobs, advantages = old_logprobs.detach(), advantages.detach()
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * advantages
    loss, units = agg_loss(-torch.minimum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped < unclipped).to(ratio.dtype), mask)
        approxkl = masked_mean(kl_penalty(logprobs, old_logprobs, "mse"), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossTerms(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio_mean=ratio_mean, units=units)


@dataclass
class ValueLossTerms:
    """Result of ``value_loss``. ``loss`` carries the gradient; ``clipfrac`` is a detached scalar."""

    loss: Tensor  # () clipped value loss
    clipfrac: Tensor  # () fraction of real tokens where the clipped error is the larger one
    units: Tensor  # () the count ``loss`` averages over (see ``agg_loss``)

    def stats(self) -> dict[str, Tensor]:
        """Detached logging scalars, keyed by metric name."""
        return {"value_loss": self.loss.detach(), "value_clipfrac": self.clipfrac}


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
    aggregation: LossAggregation = "token-mean",
) -> ValueLossTerms:
    """Clipped value loss (the value-function clipping of the PPO reference implementation, Schulman
    et al. 2017; cf. torchtune's ``PPOLoss``):

        V^clip_t = V_old,t + clip(V_t − V_old,t, −ε_v, ε_v)
        L_t      = ½ · max((V_t − R_t)², (V^clip_t − R_t)²)
        L        = agg(L_t)     (``aggregation``, see :func:`policy_loss`)

    ``clipfrac`` is the fraction of real tokens where the clipped error is strictly the larger one
    (those tokens get no gradient).

    Args:
        values: ``(B, R)`` current value predictions (with gradient).
        old_values: ``(B, R)`` value predictions at rollout time.
        returns: ``(B, R)`` value targets (from ``gae``).
        mask: ``(B, R)`` response mask.
        clip_range_value: ε_v.
        aggregation: how per-token losses become the scalar (:func:`alignkit.aggregation.agg_loss`).

    Returns:
        ``ValueLossTerms`` with a scalar ``loss``, a detached scalar ``clipfrac`` and the ``units`` it averages over.
    """
    old_values, returns = old_values.detach(), returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error = (values - returns).square()
    clipped_error = (clipped_values - returns).square()
    loss, units = agg_loss(torch.maximum(error, clipped_error), mask, aggregation)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_error > error).to(values.dtype), mask)
    return ValueLossTerms(loss=0.5 * loss, clipfrac=clipfrac, units=units)


def entropy_bonus(logits: Tensor, mask: Tensor, temperature: float = 1.0,
                  aggregation: LossAggregation = "token-mean") -> Tensor:
    """Mean entropy of the sampling policy over the real tokens, the ``S[π]`` term of Schulman et al. 2017,
    eq. 9 (the total loss subtracts ``c₂ · S``). The sampling policy is ``softmax(logits / T)``, the distribution
    the responses were drawn from and whose log-probs the ratio uses, so the entropy is taken at the same
    temperature.

    Args:
        logits: ``(B, R, V)`` raw policy logits at the response positions.
        mask: ``(B, R)`` response mask.
        temperature: ``T`` of the sampling (``SamplingConfig.temperature``).
        aggregation: how per-token entropies become the scalar (the policy loss's, so both share its units).

    Returns:
        ``()`` aggregated entropy, with gradient.
    """
    tempered = logits.float() / temperature if temperature != 1.0 else logits
    return agg_loss(entropy_from_logits(tempered), mask, aggregation)[0]


# --------------------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------------------


@dataclass
class FixedKLController:
    """A constant KL coefficient β; ``update`` does nothing."""

    value: float

    def __post_init__(self) -> None:
        self.value = float(self.value)
        if self.value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {self.value}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the measured KL: β stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, §2.2), a proportional controller steering the
    measured KL(π ‖ π_ref) towards ``target``:

        e_t     = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    ``n_steps`` is the number of samples (episodes) the measurement covers, so β moves by at most 20%
    per ``horizon`` samples.
    """

    value: float  # β, the initial coefficient
    target: float  # KL_target (nats per sequence, or whatever unit the caller measures KL in)
    horizon: float  # samples over which β may change by up to ±20%

    def __post_init__(self) -> None:
        self.value, self.target, self.horizon = float(self.value), float(self.target), float(self.horizon)
        if self.value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {self.value}")
        if self.target <= 0:
            raise ValueError(f"target KL must be > 0, got {self.target}")
        if self.horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move β towards the value that keeps ``current_kl`` at ``target``."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Plain floats: the current β and the controller's settings."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


KLController = FixedKLController | AdaptiveKLController
