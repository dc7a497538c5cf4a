"""The KTO loss (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") as a pure
function of per-sequence log-probabilities.

KTO learns from *unpaired* feedback: each example is one completion ``y`` to a prompt ``x`` labelled desirable
or undesirable. With the implied reward

    r(x, y) = log π(y|x) − log π_ref(y|x)                                   (sequence sums)

and the reference point

    z₀ = max(0, (1/m) Σ_j [log π(y'_j|x_j) − log π_ref(y'_j|x_j)])          (no gradient)

estimated on ``m`` *mismatched* pairs ``(x_j, y'_j)`` of the batch (each prompt with another row's completion, a
biased but cheap estimate of KL(π ‖ π_ref)), the value of an example is

    v(x, y) = λ_D · σ(β (r − z₀))     if y is desirable
    v(x, y) = λ_U · σ(β (z₀ − r))     if y is undesirable

and the loss is the mean over the batch of ``λ_y − v(x, y)`` (the paper's Eq. 8), i.e. per row

    ℓ = λ_D · (1 − σ(β (r − z₀)))     (desirable)
    ℓ = λ_U · (1 − σ(β (z₀ − r)))     (undesirable).

Shapes: ``B`` examples, ``M`` mismatched (KL) pairs. Every function returns per-row values; the caller averages
them (``losses.mean()``, reported with ``units=B``), as the paper and TRL's ``KTOTrainer`` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit import Reduce

#: λ_D·n_D / (λ_U·n_U) outside this range is outside what Ethayarajh et al. 2024 (Sec. 4.2) recommend.
RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)


@dataclass
class KTOLossTerms:
    """Per-row outputs of :func:`kto_loss`. ``losses`` carries the autograd graph; the rest is detached."""

    losses: Tensor  # (B,) λ_y · (1 − σ(±β (r − z₀)))
    rewards: Tensor  # (B,) β · r = β · (log π(y|x) − log π_ref(y|x)), detached
    kl: Tensor  # () z₀ = max(0, KL estimate), detached


def check_kto_args(beta: float, desirable_weight: float, undesirable_weight: float) -> None:
    """Raise ``ValueError`` for β ≤ 0 or a weight ≤ 0 (or anything not finite)."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta}")
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {name}={weight}")


def reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor, reduce: Reduce | None = None) -> Tensor:
    """z₀ = max(0, mean_j (log π(y'_j|x_j) − log π_ref(y'_j|x_j))), detached.

    Args:
        policy_kl_logps: ``(M,)`` log π(y'|x) of the mismatched pairs.
        reference_kl_logps: ``(M,)`` log π_ref(y'|x).
        reduce: a sum over data-parallel ranks (e.g. ``module.reduce_sum``): the mean is then over every rank's
            pairs, as TRL gathers it; None: this batch only.

    Returns:
        ``()`` the clamped estimate, without gradient.
    """
    if policy_kl_logps.shape != reference_kl_logps.shape or policy_kl_logps.dim() != 1:
        raise ValueError(f"KL log-probs must both be (M,), got {tuple(policy_kl_logps.shape)} and "
                         f"{tuple(reference_kl_logps.shape)}")
    if policy_kl_logps.numel() == 0:
        raise ValueError("the KL estimate needs at least one mismatched (prompt, completion) pair")
    diff = (policy_kl_logps - reference_kl_logps).detach().float()
    total = torch.stack([diff.sum(), diff.new_tensor(float(diff.numel()))])  # (2,) sum, count
    total = reduce(total) if reduce is not None else total
    return (total[0] / total[1]).clamp(min=0.0)


def kto_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, policy_kl_logps: Tensor,
             reference_kl_logps: Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reduce: Reduce | None = None) -> KTOLossTerms:
    """Per-row KTO loss (see the module docstring):

        ℓ_i = λ_D · (1 − σ(β (r_i − z₀)))   if desirable_i
        ℓ_i = λ_U · (1 − σ(β (z₀ − r_i)))   otherwise

    with r_i = log π(y_i|x_i) − log π_ref(y_i|x_i) and z₀ from :func:`reference_point` (no gradient flows
    through it). ``1 − σ(t)`` is computed as ``σ(−t)``.

    Args:
        policy_logps: ``(B,)`` log π(y|x), summed over completion tokens.
        reference_logps: ``(B,)`` log π_ref(y|x).
        desirable: ``(B,)`` bool, True for desirable completions.
        policy_kl_logps: ``(M,)`` log π(y'|x) of the mismatched pairs (any gradient is ignored).
        reference_kl_logps: ``(M,)`` log π_ref(y'|x).
        beta: β > 0, the sharpness of the value function (and strength of the KL anchor).
        desirable_weight: λ_D > 0.
        undesirable_weight: λ_U > 0.
        reduce: a sum over data-parallel ranks for the KL estimate (None: this batch only).

    Returns:
        :class:`KTOLossTerms` with ``losses`` ``(B,)``, detached ``rewards`` ``(B,)`` (β·r) and ``kl`` ``()`` (z₀).
    """
    check_kto_args(beta, desirable_weight, undesirable_weight)
    if not (policy_logps.shape == reference_logps.shape == desirable.shape) or policy_logps.dim() != 1:
        raise ValueError(f"policy_logps, reference_logps and desirable must all be (B,), got "
                         f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)} and {tuple(desirable.shape)}")
    z0 = reference_point(policy_kl_logps, reference_kl_logps, reduce).to(policy_logps.dtype)
    logratios = policy_logps - reference_logps  # (B,) r
    desirable = desirable.bool()
    losses = torch.where(desirable,
                         desirable_weight * torch.sigmoid(-beta * (logratios - z0)),   # 1 − σ(β(r − z₀))
                         undesirable_weight * torch.sigmoid(-beta * (z0 - logratios)))  # 1 − σ(β(z₀ − r))
    return KTOLossTerms(losses=losses, rewards=(beta * logratios).detach(), kl=z0)


def kto_stats(terms: KTOLossTerms, desirable: Tensor, policy_logps: Tensor,
              reduce: Reduce | None = None) -> dict[str, Tensor]:
    """The logged statistics of one batch, detached: ``rewards/chosen`` and ``rewards/rejected`` (mean β·r of the
    desirable and of the undesirable rows), ``rewards/margins`` (their difference), ``logps/chosen`` and
    ``logps/rejected`` (mean policy log-probs) and ``kto/kl`` (z₀).

    A kind of row that no rank's batch holds has no mean: its keys are left out (never NaN, never 0). With
    ``reduce`` the means are over every rank's rows, so every rank returns the same keys (as synchronised
    logging needs).

    Args:
        terms: the output of :func:`kto_loss` for this batch.
        desirable: ``(B,)`` bool.
        policy_logps: ``(B,)`` log π(y|x).
        reduce: a sum over data-parallel ranks (None: this batch only).
    """
    desirable = desirable.bool()
    undesirable = ~desirable
    logps = policy_logps.detach().float()
    rewards = terms.rewards.float()
    sums = torch.stack([desirable.sum(), undesirable.sum(), rewards[desirable].sum(), rewards[undesirable].sum(),
                        logps[desirable].sum(), logps[undesirable].sum()]).float()  # (6,)
    sums = reduce(sums) if reduce is not None else sums
    n_d, n_u, reward_d, reward_u, logp_d, logp_u = sums.unbind()
    stats: dict[str, Tensor] = {"kto/kl": terms.kl.detach()}
    if n_d > 0:
        stats["rewards/chosen"], stats["logps/chosen"] = reward_d / n_d, logp_d / n_d
    if n_u > 0:
        stats["rewards/rejected"], stats["logps/rejected"] = reward_u / n_u, logp_u / n_u
    if n_d > 0 and n_u > 0:
        stats["rewards/margins"] = stats["rewards/chosen"] - stats["rewards/rejected"]
    return stats


def weight_ratio(desirable_weight: float, undesirable_weight: float, desirable_rows: int, undesirable_rows: int
                 ) -> float | None:
    """λ_D·n_D / (λ_U·n_U), which Ethayarajh et al. 2024 recommend keeping in [1, 4/3]
    (:data:`RECOMMENDED_RATIO`); None when either kind has no rows."""
    if desirable_rows == 0 or undesirable_rows == 0:
        return None
    return desirable_weight * desirable_rows / (undesirable_weight * undesirable_rows)


__all__ = ["KTOLossTerms", "RECOMMENDED_RATIO", "check_kto_args", "kto_loss", "kto_stats", "reference_point",
           "weight_ratio"]
