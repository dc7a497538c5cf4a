"""Reward aggregation, combination and normalisation against hand-computed values.

Ensemble example, K = 3 members × B = 2 responses:
    column 0: 1, 2, 6 → mean 3, min 1, deviations -2, -1, 3, Σ dev² = 4 + 1 + 9 = 14,
              population var = 14/3 = 4.666667, std = 2.160247
    column 1: 4, 0, 2 → mean 2, min 0, deviations 2, -2, 0,  Σ dev² = 4 + 4 + 0 = 8,
              population var = 8/3 = 2.666667,  std = 1.632993
"""

import math

import pytest
import torch
from torch.testing import assert_close

from alignkit.rewards import RunningMoments, aggregate_ensemble, combine_rewards, normalize_rewards

SCORES = torch.tensor([[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]])


def test_aggregate_mean_and_min():
    assert_close(aggregate_ensemble(SCORES, "mean"), torch.tensor([3.0, 2.0]))
    assert_close(aggregate_ensemble(SCORES, "min"), torch.tensor([1.0, 0.0]))


def test_aggregate_uwo():
    # mean - 0.25·var: 3 - 0.25·4.666667 = 3 - 1.166667 = 1.833333; 2 - 0.25·2.666667 = 2 - 0.666667 = 1.333333
    assert_close(aggregate_ensemble(SCORES, "uwo", uncertainty_coef=0.25), torch.tensor([1.833333, 1.333333]))


def test_aggregate_mean_minus_std():
    # mean - 1·std: 3 - 2.160247 = 0.839753; 2 - 1.632993 = 0.367007
    assert_close(aggregate_ensemble(SCORES, "mean_minus_std"), torch.tensor([0.839753, 0.367007]))
    # λ = 0 leaves the mean
    assert_close(aggregate_ensemble(SCORES, "mean_minus_std", uncertainty_coef=0.0), torch.tensor([3.0, 2.0]))


def test_single_member_ensemble_has_zero_variance():
    single = torch.tensor([[0.5, -1.5]])
    for method in ("mean", "min", "uwo", "mean_minus_std"):
        assert_close(aggregate_ensemble(single, method, uncertainty_coef=3.0), torch.tensor([0.5, -1.5]))


def test_aggregate_invalid_arguments():
    with pytest.raises(ValueError, match="unknown ensemble method 'max'.*mean, min, uwo, mean_minus_std"):
        aggregate_ensemble(SCORES, "max")
    with pytest.raises(ValueError, match=r"K >= 1.*\(0, 2\)"):
        aggregate_ensemble(torch.zeros(0, 2), "mean")
    with pytest.raises(ValueError, match=r"\(K, B\)"):
        aggregate_ensemble(torch.zeros(3), "mean")
    with pytest.raises(ValueError, match="uncertainty_coef=-1.0"):
        aggregate_ensemble(SCORES, "uwo", uncertainty_coef=-1.0)


def test_combine_rewards():
    named = {"helpful": torch.tensor([1.0, 2.0]), "length": torch.tensor([10.0, -4.0])}
    total, parts = combine_rewards(named, {"helpful": 1.0, "length": -0.1})
    # helpful: 1·[1, 2] = [1, 2]; length: -0.1·[10, -4] = [-1, 0.4]; total [1 - 1, 2 + 0.4] = [0, 2.4]
    assert_close(parts["helpful"], torch.tensor([1.0, 2.0]))
    assert_close(parts["length"], torch.tensor([-1.0, 0.4]))
    assert_close(total, torch.tensor([0.0, 2.4]))
    assert list(parts) == ["helpful", "length"]


def test_combine_rewards_keeps_graph_for_total_only():
    score = torch.tensor([1.0, 2.0], requires_grad=True)
    total, parts = combine_rewards({"rm": score}, {"rm": 2.0})
    assert total.requires_grad and not parts["rm"].requires_grad
    total.sum().backward()
    assert_close(score.grad, torch.tensor([2.0, 2.0]))


def test_combine_rewards_mismatched_names():
    named = {"helpful": torch.zeros(2)}
    with pytest.raises(ValueError, match="no weight given for reward.*'helpful'"):
        combine_rewards(named, {"harmless": 1.0})
    with pytest.raises(ValueError, match="weight given for unknown reward.*'harmless'"):
        combine_rewards(named, {"helpful": 1.0, "harmless": 1.0})
    with pytest.raises(ValueError, match="same shape"):
        combine_rewards({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0, "b": 1.0})


def test_running_moments_match_concatenation():
    batches = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([4.0, 5.0, 6.0, 10.0])]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = torch.cat(batches)
    # n = 7, Σx = 31 → mean 31/7 = 4.428571; Σx² = 191, M2 = 191 - 961/7 = 53.714286
    # unbiased var = 53.714286 / 6 = 8.952381, std = 2.992053
    assert moments.count == 7.0
    assert_close(moments.mean, 31 / 7)
    assert_close(moments.m2, 191 - 961 / 7)
    assert_close(moments.std, 2.992053, rtol=1e-6, atol=1e-6)
    # the convention is torch's default, unbiased (Bessel-corrected) std
    assert_close(moments.mean, everything.double().mean().item())
    assert_close(moments.std, everything.double().std(unbiased=True).item())
    # (10 - 4.428571) / 2.992053 = 5.571429 / 2.992053 = 1.862076
    assert_close(moments.normalize(torch.tensor([10.0])), torch.tensor([1.862076]))


def test_running_moments_state_dict_round_trip():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 4.0]))
    state = moments.state_dict()
    assert all(isinstance(value, float) for value in state.values())
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    moments.update(torch.tensor([8.0]))
    restored.update(torch.tensor([8.0]))
    assert restored.state_dict() == moments.state_dict()
    with pytest.raises(ValueError, match="keys"):
        restored.load_state_dict({"count": 1.0})


def test_running_moments_guards():
    moments = RunningMoments()
    with pytest.raises(ValueError, match="before any update"):
        moments.normalize(torch.zeros(2))
    moments.update(torch.zeros(0))  # empty batch: no-op
    assert moments.count == 0.0
    with pytest.raises(ValueError, match="non-finite"):
        moments.update(torch.tensor([1.0, math.nan]))
    assert moments.count == 0.0


def test_normalize_rewards_methods():
    scores = torch.tensor([1.0, 2.0, 3.0])
    assert_close(normalize_rewards(scores, "none"), scores)
    # batch: mean 2, unbiased var ((-1)² + 0 + 1²)/2 = 1 → [-1, 0, 1]
    assert_close(normalize_rewards(scores, "batch"), torch.tensor([-1.0, 0.0, 1.0]))
    running = RunningMoments()
    # first call sees only this batch → same as batch whitening
    assert_close(normalize_rewards(scores, "running", running), torch.tensor([-1.0, 0.0, 1.0]))
    # second call: stats over 1, 2, 3, 5 → mean 2.75, dev² 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75,
    # unbiased var 8.75/3 = 2.916667, std 1.707825; (5 - 2.75)/1.707825 = 1.317465
    assert_close(normalize_rewards(torch.tensor([5.0]), "running", running), torch.tensor([1.317465]))
    assert running.count == 4.0


def test_normalize_rewards_clipping():
    scores = torch.tensor([-5.0, 0.5, 3.0])
    # clamp to [-2, 2]
    assert_close(normalize_rewards(scores, "none", clip=2.0), torch.tensor([-2.0, 0.5, 2.0]))
    # batch: mean -0.5, unbiased var (4.5² + 1² + 3.5²)/2 = (20.25 + 1 + 12.25)/2 = 16.75, std 4.092676
    # → [-4.5, 1, 3.5] / 4.092676 = [-1.099525, 0.244339, 0.855186], clipped to ±1 → [-1, 0.244339, 0.855186]
    assert_close(normalize_rewards(scores, "batch", clip=1.0), torch.tensor([-1.0, 0.244339, 0.855186]))


def test_normalize_rewards_invalid_arguments():
    with pytest.raises(ValueError, match="unknown normalisation method 'zscore'"):
        normalize_rewards(torch.zeros(2), "zscore")
    with pytest.raises(ValueError, match="running=None"):
        normalize_rewards(torch.zeros(2), "running")
    with pytest.raises(ValueError, match="clip=0.0"):
        normalize_rewards(torch.zeros(2), "none", clip=0.0)
