"""Reward arithmetic for reward plugins: ensemble aggregation, weighted combination of named rewards,
and normalisation (per batch or with running statistics).

Shapes: ``K`` ensemble members, ``B`` scored responses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from alignkit.ops import masked_whiten

EnsembleMethod = Literal["mean", "min", "uwo", "mean_minus_std"]
ENSEMBLE_METHODS: tuple[str, ...] = get_args(EnsembleMethod)
NormalizeMethod = Literal["none", "batch", "running"]
NORMALIZE_METHODS: tuple[str, ...] = get_args(NormalizeMethod)


def aggregate_ensemble(
    scores: Tensor, method: EnsembleMethod, uncertainty_coef: float = 1.0
) -> Tensor:
    """Collapse the scores of a reward-model ensemble into one reward per response (Coste et al. 2024,
    "Reward Model Ensembles Help Mitigate Overoptimization"). With R_k the score of member k:

        mean:            R = (1/K) Σ_k R_k
        min  (WCO):      R = min_k R_k                                  (worst-case optimisation)
        uwo  (UWO):      R = (1/K) Σ_k R_k − λ · (1/K) Σ_k (R_k − R̄)²    (uncertainty-weighted)
        mean_minus_std:  R = (1/K) Σ_k R_k − λ · sqrt((1/K) Σ_k (R_k − R̄)²)

    λ is ``uncertainty_coef`` (ignored by ``mean`` and ``min``). The variance is the population
    variance (divisor K, no Bessel correction), so a single-member ensemble (K = 1) is allowed: its
    variance is 0 and every method degenerates to that member's score.

    Args:
        scores: ``(K, B)`` one row per ensemble member.
        method: one of ``"mean"``, ``"min"``, ``"uwo"``, ``"mean_minus_std"``.
        uncertainty_coef: λ ≥ 0, the weight of the disagreement penalty.

    Returns:
        ``(B,)`` aggregated rewards.
    """
    if method not in ENSEMBLE_METHODS:
        raise ValueError(
            f"unknown ensemble method {method!r}; expected one of {', '.join(ENSEMBLE_METHODS)}"
        )
    if scores.dim() != 2 or scores.shape[0] < 1:
        raise ValueError(
            f"scores must be (K, B) with K >= 1 ensemble members, got shape {tuple(scores.shape)}"
        )
    if not (math.isfinite(uncertainty_coef) and uncertainty_coef >= 0):
        raise ValueError(
            f"uncertainty_coef must be a finite number >= 0, got uncertainty_coef={uncertainty_coef}"
        )
    if method == "min":
        return scores.min(dim=0).values
    mean = scores.mean(dim=0)
    if method == "mean":
        return mean
    var = scores.var(dim=0, unbiased=False)
    if method == "uwo":
        return mean - uncertainty_coef * var
    return mean - uncertainty_coef * var.sqrt()


def combine_rewards(
    named_scores: dict[str, Tensor], weights: dict[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of several named rewards:

        R = Σ_n w_n · R_n

    Args:
        named_scores: reward name -> ``(B,)`` scores; all the same shape.
        weights: reward name -> weight w_n; must name exactly the rewards in ``named_scores``.

    Returns:
        ``(total, contributions)``: ``total`` ``(B,)`` (keeps any autograd graph) and, for each name,
        its weighted contribution w_n · R_n ``(B,)``, detached, for logging under that name.
    """
    if not named_scores:
        raise ValueError("combine_rewards needs at least one reward, got none")
    missing = [name for name in named_scores if name not in weights]
    if missing:
        raise ValueError(f"no weight given for reward(s) {', '.join(map(repr, missing))}")
    unused = [name for name in weights if name not in named_scores]
    if unused:
        raise ValueError(f"weight given for unknown reward(s) {', '.join(map(repr, unused))}")
    shapes = {name: tuple(score.shape) for name, score in named_scores.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all rewards must have the same shape (B,), got {shapes}")
    weighted = {name: weights[name] * score for name, score in named_scores.items()}
    total = torch.stack(list(weighted.values())).sum(dim=0)
    return total, {name: value.detach() for name, value in weighted.items()}


@dataclass
class RunningMoments:
    """Running mean and standard deviation of every score passed to :meth:`update`.

    Keeps the count, the mean and M2 = Σ (x − mean)² as plain Python floats (float64), and merges each
    batch with the parallel form of Welford's algorithm (Chan et al. 1979): for the stored (n_a, μ_a,
    M2_a) and a batch (n_b, μ_b, M2_b), with δ = μ_b − μ_a and n = n_a + n_b,

        μ = μ_a + δ · n_b / n,        M2 = M2_a + M2_b + δ² · n_a · n_b / n.

    :attr:`std` is the unbiased (Bessel-corrected, divisor n − 1) standard deviation, the same as
    ``torch.std`` over all scores seen; it is 0 while fewer than two scores have been seen.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    eps: float = 1e-8  # added to the variance before dividing in normalize()

    @property
    def var(self) -> float:
        """Unbiased variance M2 / (n − 1); 0 for n < 2."""
        return self.m2 / (self.count - 1.0) if self.count > 1.0 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold every element of ``x`` (any shape) into the statistics; an empty tensor is a no-op."""
        values = x.detach().reshape(-1).to(torch.float64)
        n_b = values.numel()
        if n_b == 0:
            return
        batch_mean = values.mean()
        mean_b, m2_b = batch_mean.item(), ((values - batch_mean) ** 2).sum().item()
        if not (math.isfinite(mean_b) and math.isfinite(m2_b)):
            raise ValueError("RunningMoments.update got non-finite scores (nan or inf)")
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    def normalize(self, x: Tensor) -> Tensor:
        """``(x − mean) / sqrt(var + eps)`` with the running statistics; same shape and dtype as ``x``."""
        if self.count == 0:
            raise ValueError("RunningMoments.normalize called before any update (count=0)")
        return (x - self.mean) / math.sqrt(self.var + self.eps)

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        expected = {"count", "mean", "m2"}
        if set(state) != expected:
            raise ValueError(f"RunningMoments state must have keys {sorted(expected)}, got {sorted(state)}")
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_rewards(
    scores: Tensor,
    method: NormalizeMethod,
    running: RunningMoments | None = None,
    clip: float | None = None,
) -> Tensor:
    """Normalise a batch of rewards, then optionally clip them to [−clip, clip].

        none:     r
        batch:    (r − mean_batch) / sqrt(var_batch + 1e-8)   (unbiased variance, via ops.masked_whiten;
                                                               a batch of one gives 0)
        running:  running.update(r), then (r − μ_run) / sqrt(var_run + eps)

    Args:
        scores: ``(B,)`` rewards.
        method: ``"none"``, ``"batch"`` or ``"running"``.
        running: the :class:`RunningMoments` to update and use; required for ``"running"``.
        clip: bound c > 0 for clipping, or ``None`` for no clipping.

    Returns:
        ``(B,)`` normalised (and clipped) rewards.
    """
    if method not in NORMALIZE_METHODS:
        raise ValueError(
            f"unknown normalisation method {method!r}; expected one of {', '.join(NORMALIZE_METHODS)}"
        )
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got clip={clip}")
    if method == "running" and running is None:
        raise ValueError("method='running' needs a RunningMoments instance, got running=None")
    if method == "batch":
        scores = masked_whiten(scores, torch.ones_like(scores))
    elif method == "running":
        assert running is not None  # checked above
        running.update(scores)
        scores = running.normalize(scores)
    if clip is not None:
        scores = scores.clamp(min=-clip, max=clip)
    return scores
