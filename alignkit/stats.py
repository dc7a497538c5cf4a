"""Statistics of a multi-seed method comparison: intervals over seeds, paired differences, probability of
improvement, comparison at matched KL and Gao et al. (2022)'s gold-reward-vs-KL curves.

A method's result is one number per seed (e.g. the final gold reward of the run). Following Agarwal et al.
(2021), "Deep RL at the edge of the statistical precipice" (rliable), every aggregate is reported with a
bootstrap confidence interval:

- **Bootstrap over seeds.** rliable's *stratified* bootstrap resamples runs with replacement *within each task*
  and recomputes the aggregate. alignkit compares methods on one task at a time, so there is one stratum and the
  stratified bootstrap reduces to the plain bootstrap over seeds: draw ``n`` seeds with replacement from the
  ``n`` values, recompute the statistic, repeat ``n_resamples`` times.
- **Percentile method** (as rliable): the ``confidence`` interval is ``[q_{(1-c)/2}, q_{(1+c)/2}]``, the
  quantiles of the bootstrap distribution of the statistic. The point estimate is the statistic on the
  original sample.
- The resampling is :func:`scipy.stats.bootstrap`; results are deterministic for a given ``seed`` (a
  ``numpy.random.default_rng(seed)`` generator).
- One value gives no interval (``low = high = None``); when every value is equal the interval is ``[v, v]``;
  an empty or non-finite input raises :class:`ValueError`.

Comparisons between two methods ``a`` and ``b`` whose runs share upstream stages per seed are *paired*:
:func:`paired_difference_ci` resamples the per-seed differences ``a_i − b_i``.
:func:`probability_of_improvement` is rliable's ``P(X > Y)`` with its CI from resampling ``a`` and ``b``
independently.

Methods reach different KL from the start policy and gold reward depends on KL, so they are also compared at
matched KL: :func:`matched_kl` reads each run's gold-vs-KL trajectory at common KL budgets, and
:func:`fit_best_of_n` / :func:`fit_rl` fit Gao et al. (2022)'s functional forms with ``d = √KL``.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as _scipy_stats

__all__ = [
    "Interval",
    "mean_ci",
    "iqm",
    "iqm_ci",
    "paired_difference_ci",
    "probability_of_improvement",
    "matched_kl",
    "CurveFit",
    "fit_best_of_n",
    "fit_rl",
    "BEST_OF_N_FORM",
    "RL_FORM",
]

#: :attr:`CurveFit.form` of :func:`fit_best_of_n`.
BEST_OF_N_FORM = "best_of_n: R = d(α − βd)"
#: :attr:`CurveFit.form` of :func:`fit_rl`.
RL_FORM = "rl: R = d(α − β log d)"

# scipy renamed ``random_state`` to ``rng`` (1.15); use whichever the installed version has.
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(_scipy_stats.bootstrap).parameters else "random_state"

# Above this many elements per statistic evaluation (resamples × N × M for the probability of improvement),
# scipy evaluates the bootstrap in batches to bound memory.
_MAX_BATCH_ELEMENTS = 20_000_000


def _none_if_nan(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval.

    ``low``/``high`` are ``None`` when there are fewer than 2 values (no interval from one value).
    """

    estimate: float
    low: float | None
    high: float | None
    n: int

    def to_dict(self) -> dict:
        """``{"estimate", "low", "high", "n"}`` (JSON-serialisable)."""
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n}


# --------------------------------------------------------------------------------------------------------------
# validation and the bootstrap call


def _as_sample(values: ArrayLike, name: str = "values") -> NDArray[np.float64]:
    """A 1-D finite float array with at least one value, or :class:`ValueError`."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: a statistic needs at least one value")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has non-finite entries: {x.tolist()}")
    return x


def _check_bootstrap_args(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")


def _bootstrap(
    samples: tuple[NDArray[np.float64], ...],
    statistic: Callable[..., NDArray[np.float64]],
    confidence: float,
    n_resamples: int,
    seed: int,
    elements_per_resample: int,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` (vectorised, ``axis`` keyword) over independent ``samples``."""
    batch = None
    if elements_per_resample * n_resamples > _MAX_BATCH_ELEMENTS:
        batch = max(1, _MAX_BATCH_ELEMENTS // max(1, elements_per_resample))
    kwargs = {_RNG_KEYWORD: np.random.default_rng(seed)}
    with warnings.catch_warnings():
        # A degenerate bootstrap distribution (e.g. every resample gives P = 1) is a valid point interval,
        # not a problem to warn about.
        warnings.simplefilter("ignore", _scipy_stats.DegenerateDataWarning)
        res = _scipy_stats.bootstrap(
            samples,
            statistic,
            n_resamples=int(n_resamples),
            batch=batch,
            vectorized=True,
            paired=False,
            axis=-1,
            confidence_level=confidence,
            method="percentile",
            **kwargs,
        )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):  # quantiles of a constant distribution, if scipy returns nan
        dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
        low, high = float(np.nanmin(dist)), float(np.nanmax(dist))
    return low, high


def _one_sample_interval(
    x: NDArray[np.float64],
    statistic: Callable[..., NDArray[np.float64]],
    confidence: float,
    n_resamples: int,
    seed: int,
) -> Interval:
    _check_bootstrap_args(confidence, n_resamples)
    estimate = float(statistic(x, axis=-1))
    n = int(x.size)
    if n < 2:
        return Interval(estimate, None, None, n)
    if np.all(x == x[0]):
        v = float(x[0])
        return Interval(estimate, v, v, n)
    low, high = _bootstrap((x,), statistic, confidence, n_resamples, seed, elements_per_resample=n)
    return Interval(estimate, low, high, n)


# --------------------------------------------------------------------------------------------------------------
# aggregates over seeds


def _mean(x: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    return np.mean(x, axis=axis)


def _iqm(x: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    return _scipy_stats.trim_mean(x, 0.25, axis=axis)


def mean_ci(values: ArrayLike, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """Mean over seeds ``x̄ = (1/n) Σ_i x_i`` with its percentile-bootstrap CI (resampling the seeds).

    ``low = high = None`` when ``n == 1``; ``[v, v]`` when every value is ``v``. Empty input: ValueError.
    """
    return _one_sample_interval(_as_sample(values), _mean, confidence, n_resamples, seed)


def iqm(values: ArrayLike) -> float:
    """Interquartile mean (rliable's IQM): the mean of the values left after dropping the lowest and the
    highest 25 %, ``scipy.stats.trim_mean(values, 0.25)``.

    With ``n`` values ``g = ⌊n/4⌋`` are cut from each end of the sorted values and
    ``IQM = (1/(n − 2g)) Σ_{i=g}^{n−g−1} x_(i)``, so e.g. 8 values → the mean of the middle 4.
    """
    return float(_iqm(_as_sample(values)))


def iqm_ci(values: ArrayLike, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> Interval:
    """:func:`iqm` over seeds with its percentile-bootstrap CI (resampling the seeds).

    ``low = high = None`` when ``n == 1``; ``[v, v]`` when every value is ``v``. Empty input: ValueError.
    """
    return _one_sample_interval(_as_sample(values), _iqm, confidence, n_resamples, seed)


# --------------------------------------------------------------------------------------------------------------
# comparisons of two methods


def paired_difference_ci(
    a: ArrayLike, b: ArrayLike, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Mean paired difference ``Δ = (1/n) Σ_i (a_i − b_i)`` with its percentile-bootstrap CI.

    ``a`` and ``b`` are paired by index (the same seed, hence the same upstream stages); the bootstrap resamples
    the ``n`` pairs, i.e. the differences ``a_i − b_i``. ``n`` is the number of pairs. Lengths that differ:
    ValueError.
    """
    xa, xb = _as_sample(a, "a"), _as_sample(b, "b")
    if xa.size != xb.size:
        raise ValueError(
            f"paired difference needs a and b of the same length (paired by seed), got len(a)={xa.size}, "
            f"len(b)={xb.size}"
        )
    return _one_sample_interval(xa - xb, _mean, confidence, n_resamples, seed)


def _prob_improvement(x: NDArray[np.float64], y: NDArray[np.float64], axis: int = -1) -> NDArray[np.float64]:
    """``(1/(N·M)) Σ_i Σ_j S(x_i, y_j)`` along ``axis`` (the other axes broadcast, as scipy's batches)."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    y = np.moveaxis(np.asarray(y), axis, -1)
    xi, yj = x[..., :, None], y[..., None, :]
    s = (xi > yj).astype(np.float64) + 0.5 * (xi == yj)
    return s.mean(axis=(-2, -1))


def probability_of_improvement(
    a: ArrayLike, b: ArrayLike, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Probability that a run of method ``a`` beats a run of method ``b`` (rliable, for one task):

    ``P(X > Y) = (1/(N·M)) Σ_{i=1}^{N} Σ_{j=1}^{M} S(a_i, b_j)``, with ``S(x, y) = 1`` if ``x > y``, ``1/2`` if
    ``x = y`` and ``0`` otherwise (the Mann–Whitney U statistic divided by ``N·M``).

    CI: percentile bootstrap resampling ``a`` and ``b`` independently (``scipy.stats.bootstrap`` with two
    samples, ``paired=False``). ``n = min(N, M)``; the bounds are ``None`` when ``n < 2``.
    """
    xa, xb = _as_sample(a, "a"), _as_sample(b, "b")
    _check_bootstrap_args(confidence, n_resamples)
    estimate = float(_prob_improvement(xa, xb))
    n = int(min(xa.size, xb.size))
    if n < 2:
        return Interval(estimate, None, None, n)
    if np.all(xa == xa[0]) and np.all(xb == xb[0]):  # every resample gives the same P
        return Interval(estimate, estimate, estimate, n)
    low, high = _bootstrap(
        (xa, xb), _prob_improvement, confidence, n_resamples, seed, elements_per_resample=int(xa.size * xb.size)
    )
    return Interval(estimate, low, high, n)


# --------------------------------------------------------------------------------------------------------------
# matched KL


def matched_kl(kl: ArrayLike, gold: ArrayLike, budgets: Sequence[float] | ArrayLike) -> list[float | None]:
    """Gold reward of one run at KL budgets, for comparing methods at matched KL.

    ``kl[k]``, ``gold[k]`` is the run's trajectory in evaluation order (training steps); it need not be
    monotone in KL. For each budget ``b``:

    - ``k`` = the FIRST index with ``kl[k] >= b`` (the first time the run reaches KL ``b``);
    - if ``kl[k] == b``: ``gold[k]``;
    - else (``k > 0``, and ``kl[k−1] < b`` since ``k`` is the first): linear interpolation between the last
      point below ``b`` and that first point at or above it,
      ``gold[k−1] + (b − kl[k−1]) / (kl[k] − kl[k−1]) · (gold[k] − gold[k−1])``;
    - ``None`` when the run never reaches ``b`` (no extrapolation) or when ``b`` is below the first point's KL
      (``k == 0`` and ``kl[0] > b``). The first point is usually KL 0, so budget 0 gives ``gold[0]``.

    ``kl`` and ``gold`` must have the same nonzero length and ``kl`` must be finite: ValueError otherwise.
    """
    k_arr = np.asarray(kl, dtype=np.float64)
    g_arr = np.asarray(gold, dtype=np.float64)
    if k_arr.ndim != 1 or g_arr.ndim != 1:
        raise ValueError(f"kl and gold must be one-dimensional, got shapes {k_arr.shape} and {g_arr.shape}")
    if k_arr.size != g_arr.size:
        raise ValueError(f"kl and gold must have the same length, got len(kl)={k_arr.size}, len(gold)={g_arr.size}")
    if k_arr.size == 0:
        raise ValueError("matched_kl needs a trajectory with at least one point")
    if not np.all(np.isfinite(k_arr)):
        raise ValueError(f"kl has non-finite entries: {k_arr.tolist()}")
    out: list[float | None] = []
    for b in np.asarray(budgets, dtype=np.float64).reshape(-1):
        reached = np.flatnonzero(k_arr >= b)
        if reached.size == 0:
            out.append(None)
            continue
        k = int(reached[0])
        if k_arr[k] == b:
            out.append(float(g_arr[k]))
        elif k == 0:
            out.append(None)
        else:
            t = (b - k_arr[k - 1]) / (k_arr[k] - k_arr[k - 1])
            out.append(float(g_arr[k - 1] + t * (g_arr[k] - g_arr[k - 1])))
    return out


# --------------------------------------------------------------------------------------------------------------
# Gao et al. 2022 curves


@dataclass(frozen=True)
class CurveFit:
    """A least-squares fit of one of Gao et al. (2022)'s gold-reward-gain forms, ``d = √KL``.

    ``r2 = 1 − SS_res / SS_tot`` on the fitted points (``nan`` when ``SS_tot == 0``).
    """

    form: str
    alpha: float
    beta: float
    r2: float
    n_points: int

    def predict(self, d: ArrayLike) -> NDArray[np.float64]:
        """The fitted gain at ``d`` (``R(0) = 0`` for both forms; the RL form uses ``lim d log d = 0``)."""
        x = np.asarray(d, dtype=np.float64)
        if self.form == BEST_OF_N_FORM:
            return x * (self.alpha - self.beta * x)
        if self.form == RL_FORM:
            with np.errstate(divide="ignore", invalid="ignore"):
                d_log_d = np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), np.where(x == 0, 0.0, np.nan))
            return self.alpha * x - self.beta * d_log_d
        raise ValueError(f"unknown form {self.form!r}")

    def to_dict(self) -> dict:
        """``{"form", "alpha", "beta", "r2", "n_points"}``; ``r2`` is ``None`` where it is nan (JSON has no nan)."""
        return {
            "form": self.form,
            "alpha": self.alpha,
            "beta": self.beta,
            "r2": _none_if_nan(self.r2),
            "n_points": self.n_points,
        }


def _fit(
    form: str,
    d: ArrayLike,
    gain: ArrayLike,
    features: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    positive_only: bool,
) -> CurveFit:
    x = np.asarray(d, dtype=np.float64).reshape(-1)
    y = np.asarray(gain, dtype=np.float64).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"d and gain must have the same length, got len(d)={x.size}, len(gain)={y.size}")
    finite = np.isfinite(x) & np.isfinite(y)
    if np.any(x[finite] < 0):
        raise ValueError(f"d = sqrt(KL) must be >= 0, got {x[finite & (x < 0)].tolist()}")
    keep = finite & (x > 0) if positive_only else finite
    x, y = x[keep], y[keep]
    name = form.split(":")[0]
    if x.size < 2:
        raise ValueError(f"{name} fit needs at least 2 usable points, got {x.size}")
    a = features(x)
    coef, _, rank, _ = np.linalg.lstsq(a, y, rcond=None)
    if rank < 2:
        raise ValueError(f"{name} fit needs at least 2 points with distinct d > 0, got d={x.tolist()}")
    residual = y - a @ coef
    ss_res = float(residual @ residual)
    centred = y - y.mean()
    ss_tot = float(centred @ centred)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return CurveFit(form=form, alpha=float(coef[0]), beta=float(coef[1]), r2=r2, n_points=int(x.size))


def fit_best_of_n(d: ArrayLike, gain: ArrayLike) -> CurveFit:
    """Fit Gao et al. (2022)'s best-of-n form ``R(d) = d(α − βd)``, ``d = √KL``, by least squares.

    ``gain`` is the gold-reward gain over the starting policy (``R(0) = 0``). The form is linear in ``(α, β)``
    with features ``d`` and ``−d²``: ``min_{α,β} Σ_k (gain_k − α d_k + β d_k²)²`` (``numpy.linalg.lstsq``).
    Non-finite points are left out; a negative ``d``, or fewer than 2 usable points (with distinct ``d > 0``),
    raises ValueError.
    """
    return _fit(BEST_OF_N_FORM, d, gain, lambda x: np.column_stack([x, -x * x]), positive_only=False)


def fit_rl(d: ArrayLike, gain: ArrayLike) -> CurveFit:
    """Fit Gao et al. (2022)'s RL form ``R(d) = d(α − β log d)``, ``d = √KL``, by least squares.

    ``gain`` is the gold-reward gain over the starting policy. The form is linear in ``(α, β)`` with features
    ``d`` and ``−d log d``: ``min_{α,β} Σ_k (gain_k − α d_k + β d_k log d_k)²`` (``numpy.linalg.lstsq``).
    Points with ``d <= 0`` (``log 0``) and non-finite points are left out; a negative ``d``, or fewer than 2
    usable points (with distinct ``d``), raises ValueError.
    """
    return _fit(RL_FORM, d, gain, lambda x: np.column_stack([x, -x * np.log(x)]), positive_only=True)
