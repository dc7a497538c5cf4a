"""alignkit.stats: intervals over seeds, paired comparisons, matched KL and Gao et al.'s curve fits, checked
against hand-computed values (arithmetic in the comments) or an independent simple computation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as scipy_stats

from alignkit.stats import (
    BEST_OF_N_FORM,
    RL_FORM,
    CurveFit,
    Interval,
    fit_best_of_n,
    fit_rl,
    iqm,
    iqm_ci,
    matched_kl,
    mean_ci,
    paired_difference_ci,
    probability_of_improvement,
)

# ---------------------------------------------------------------------------------------------------- IQM / mean


def test_iqm_hand_computed():
    # 8 values: floor(8/4) = 2 cut each side; sorted 1 2 | 3 4 5 6 | 7 100 -> (3+4+5+6)/4 = 4.5
    assert iqm([100, 3, 1, 6, 4, 2, 7, 5]) == pytest.approx(4.5)
    # 4 values: 1 cut each side; 1 | 2 3 | 10 -> 2.5
    assert iqm([10, 1, 3, 2]) == pytest.approx(2.5)
    # 5 values: floor(5/4) = 1 cut each side; 1 | 2 3 4 | 50 -> 9/3 = 3
    assert iqm([50, 4, 1, 3, 2]) == pytest.approx(3.0)
    # 3 values: floor(3/4) = 0 cut -> plain mean 2
    assert iqm([1, 2, 3]) == pytest.approx(2.0)


def test_mean_ci_estimate_and_bounds():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]  # mean = 20/5 = 4
    ci = mean_ci(values)
    assert isinstance(ci, Interval)
    assert ci.estimate == pytest.approx(4.0)
    assert ci.n == 5
    assert min(values) <= ci.low < ci.estimate < ci.high <= max(values)
    assert ci.to_dict() == {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n": 5}


def test_mean_ci_two_values_hand_computed():
    # Resampling 2 from {0, 1}: the mean is 0 w.p. 1/4, 0.5 w.p. 1/2, 1 w.p. 1/4.
    # 95 %: the 2.5 % quantile is 0 and the 97.5 % quantile is 1 -> [0, 1].
    ci = mean_ci([0.0, 1.0], n_resamples=10_000, seed=3)
    assert (ci.estimate, ci.low, ci.high, ci.n) == (0.5, 0.0, 1.0, 2)
    # 40 %: quantiles 0.30 and 0.70 both fall in the 0.5 atom (P(0) = .25 < .30, P(<= .5) = .75 > .70).
    ci40 = mean_ci([0.0, 1.0], confidence=0.4, n_resamples=10_000, seed=3)
    assert (ci40.low, ci40.high) == (0.5, 0.5)


def test_mean_ci_matches_simple_bootstrap():
    # An independent, plain numpy percentile bootstrap of the mean agrees up to Monte Carlo error.
    values = np.array([0.3, 1.1, 2.0, 2.2, 3.9, 4.4, 5.0, 7.5])
    rng = np.random.default_rng(123)
    idx = rng.integers(0, values.size, size=(40_000, values.size))
    means = values[idx].mean(axis=1)
    ref_low, ref_high = np.percentile(means, [2.5, 97.5])
    ci = mean_ci(values, n_resamples=20_000)
    assert ci.low == pytest.approx(ref_low, abs=0.1)
    assert ci.high == pytest.approx(ref_high, abs=0.1)


def test_iqm_ci():
    values = [100, 3, 1, 6, 4, 2, 7, 5]
    ci = iqm_ci(values)
    assert ci.estimate == pytest.approx(4.5)
    assert ci.n == 8
    assert min(values) <= ci.low <= ci.estimate <= ci.high <= max(values)


def test_single_value_has_no_interval():
    for fn in (mean_ci, iqm_ci):
        ci = fn([2.5])
        assert (ci.estimate, ci.low, ci.high, ci.n) == (2.5, None, None, 1)
        assert ci.to_dict() == {"estimate": 2.5, "low": None, "high": None, "n": 1}


def test_all_equal_gives_point_interval_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (mean_ci, iqm_ci):
            ci = fn([1.25, 1.25, 1.25, 1.25])
            assert (ci.estimate, ci.low, ci.high, ci.n) == (1.25, 1.25, 1.25, 4)


def test_deterministic_for_a_seed():
    values = [0.1, 0.7, 0.2, 0.9, 0.4, 0.55]
    assert mean_ci(values, seed=7) == mean_ci(values, seed=7)
    assert iqm_ci(values, seed=7) == iqm_ci(values, seed=7)
    assert probability_of_improvement(values, [0.3, 0.5, 0.6], seed=7) == probability_of_improvement(
        values, [0.3, 0.5, 0.6], seed=7
    )
    # another seed draws other resamples
    assert mean_ci(values, seed=7) != mean_ci(values, seed=8)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])
    with pytest.raises(ValueError, match="empty"):
        iqm([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


# ---------------------------------------------------------------------------------------------- paired / P(X > Y)


def test_paired_difference_hand_computed():
    # differences 1-0, 2-2, 3-1 = [1, 0, 2] -> mean 1.0; every resampled mean lies in [0, 2]
    ci = paired_difference_ci([1, 2, 3], [0, 2, 1])
    assert ci.estimate == pytest.approx(1.0)
    assert ci.n == 3
    assert 0.0 <= ci.low <= 1.0 <= ci.high <= 2.0


def test_paired_difference_uses_the_pairing():
    # a_i - b_i = 0.5 for every seed: the paired CI is the point [0.5, 0.5], although the two methods'
    # own intervals overlap widely (seed-to-seed spread 1..4).
    a, b = [1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5]
    ci = paired_difference_ci(a, b)
    assert (ci.estimate, ci.low, ci.high, ci.n) == (0.5, 0.5, 0.5, 4)
    assert mean_ci(a).low < mean_ci(b).high


def test_paired_difference_length_mismatch():
    with pytest.raises(ValueError, match=r"len\(a\)=3.*len\(b\)=2"):
        paired_difference_ci([1, 2, 3], [1, 2])


def test_probability_of_improvement_hand_computed():
    # S: (1 > 1.5) = 0, (1 > 0) = 1, (2 > 1.5) = 1, (2 > 0) = 1 -> 3/4
    p = probability_of_improvement([1, 2], [1.5, 0])
    assert p.estimate == pytest.approx(0.75)
    assert p.n == 2
    assert 0.0 <= p.low <= p.estimate <= p.high <= 1.0


def test_probability_of_improvement_ties_count_half():
    # S: (1,1) = 1/2, (1,2) = 0, (2,1) = 1, (2,2) = 1/2 -> 2/4 = 0.5
    assert probability_of_improvement([1, 2], [1, 2]).estimate == pytest.approx(0.5)
    # a = [3, 3], b = [3, 1, 5]: per a_i, S(3,3) + S(3,1) + S(3,5) = 1/2 + 1 + 0 = 1.5;
    # two a_i -> 3 / (2*3) = 0.5
    assert probability_of_improvement([3, 3], [3, 1, 5]).estimate == pytest.approx(0.5)


def test_probability_of_improvement_matches_mann_whitney():
    rng = np.random.default_rng(0)
    a = np.round(rng.normal(0.3, 1.0, size=7), 1)  # rounded: some ties
    b = np.round(rng.normal(0.0, 1.0, size=9), 1)
    u = scipy_stats.mannwhitneyu(a, b, alternative="two-sided").statistic  # U of a, ties counted 1/2
    p = probability_of_improvement(a, b)
    assert p.estimate == pytest.approx(u / (7 * 9))
    assert p.n == 7
    assert 0.0 <= p.low <= p.estimate <= p.high <= 1.0
    # P(a > b) + P(b > a) = 1
    assert probability_of_improvement(b, a).estimate == pytest.approx(1.0 - p.estimate)


def test_probability_of_improvement_degenerate_and_single():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # every a beats every b in every resample -> [1, 1]
        p = probability_of_improvement([5.0, 6.0, 7.0], [1.0, 2.0])
        assert (p.estimate, p.low, p.high, p.n) == (1.0, 1.0, 1.0, 2)
        q = probability_of_improvement([2.0, 2.0], [2.0, 2.0, 2.0])
        assert (q.estimate, q.low, q.high) == (0.5, 0.5, 0.5)
    single = probability_of_improvement([1.0], [0.0, 2.0])
    assert (single.estimate, single.low, single.high, single.n) == (0.5, None, None, 1)


# ------------------------------------------------------------------------------------------------------ matched KL


def test_matched_kl_interpolation():
    # budget 0: kl[0] = 0 -> gold 0; 0.5: between (0, 0) and (1, 2) -> 1; 2: between (1, 2) and (3, 4),
    # t = 1/2 -> 3; 3: exactly kl[2] -> 4; 5: never reached -> None
    assert matched_kl([0, 1, 3], [0, 2, 4], [0, 0.5, 2, 3, 5]) == [0.0, 1.0, 3.0, 4.0, None]


def test_matched_kl_first_crossing_of_a_non_monotone_trajectory():
    kl, gold = [0, 2, 1, 4], [0, 10, 6, 20]
    out = matched_kl(kl, gold, [1, 1.5, 3])
    # 1: first point with kl >= 1 is index 1 (kl 2), from (0, 0): t = 1/2 -> 5 (not index 2's gold 6)
    # 1.5: same segment, t = 3/4 -> 7.5
    # 3: first point with kl >= 3 is index 3 (kl 4), from the last point below, index 2 (1, 6):
    #    t = (3-1)/(4-1) = 2/3 -> 6 + 2/3 * 14 = 15.333...
    assert out == pytest.approx([5.0, 7.5, 6 + 28 / 3])


def test_matched_kl_budget_below_the_first_point():
    # the trajectory starts at kl 0.5: budget 0 is before it -> None; 0.5 -> 1; 0.75 -> t = 1/2 -> 1.5
    assert matched_kl([0.5, 1.0], [1.0, 2.0], [0.0, 0.5, 0.75]) == [None, 1.0, 1.5]


def test_matched_kl_bad_input():
    with pytest.raises(ValueError, match="same length"):
        matched_kl([0, 1], [0], [0.5])
    with pytest.raises(ValueError):
        matched_kl([], [], [0.5])


# ------------------------------------------------------------------------------------------------------ curve fits


def test_fit_best_of_n_recovers_exact_parameters():
    n = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256])
    kl = np.log(n) - (n - 1) / n  # KL of best-of-n
    d = np.sqrt(kl)
    gain = d * (1.5 - 0.4 * d)
    fit = fit_best_of_n(d, gain)
    assert isinstance(fit, CurveFit)
    assert fit.form == BEST_OF_N_FORM == "best_of_n: R = d(α − βd)"
    assert fit.alpha == pytest.approx(1.5, abs=1e-6)
    assert fit.beta == pytest.approx(0.4, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n_points == 9  # d = 0 (n = 1) is a valid point for this form
    np.testing.assert_allclose(fit.predict(d), gain, atol=1e-9)
    assert fit.to_dict()["form"] == BEST_OF_N_FORM


def test_fit_rl_recovers_exact_parameters():
    d = np.array([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(d > 0, d * (1.5 - 0.4 * np.log(np.where(d > 0, d, 1.0))), 0.0)
    fit = fit_rl(d, gain)
    assert fit.form == RL_FORM == "rl: R = d(α − β log d)"
    assert fit.alpha == pytest.approx(1.5, abs=1e-6)
    assert fit.beta == pytest.approx(0.4, abs=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.n_points == 7  # d = 0 left out (log 0)
    np.testing.assert_allclose(fit.predict(d), gain, atol=1e-9)
    assert fit.predict(0.0) == 0.0  # lim d log d = 0


def test_fits_two_points_hand_solved():
    # best-of-n through (1, 1) and (2, 1): α − β = 1, 2α − 4β = 1 -> β = 1/2, α = 3/2.
    # gain is constant -> SS_tot = 0 -> r2 nan (None in to_dict)
    fit = fit_best_of_n([1.0, 2.0], [1.0, 1.0])
    assert (fit.alpha, fit.beta) == (pytest.approx(1.5), pytest.approx(0.5))
    assert math.isnan(fit.r2)
    assert fit.to_dict() == {"form": BEST_OF_N_FORM, "alpha": fit.alpha, "beta": fit.beta, "r2": None,
                             "n_points": 2}
    # rl through (1, 2) and (e, e): α = 2 (log 1 = 0), e(α − β) = e -> β = 1
    fit = fit_rl([1.0, math.e], [2.0, math.e])
    assert (fit.alpha, fit.beta) == (pytest.approx(2.0), pytest.approx(1.0))


def test_fits_match_curve_fit_on_noisy_points():
    rng = np.random.default_rng(1)
    d = np.linspace(0.2, 3.0, 15)
    gain = d * (1.2 - 0.3 * d) + rng.normal(0, 0.05, d.size)
    for fit_fn, model in (
        (fit_best_of_n, lambda x, a, b: x * (a - b * x)),
        (fit_rl, lambda x, a, b: x * (a - b * np.log(x))),
    ):
        fit = fit_fn(d, gain)
        (alpha, beta), _ = optimize.curve_fit(model, d, gain, p0=[1.0, 0.1])
        assert fit.alpha == pytest.approx(alpha, rel=1e-5)
        assert fit.beta == pytest.approx(beta, rel=1e-5)
        resid = gain - model(d, alpha, beta)
        assert fit.r2 == pytest.approx(1 - resid @ resid / np.sum((gain - gain.mean()) ** 2), rel=1e-6)
        assert 0.0 < fit.r2 < 1.0


def test_fits_too_few_points():
    with pytest.raises(ValueError, match="at least 2"):
        fit_best_of_n([1.0], [0.5])
    with pytest.raises(ValueError, match="at least 2"):
        fit_rl([0.0, 1.0], [0.0, 0.5])  # d = 0 is left out -> one usable point
    with pytest.raises(ValueError, match="at least 2"):
        fit_best_of_n([0.0, 1.0], [0.0, 0.5])  # d = 0 carries no information: rank 1
    with pytest.raises(ValueError, match="same length"):
        fit_best_of_n([1.0, 2.0], [1.0])
