"""The critic-free policy-gradient family (``alignkit_plugins.pg``) on hand-computed values: every advantage
estimator, every policy loss and its gradient, the KL loss, DAPO's overlong shaping and dynamic sampling, and the
split-invariance of the loss aggregation. No model is needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from alignkit.aggregation import StepMean
from alignkit.types import PromptBatch, Rollout
from alignkit_plugins.pg import DAPO, GRPO, PolicyGradient, ReMax
from alignkit_plugins.pg.advantages import (
    broadcast,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    token_returns,
    token_rewards,
)
from alignkit_plugins.pg.losses import cispo_loss, decoupled_clip_loss, gspo_loss, kl_loss, ppo_clip_loss
from alignkit_plugins.pg.shaping import group_rows, informative_groups, overlong_penalty

close = torch.testing.assert_close
S3 = math.sqrt(3.0)
# two prompts, k = 3 samples each
REWARDS = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])


# ------------------------------------------------------------------------------------------ advantages
def test_grpo_normalises_by_the_group_mean_and_sample_std():
    # prompt 1: mean 2, sample std 1 -> (−1, 0, 1)
    # prompt 2: mean 4/3, sample var ((4/3)² + (4/3)² + (8/3)²)/2 = 16/3, std 4/√3 -> (−1/√3, −1/√3, 2/√3)
    expected = torch.tensor([-1.0, 0.0, 1.0, -1 / S3, -1 / S3, 2 / S3])
    close(grpo_advantages(REWARDS, 3), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(grpo_advantages(torch.ones(4), 2), torch.zeros(4))  # equal rewards: no signal


def test_dr_grpo_subtracts_the_group_mean_only():
    # prompt 1: 1−2, 2−2, 3−2; prompt 2: 0 − 4/3 (twice), 4 − 4/3
    close(dr_grpo_advantages(REWARDS, 3), torch.tensor([-1.0, 0.0, 1.0, -4 / 3, -4 / 3, 8 / 3]))


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # prompt 1: 1 − (2+3)/2 = −1.5, 2 − (1+3)/2 = 0, 3 − (1+2)/2 = 1.5; prompt 2: 0 − 2 (twice), 4 − 0
    close(rloo_advantages(REWARDS, 3), torch.tensor([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0]))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(REWARDS, 1)
    with pytest.raises(ValueError, match="groups of k = 4"):
        grpo_advantages(REWARDS, 4)


def test_token_rewards_and_returns_spread_the_kl_over_tokens():
    # r = [−β·0.1, −β·0.2 + 1] with β = 0.5 -> [−0.05, 0.9]; returns [0.85, 0.9]; padding stays 0
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 7.0]]), mask, kl_coef=0.5)
    close(rewards, torch.tensor([[-0.05, 0.9, 0.0]]))
    close(token_returns(rewards, mask), torch.tensor([[0.85, 0.9, 0.0]]))
    close(token_returns(rewards, mask, gamma=0.5), torch.tensor([[-0.05 + 0.45, 0.9, 0.0]]))


def test_reinforce_pp_whitens_the_return_over_the_batch():
    # scores [1, −1], lengths 2 and 1, no KL: returns [[1, 1], [−1, ·]]; over the 3 real tokens mean 1/3,
    # unbiased var ((2/3)² + (2/3)² + (4/3)²)/2 = 4/3, std 2/√3 -> [[1/√3, 1/√3], [−2/√3, 0]]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, -1.0]), None, mask)
    close(reinforce_pp_advantages(rewards, mask), torch.tensor([[1 / S3, 1 / S3], [-2 / S3, 0.0]]),
          rtol=1e-5, atol=1e-5)


def test_reinforce_pp_baseline_subtracts_the_group_mean_then_whitens():
    # one group of k = 2, scores [1, 3]: returns [[1, 1], [3, ·]], baseline 2 -> [[−1, −1], [1, ·]]; mean −1/3,
    # var ((2/3)² + (2/3)² + (4/3)²)/2 = 4/3 -> [[−1/√3, −1/√3], [2/√3, 0]]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 3.0]), None, mask)
    close(reinforce_pp_baseline_advantages(rewards, mask, k=2), torch.tensor([[-1 / S3, -1 / S3], [2 / S3, 0.0]]),
          rtol=1e-5, atol=1e-5)


def test_remax_subtracts_the_greedy_reward_of_the_prompt():
    # k = 2: prompt 1 greedy 0.5 -> [1 − 0.5, 0.5 − 0.5]; prompt 2 greedy 1 -> [2 − 1, −1 − 1]
    close(remax_advantages(torch.tensor([1.0, 0.5, 2.0, -1.0]), torch.tensor([0.5, 1.0]), k=2),
          torch.tensor([0.5, 0.0, 1.0, -2.0]))
    close(remax_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0.25, 0.5])), torch.tensor([0.75, -0.5]))


def test_broadcast_puts_the_sequence_advantage_on_its_real_tokens():
    close(broadcast(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]])),
          torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ------------------------------------------------------------------------------------------ losses
def leaf(values) -> torch.Tensor:
    return torch.tensor(values, requires_grad=True)


def test_ppo_clip_stops_the_gradient_beyond_the_clip_range():
    # ratio e^0.5 ≈ 1.65 > 1.2 with A = 2: the clipped term 1.2·2 is the minimum, constant in π
    logprobs = leaf([[0.5]])
    terms = ppo_clip_loss(logprobs, torch.zeros(1, 1), torch.tensor([[2.0]]), torch.ones(1, 1), 0.2)
    close(terms.loss, torch.tensor(-2.4))
    assert float(terms.clipfrac) == 1.0 and float(terms.units) == 1.0
    terms.loss.backward()
    assert float(logprobs.grad) == 0.0


def test_dapo_clip_higher_is_asymmetric():
    # token 1: ratio 1.25, A = +1; token 2: ratio 0.75, A = −1; token-mean over the 2 tokens.
    lp = [[math.log(1.25), math.log(0.75)]]
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # symmetric ε = 0.2: token 1 clipped at 1.2, token 2 at 0.8 -> L = −(1.2·1 + 0.8·(−1))/2 = −0.2, no gradient
    logprobs = leaf(lp)
    sym = ppo_clip_loss(logprobs, old, adv, mask, 0.2)
    close(sym.loss, torch.tensor(-0.2))
    sym.loss.backward()
    close(logprobs.grad, torch.zeros(1, 2))
    assert float(sym.clipfrac) == 1.0
    # ε_low 0.2, ε_high 0.28: 1.25 < 1.28 is kept -> L = −(1.25 − 0.8)/2 = −0.225; ∂L/∂log π_1 = −ρ·A/2 = −0.625
    logprobs = leaf(lp)
    dapo = decoupled_clip_loss(logprobs, old, adv, mask, clip_low=0.2, clip_high=0.28)
    close(dapo.loss, torch.tensor(-0.225))
    dapo.loss.backward()
    close(logprobs.grad, torch.tensor([[-0.625, 0.0]]))
    assert float(dapo.clipfrac) == 0.5


def test_gspo_uses_the_length_normalised_sequence_ratio():
    # sequence 1: log-ratios [0.1, 0.3] -> s1 = exp(0.2); sequence 2: [−0.1] -> s2 = exp(−0.1); A = [1, −1]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    old = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    lp = (old + torch.tensor([[0.1, 0.3], [-0.1, 0.0]])) * mask
    adv = broadcast(torch.tensor([1.0, -1.0]), mask)
    s1, s2 = math.exp(0.2), math.exp(-0.1)
    # no clipping at ε = 0.3; seq-mean-token-mean: L = −(s1·1 + s2·(−1))/2
    logprobs = leaf(lp.tolist())
    terms = gspo_loss(logprobs, old, adv, mask, 0.3, 0.3)
    close(terms.loss, torch.tensor(-(s1 - s2) / 2))
    close(terms.ratio_mean, torch.tensor((s1 + s2) / 2))
    assert float(terms.units) == 2.0
    # ∂L/∂log π_it = −(1/G)·s_i·A_i/|y_i|: sequence 1 −s1/4 on each token, sequence 2 +s2/2, padding 0
    terms.loss.backward()
    close(logprobs.grad, torch.tensor([[-s1 / 4, -s1 / 4], [s2 / 2, 0.0]]))
    # ε = 0.1: s1 ≈ 1.22 > 1.1 with A > 0 clips the whole of sequence 1 (see the next test for a token whose own
    # ratio is inside the range)
    logprobs = leaf(lp.tolist())
    clipped = gspo_loss(logprobs, old, adv, mask, 0.1, 0.1)
    clipped.loss.backward()
    close(logprobs.grad, torch.tensor([[0.0, 0.0], [s2 / 2, 0.0]]))  # s2 ≈ 0.905 ≥ 0.9: not clipped
    close(clipped.clipfrac, torch.tensor(2 / 3))


def test_gspo_clips_sequences_not_tokens():
    # one sequence with token log-ratios [0.05, 0.35]: s = exp(0.2) ≈ 1.22 > 1.1 -> every token clipped,
    # although the first token's own ratio exp(0.05) ≈ 1.05 is inside [0.9, 1.1]
    logprobs = leaf([[0.05, 0.35]])
    mask, adv = torch.ones(1, 2), torch.ones(1, 2)
    gspo_loss(logprobs, torch.zeros(1, 2), adv, mask, 0.1, 0.1).loss.backward()
    close(logprobs.grad, torch.zeros(1, 2))
    logprobs = leaf([[0.05, 0.35]])
    ppo_clip_loss(logprobs, torch.zeros(1, 2), adv, mask, 0.1).loss.backward()
    close(logprobs.grad, torch.tensor([[-math.exp(0.05) / 2, 0.0]]))


def test_cispo_gradient_is_the_clipped_weight_times_grad_log_prob():
    # ratios [1.5, 0.5], A = [2, 1], ε_low = 1 (no lower bound), ε_high = 0.28: weights w = [1.28, 0.5]
    # L = −(1.28·2·log 1.5 + 0.5·1·log 0.5)/2; ∂L/∂log π = −w·A/2 = [−1.28, −0.25] (clipped tokens keep a gradient)
    logprobs = leaf([[math.log(1.5), math.log(0.5)]])
    terms = cispo_loss(logprobs, torch.zeros(1, 2), torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), 1.0, 0.28)
    close(terms.loss, torch.tensor(-(1.28 * 2 * math.log(1.5) + 0.5 * math.log(0.5)) / 2))
    terms.loss.backward()
    close(logprobs.grad, torch.tensor([[-1.28, -0.25]]))
    assert float(terms.clipfrac) == 0.5


def test_kl_loss_k1_and_k3():
    # log π = [0, −1], log π_ref = [−0.5, −1]: k1 = [0.5, 0] -> 0.25;
    # k3 = e^{−0.5} − 1 + 0.5 ≈ 0.10653 and 0 -> 0.053265; ∂k3/∂log π = 1 − e^{ref − log π} -> (1 − e^{−0.5})/2
    ref, mask = torch.tensor([[-0.5, -1.0]]), torch.ones(1, 2)
    k1, units = kl_loss(leaf([[0.0, -1.0]]), ref, mask, "k1")
    close(k1, torch.tensor(0.25))
    assert float(units) == 2.0
    logprobs = leaf([[0.0, -1.0]])
    k3, _ = kl_loss(logprobs, ref, mask, "k3")
    close(k3, torch.tensor((math.exp(-0.5) - 0.5) / 2))
    k3.backward()
    close(logprobs.grad, torch.tensor([[(1 - math.exp(-0.5)) / 2, 0.0]]))


# ------------------------------------------------------------------------------------------ aggregation
LOSSES = {
    "ppo_clip": lambda lp, old, adv, m, agg: ppo_clip_loss(lp, old, adv, m, 0.2, agg),
    "dapo": lambda lp, old, adv, m, agg: decoupled_clip_loss(lp, old, adv, m, 0.2, 0.28, agg),
    "gspo": lambda lp, old, adv, m, agg: gspo_loss(lp, old, adv, m, 0.1, 0.1, agg),
    "cispo": lambda lp, old, adv, m, agg: cispo_loss(lp, old, adv, m, 1.0, 0.28, agg),
}


def step_gradient(theta, old, adv, mask, loss_fn, aggregation, splits):
    """The host's gradient of one optimiser step over ``splits`` micro-batches (``alignkit.aggregation.StepMean``)."""
    theta.grad = None
    step = StepMean()
    for rows in torch.arange(theta.shape[0]).tensor_split(splits):
        out = loss_fn(theta[rows], old[rows], adv[rows], mask[rows], aggregation)
        (step.backward_loss(out.loss, out.units, parts=splits, world=1) / splits).backward()
    step.rescale([theta], world=1, reduce_sum=lambda t: t, device=theta.device)
    return theta.grad.clone()


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_micro_batches_give_the_gradient_of_one_batch(loss, aggregation):
    torch.manual_seed(0)
    lengths = torch.tensor([6, 1, 1, 3])  # very unequal: a mean of means would weigh the short rows up
    mask = (torch.arange(6)[None, :] < lengths[:, None]).float()
    old = -torch.rand(4, 6) * mask
    theta = (old + 0.3 * torch.randn(4, 6) * mask).requires_grad_(True)
    adv = broadcast(torch.tensor([1.0, -2.0, 0.5, 1.5]), mask)
    whole = step_gradient(theta, old, adv, mask, LOSSES[loss], aggregation, 1)
    for splits in (2, 4):
        close(step_gradient(theta, old, adv, mask, LOSSES[loss], aggregation, splits), whole, rtol=1e-6, atol=1e-7)
    if aggregation == "token-mean":  # the test has teeth: the mean of the micro-batches' means differs
        theta.grad = None
        for rows in torch.arange(4).tensor_split(2):
            (LOSSES[loss](theta[rows], old[rows], adv[rows], mask[rows], aggregation).loss / 2).backward()
        assert not torch.allclose(theta.grad, whole)


# ------------------------------------------------------------------------------------------ DAPO shaping
def test_overlong_penalty_falls_linearly_over_the_cache():
    # L_max 20, L_cache 4: free up to 16 tokens, then (16 − |y|)/4, −1 beyond 20
    close(overlong_penalty(torch.tensor([10, 16, 17, 20, 21]), 20, 4), torch.tensor([0.0, 0.0, -0.25, -1.0, -1.0]))
    close(overlong_penalty(torch.tensor([18]), 20, 4, factor=0.5), torch.tensor([-0.25]))
    with pytest.raises(ValueError, match="cache length"):
        overlong_penalty(torch.tensor([1]), 20, 0)


def test_informative_groups_and_their_rows():
    keep = informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert keep.tolist() == [False, True, False]
    assert group_rows(torch.tensor([True, False, True]), 2).tolist() == [0, 1, 4, 5]


def fake_rollout(n: int, P: int = 2, R: int = 3, seed: int = 0, k: int = 4) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, R + 1, (n,), generator=g)
    response_mask = (torch.arange(R)[None, :] < lengths[:, None]).long()
    sequences = torch.randint(3, 50, (n, P + R), generator=g) * torch.cat([torch.ones(n, P, dtype=torch.long),
                                                                           response_mask], 1)
    attention_mask = torch.cat([torch.ones(n, P, dtype=torch.long), response_mask], 1)
    return Rollout(sequences=sequences, attention_mask=attention_mask,
                   response_mask=response_mask, logprobs=-torch.rand(n, R, generator=g) * response_mask,
                   ended=torch.ones(n, dtype=torch.bool), prompt_length=P, prompts=[f"p{i // k}" for i in range(n)],
                   responses=[f"r{i}" for i in range(n)])


class FakeHost:
    """The parts of the host that dynamic sampling uses: a rollout engine and the combined reward, here binary
    rewards with many all-equal groups, all on one process."""

    def __init__(self, k: int, p_one: float = 0.2):
        self.k, self.p_one, self.calls = k, p_one, 0
        self.device = torch.device("cpu")
        self.tokenizer = SimpleNamespace(pad_token_id=0)
        self.pm = SimpleNamespace(hook=SimpleNamespace(alignkit_rollout=self.rollout))
        self.generator = torch.Generator().manual_seed(1)

    def rollout(self, module, batch: PromptBatch) -> Rollout:
        self.calls += 1
        out = fake_rollout(batch.input_ids.shape[0], P=batch.input_ids.shape[1], R=2 + self.calls % 3, seed=self.calls)
        out.prompts = list(batch.prompts)
        return out

    def score(self, rollout: Rollout):
        scores = (torch.rand(rollout.sequences.shape[0], generator=self.generator) < self.p_one).float()
        return scores, {}

    def reduce_sum(self, tensor):
        return tensor


@pytest.mark.parametrize("tries", [1, 3, 50])
def test_dynamic_sampling_never_yields_a_group_of_equal_rewards(tries):
    k, groups = 4, 6
    algorithm = DAPO(samples_per_prompt=k, max_sampling_tries=tries)
    host = FakeHost(k)
    rollout = fake_rollout(groups * k)
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0] + [0.0] * 16)  # only group 1 is informative
    rollout_out, scores_out, stats = algorithm.refill(host, rollout, scores)
    n = scores_out.shape[0]
    assert n % k == 0 and n // k <= groups and rollout_out.sequences.shape[0] == n == len(rollout_out.prompts)
    assert bool(informative_groups(scores_out, k).all())
    assert stats["dynamic_sampling/tries"] <= tries and stats["dynamic_sampling/kept_groups"] == n // k
    assert stats["dynamic_sampling/dropped_groups"] >= 5  # the first rollout's five equal groups
    if tries == 1:
        assert n == k and host.calls == 0  # only group 1, nothing resampled
    if tries == 50:
        assert n == groups * k  # refilled to the batch's size
    # each kept group's k rows are one prompt's samples, in the host's layout
    assert all(len(set(rollout_out.prompts[i:i + k])) == 1 for i in range(0, n, k))


def test_constructor_checks_and_presets():
    with pytest.raises(ValueError, match="samples_per_prompt must be >= 2 with grpo"):
        PolicyGradient(samples_per_prompt=1)
    with pytest.raises(ValueError, match="unknown advantage_estimator"):
        PolicyGradient(advantage_estimator="gae")  # type: ignore[arg-type]
    assert ReMax().samples_per_prompt == 1 and not DAPO().needs_reference and GRPO().needs_reference
    assert (DAPO().clip_range, DAPO().clip_range_high) == (0.2, 0.28)
    assert GRPO(clip_range=0.1).clip_range_high == 0.1
