"""One configurable critic-free policy-gradient algorithm, and its named presets.

Step (the host's online step, ``docs/concepts.md``): k samples per prompt → reward plugins → [DAPO overlong shaping]
→ [DAPO dynamic sampling: drop groups of equal rewards, sample more] → [KL penalty in the reward] → advantage
estimator (``advantages.py``) → ``update_epochs`` × minibatches of the chosen policy loss (``losses.py``)
[+ β·KL loss term]. No value model: the baseline comes from the group, the batch or the greedy response.

Shapes: ``N`` responses (``N / k`` groups of k consecutive rows), ``P`` prompt length, ``R`` response length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit import (
    ALGORITHM,
    LossAggregation,
    LossOutput,
    OnlineAlgorithm,
    PromptBatch,
    Rollout,
    SamplingConfig,
    TensorRecord,
    hookimpl,
    masked_mean,
    resolve_seed,
    response_logprobs,
    shuffled_minibatches,
)
from alignkit_plugins.pg.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    AdvantageEstimator,
    broadcast,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    remax_advantages,
    rloo_advantages,
    token_rewards,
)
from alignkit_plugins.pg.losses import (
    POLICY_LOSSES,
    KLLossEstimator,
    PGLossTerms,
    PolicyLoss,
    cispo_loss,
    decoupled_clip_loss,
    gspo_loss,
    kl_loss,
)
from alignkit_plugins.pg.shaping import group_rows, informative_groups, overlong_penalty

__all__ = ["KLMode", "PGExperience", "PolicyGradient", "select_rollout", "concat_rollouts"]

#: ``reward``: −β·k1 per token in the reward (PPO's); ``loss``: β·KL(π‖π_ref) added to the loss; ``none``: no KL.
KLMode = Literal["reward", "loss", "none"]


@dataclass
class PGExperience(TensorRecord):
    """A scored rollout ready for updates: ``N`` rows in groups of k."""

    sequences: Tensor  # (N, P + R)
    attention_mask: Tensor  # (N, P + R)
    response_mask: Tensor  # (N, R) float
    old_logprobs: Tensor  # (N, R) log π_old of the sampled tokens
    ref_logprobs: Tensor | None  # (N, R) log π_ref, None without a KL term
    advantages: Tensor  # (N, R), 0 on padding
    scores: Tensor  # (N,) the host's combined reward plus DAPO's overlong penalty (before any KL penalty)
    kl: Tensor  # (N,) Σ_t (log π_old − log π_ref), 0 without a reference
    ended: Tensor  # (N,) bool, the response stopped before max_new_tokens
    prompt_length: int
    stats: dict[str, float]  # dynamic-sampling and baseline metrics of this step

    @property
    def size(self) -> int:
        return int(self.sequences.shape[0])

    def select(self, rows: Tensor) -> PGExperience:
        picked: dict[str, Any] = {k: v[rows] for k, v in vars(self).items() if isinstance(v, Tensor)}
        return replace(self, **picked)


def select_rollout(rollout: Rollout, rows: Tensor) -> Rollout:
    """The rows ``rows`` ``(n,)`` of a rollout (tensors and texts)."""
    picked = rows.tolist()
    tensors: dict[str, Any] = {k: v[rows.to(v.device)] for k, v in vars(rollout).items() if isinstance(v, Tensor)}
    return replace(rollout, **tensors, prompts=[rollout.prompts[i] for i in picked],
                   responses=[rollout.responses[i] for i in picked])


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of the same prompts' prompt length stacked row-wise, responses right padded to the longest."""
    P = rollouts[0].prompt_length
    if any(r.prompt_length != P for r in rollouts):
        raise ValueError("rollouts to concatenate must share their prompt length")
    R = max(r.response_mask.shape[1] for r in rollouts)

    def pad(t: Tensor, width: int, value: float) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Rollout(
        sequences=torch.cat([pad(r.sequences, P + R, pad_id) for r in rollouts]),
        attention_mask=torch.cat([pad(r.attention_mask, P + R, 0) for r in rollouts]),
        response_mask=torch.cat([pad(r.response_mask, R, 0) for r in rollouts]),
        logprobs=torch.cat([pad(r.logprobs, R, 0.0) for r in rollouts]),
        ended=torch.cat([r.ended for r in rollouts]), prompt_length=P,
        prompts=[p for r in rollouts for p in r.prompts], responses=[s for r in rollouts for s in r.responses])


class PolicyGradient(OnlineAlgorithm):
    """Critic-free policy gradient: a group/batch/greedy baseline (``advantage_estimator``), a clipped or
    re-weighted surrogate (``policy_loss``), KL in the reward or in the loss, and DAPO's dynamic sampling and
    overlong shaping. The presets (``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``cispo``, ``rloo``, ``reinforce_pp``,
    ``remax``) are this class with their paper's defaults."""

    needs_reference = True

    def __init__(
        self,
        advantage_estimator: AdvantageEstimator = "grpo",
        policy_loss: PolicyLoss = "ppo_clip",
        clip_range: float = 0.2,
        clip_range_high: float | None = None,
        loss_aggregation: LossAggregation = "token-mean",
        kl_mode: KLMode = "loss",
        kl_coef: float = 0.04,
        kl_estimator: KLLossEstimator = "k3",
        group_eps: float = 1e-6,
        gamma: float = 1.0,
        dynamic_sampling: bool = False,
        max_sampling_tries: int = 4,
        overlong_buffer: int | None = None,
        overlong_penalty_factor: float = 1.0,
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
        samples_per_prompt: int = 4,
        update_epochs: int = 1,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        target_approx_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
        seed: int | None = None,
    ):
        """
        Args:
            advantage_estimator: ``grpo`` (group mean/std), ``dr_grpo`` (group mean), ``rloo`` (leave-one-out),
                ``reinforce_pp`` (global normalisation of the KL-shaped return), ``reinforce_pp_baseline`` (group-mean
                baseline, then global normalisation) or ``remax`` (the greedy response's reward as baseline).
            policy_loss: ``ppo_clip`` (PPO's clip; DAPO's clip-higher with ``clip_range_high``), ``gspo``
                (sequence-level ratio and clip) or ``cispo`` (clipped stop-gradient IS weight times log π).
            clip_range: ε (ε_low when ``clip_range_high`` is set). For ``cispo``, 1 removes the lower bound.
            clip_range_high: ε_high of the decoupled clip (None: ``clip_range``, a symmetric clip).
            loss_aggregation: ``token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-mean``
                (:func:`alignkit.agg_loss`); exact over a minibatch's micro-batches and ranks.
            kl_mode: KL to the reference as a per-token ``reward`` penalty (k1, as PPO's), as a ``loss`` term, or
                ``none`` (no reference model is built).
            kl_coef: β of the KL penalty or loss term.
            kl_estimator: estimator of the KL loss term: ``k1`` or ``k3`` (low-variance); the reward penalty is k1.
            group_eps: added to the group standard deviation of ``grpo``.
            gamma: discount of the token returns of ``reinforce_pp`` and ``reinforce_pp_baseline``.
            dynamic_sampling: DAPO's dynamic sampling: drop groups whose rewards are all equal and sample further
                groups for the batch's prompts until the batch holds as many groups as it was given or
                ``max_sampling_tries`` rollouts were made (logged: ``dynamic_sampling/dropped_groups``).
            max_sampling_tries: most rollouts per step with dynamic sampling, the first included.
            overlong_buffer: L_cache of DAPO's overlong shaping: the reward falls linearly by up to
                ``overlong_penalty_factor`` over the last L_cache tokens before ``sampling.max_new_tokens`` (None: off).
            overlong_penalty_factor: the largest overlong penalty.
            sampling: how responses are sampled (max new tokens, temperature, top-p/k, stop strings/tokens).
            samples_per_prompt: k, responses sampled per prompt (≥ 2 for the group estimators).
            update_epochs: passes over each rollout batch.
            num_minibatches: optimiser steps per update epoch.
            gradient_accumulation_steps: micro-batches accumulated into each minibatch step.
            target_approx_kl: stop the update epochs once mean approx-KL exceeds this (None: never).
            max_grad_norm: gradient clipping norm (None: off).
            seed: seed of the minibatch shuffling; None: derived from the run's seed (role ``model.algorithm.seed``).
        """
        super().__init__(update_epochs=update_epochs, target_approx_kl=target_approx_kl, max_grad_norm=max_grad_norm,
                         samples_per_prompt=samples_per_prompt)
        if advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {advantage_estimator!r}; expected one of "
                             f"{', '.join(ADVANTAGE_ESTIMATORS)}")
        if policy_loss not in POLICY_LOSSES:
            raise ValueError(f"unknown policy_loss {policy_loss!r}; expected one of {', '.join(POLICY_LOSSES)}")
        if kl_mode not in ("reward", "loss", "none"):
            raise ValueError(f"unknown kl_mode {kl_mode!r}; expected reward, loss or none")
        if kl_estimator not in ("k1", "k3"):
            raise ValueError(f"unknown kl_estimator {kl_estimator!r}; expected k1 or k3")
        needs_group = advantage_estimator in GROUP_ESTIMATORS or dynamic_sampling
        if needs_group and samples_per_prompt < 2:
            what = "dynamic_sampling" if advantage_estimator not in GROUP_ESTIMATORS else advantage_estimator
            raise ValueError(f"algorithm.samples_per_prompt must be >= 2 with {what}, got {samples_per_prompt}")
        for name, value in (("num_minibatches", num_minibatches), ("gradient_accumulation_steps",
                                                                   gradient_accumulation_steps),
                            ("max_sampling_tries", max_sampling_tries)):
            if value < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {value}")
        if overlong_buffer is not None and not 1 <= overlong_buffer <= sampling.max_new_tokens:
            raise ValueError(f"algorithm.overlong_buffer must be in [1, sampling.max_new_tokens="
                             f"{sampling.max_new_tokens}], got {overlong_buffer}")
        self.advantage_estimator, self.policy_loss = advantage_estimator, policy_loss
        self.clip_range = clip_range
        self.clip_range_high = clip_range if clip_range_high is None else clip_range_high
        self.loss_aggregation = loss_aggregation
        self.kl_mode, self.kl_coef, self.kl_estimator = kl_mode, kl_coef, kl_estimator
        self.group_eps, self.gamma = group_eps, gamma
        self.dynamic_sampling, self.max_sampling_tries = dynamic_sampling, max_sampling_tries
        self.overlong_buffer, self.overlong_penalty_factor = overlong_buffer, overlong_penalty_factor
        self.sampling = sampling
        self.num_minibatches, self.gradient_accumulation_steps, self.seed = (num_minibatches,
                                                                             gradient_accumulation_steps, seed)
        # the host reads it when it builds the models: no reference copy without a KL term
        self.needs_reference = kl_mode != "none"  # type: ignore[misc]
        self.updates = 0

    @hookimpl
    def alignkit_configure(self, module) -> None:
        self.seed = resolve_seed(self.seed, ALGORITHM)

    # ------------------------------------------------------------------------------------------ sampling
    def shape_scores(self, rollout: Rollout, scores: Tensor) -> Tensor:
        """The host's combined reward plus DAPO's overlong penalty (when ``overlong_buffer`` is set)."""
        scores = scores.float()
        if self.overlong_buffer is None:
            return scores
        lengths = rollout.response_mask.sum(-1).to(scores.device)
        return scores + overlong_penalty(lengths, self.sampling.max_new_tokens, self.overlong_buffer,
                                         self.overlong_penalty_factor)

    @staticmethod
    def group_prompts(rollout: Rollout, k: int) -> PromptBatch:
        """One prompt row per group of k (the rollout's first row of each group), as the host's ``PromptBatch``."""
        P, rows = rollout.prompt_length, torch.arange(0, rollout.sequences.shape[0], k)
        return PromptBatch(rollout.sequences[rows, :P], rollout.attention_mask[rows, :P],
                           [rollout.prompts[i] for i in rows.tolist()], rows)

    def sample(self, module, prompts: PromptBatch, sampling: SamplingConfig | None = None) -> Rollout:
        """A rollout of ``prompts`` by the run's rollout engine (the first ``alignkit_rollout`` answer), with
        ``sampling`` in place of the algorithm's settings for this call (the engine reads ``algorithm.sampling``)."""
        saved = self.sampling
        self.sampling = sampling or saved
        try:
            return module.pm.hook.alignkit_rollout(module=module, batch=prompts.to(module.device)).to(module.device)
        finally:
            self.sampling = saved

    def refill(self, module, rollout: Rollout, scores: Tensor | None) -> tuple[Rollout, Tensor, dict[str, float]]:
        """DAPO's dynamic sampling: keep the groups whose rewards are not all equal; while the batch holds fewer groups
        than it was given, sample one more group for each of its prompts (scored by the host, ``module.score``) and
        keep the informative ones, up to ``max_sampling_tries`` rollouts. The result holds at most the batch's number
        of groups, fewer when the tries ran out. Every rank makes the same number of tries (collectives inside)."""
        k = self.samples_per_prompt
        groups = rollout.sequences.shape[0] // k
        prompts = self.group_prompts(rollout, k).repeat_interleave(k)
        kept_rollouts: list[Rollout] = []
        kept_scores: list[Tensor] = []
        found = dropped = tries = 0
        while True:
            tries += 1
            keep = (informative_groups(scores, k) if scores is not None
                    else torch.zeros(groups, dtype=torch.bool, device=module.device))
            rows = group_rows(keep, k)[: max(groups - found, 0) * k]
            kept_rollouts.append(select_rollout(rollout, rows))
            kept_scores.append(scores[rows] if scores is not None else torch.zeros(0, device=module.device))
            found += int(rows.numel()) // k
            dropped += int((~keep).sum())
            short = torch.tensor(float(found < groups), device=module.device)
            if tries >= self.max_sampling_tries or float(module.reduce_sum(short)) == 0:
                break
            rollout = self.sample(module, prompts)
            scored = module.score(rollout)  # None: a non-finite reward skipped under skip_nonfinite
            scores = None if scored is None else self.shape_scores(rollout, scored[0].to(module.device))
        pad_id = module.tokenizer.pad_token_id if module.tokenizer.pad_token_id is not None else 0
        stats = {"dynamic_sampling/dropped_groups": float(dropped), "dynamic_sampling/tries": float(tries),
                 "dynamic_sampling/kept_groups": float(found)}
        return concat_rollouts(kept_rollouts, pad_id), torch.cat(kept_scores), stats

    def greedy_scores(self, module, rollout: Rollout) -> Tensor:
        """ReMax's baseline: the combined reward (the host's ``module.score``) of each prompt's greedy response,
        decoded by the run's rollout engine with ``do_sample=False``. ``(N / k,)``."""
        greedy = self.sample(module, self.group_prompts(rollout, self.samples_per_prompt),
                             replace(self.sampling, do_sample=False))
        scored = module.score(greedy)
        if scored is None:
            raise ValueError("the reward of a greedy response (ReMax's baseline) is not finite")
        return self.shape_scores(greedy, scored[0].to(module.device))

    # ------------------------------------------------------------------------------------------ experience
    def advantages(self, module, scores: Tensor, kl_tokens: Tensor | None, mask: Tensor,
                   greedy: Tensor | None) -> Tensor:
        """``(N, R)`` advantages of the configured estimator; the KL penalty enters the reward when
        ``kl_mode == "reward"`` (per token for the REINFORCE++ estimators, summed per sequence for the others)."""
        k, beta = self.samples_per_prompt, self.kl_coef if self.kl_mode == "reward" else 0.0
        estimator = self.advantage_estimator
        if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
            rewards = token_rewards(scores, kl_tokens, mask, beta)
            if estimator == "reinforce_pp":
                return reinforce_pp_advantages(rewards, mask, self.gamma, reduce=module.reduce_sum)
            return reinforce_pp_baseline_advantages(rewards, mask, k, self.gamma, reduce=module.reduce_sum)
        rewards = scores if kl_tokens is None or beta == 0.0 else scores - beta * (kl_tokens * mask).sum(-1)
        if estimator == "grpo":
            sequence = grpo_advantages(rewards, k, self.group_eps)
        elif estimator == "dr_grpo":
            sequence = dr_grpo_advantages(rewards, k)
        elif estimator == "rloo":
            sequence = rloo_advantages(rewards, k)
        else:
            assert greedy is not None
            sequence = remax_advantages(rewards, greedy, k)
        return broadcast(sequence, mask)

    @hookimpl
    def alignkit_experience(self, module, rollout: Rollout, scores: Tensor) -> PGExperience:
        rollout = rollout.to(module.device)
        scores = self.shape_scores(rollout, scores.to(module.device))
        stats: dict[str, float] = {}
        if self.dynamic_sampling:
            rollout, scores, stats = self.refill(module, rollout, scores)
        P, mask = rollout.prompt_length, rollout.response_mask.float()
        old_logprobs = rollout.logprobs.detach() * mask
        ref_logprobs = None
        with torch.no_grad():
            if self.needs_reference and rollout.sequences.shape[0] > 0:
                with module.reference_model() as reference:
                    ref_logprobs = response_logprobs(reference, rollout.sequences, rollout.attention_mask, P,
                                                     self.sampling.temperature) * mask
            kl_tokens = None if ref_logprobs is None else (old_logprobs - ref_logprobs) * mask
            greedy = None
            if self.advantage_estimator == "remax" and rollout.sequences.shape[0] > 0:
                greedy = self.greedy_scores(module, rollout)
                stats["objective/greedy_scores"] = float(greedy.mean())
            advantages = self.advantages(module, scores, kl_tokens, mask, greedy)
        kl = torch.zeros_like(scores) if kl_tokens is None else kl_tokens.sum(-1)
        return PGExperience(rollout.sequences, rollout.attention_mask, mask, old_logprobs, ref_logprobs, advantages,
                            scores, kl, rollout.ended.to(module.device), P, stats)

    @hookimpl
    def alignkit_minibatches(self, module, experience: PGExperience) -> Iterator[list[PGExperience]]:
        self.updates += 1
        if experience.size == 0:
            return  # dynamic sampling found no informative group: no update this step
        yield from shuffled_minibatches(experience, self.num_minibatches, self.gradient_accumulation_steps,
                                        resolve_seed(self.seed, ALGORITHM), self.updates - 1)

    # ------------------------------------------------------------------------------------------ loss
    def surrogate(self, logprobs: Tensor, batch: PGExperience) -> PGLossTerms:
        """The configured policy loss on one micro-batch."""
        args = (logprobs, batch.old_logprobs, batch.advantages, batch.response_mask)
        if self.policy_loss == "gspo":
            return gspo_loss(*args, self.clip_range, self.clip_range_high, self.loss_aggregation)
        if self.policy_loss == "cispo":
            return cispo_loss(*args, self.clip_range, self.clip_range_high, self.loss_aggregation)
        return decoupled_clip_loss(*args, self.clip_range, self.clip_range_high, self.loss_aggregation)

    @hookimpl
    def alignkit_loss(self, module, batch: PGExperience) -> LossOutput:
        logprobs = response_logprobs(module.policy, batch.sequences, batch.attention_mask, batch.prompt_length,
                                     self.sampling.temperature)  # differentiable: the training forward
        pg = self.surrogate(logprobs, batch)
        loss, stats = pg.loss, pg.stats()
        if self.kl_mode == "loss" and batch.ref_logprobs is not None:
            kl, _ = kl_loss(logprobs, batch.ref_logprobs, batch.response_mask, self.kl_estimator,
                            self.loss_aggregation)
            loss = loss + self.kl_coef * kl
            stats["loss/kl"] = kl.detach()
        stats["train/loss"] = loss.detach()
        return LossOutput(loss, stats, units=pg.units, approx_kl=pg.approxkl)

    # ------------------------------------------------------------------------------------------ metrics
    @hookimpl
    def alignkit_metrics(self, module, rollout: Rollout, experience: PGExperience) -> dict[str, float]:
        metrics = dict(experience.stats)
        if experience.size == 0:
            return metrics
        mask = experience.response_mask
        beta = self.kl_coef if self.kl_mode != "none" else 0.0
        metrics.update({
            "objective/kl": float(experience.kl.mean()),
            "objective/kl_coef": float(beta),
            "objective/rlhf_reward": float((experience.scores - beta * experience.kl).mean()),
            "tokens/response_len_mean": float(mask.sum(-1).mean()),
            "tokens/ended_frac": float(experience.ended.float().mean()),
            "policy/advantages_mean": float(masked_mean(experience.advantages, mask)),
        })
        return metrics

    # ------------------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        """The count of updates (which seeds the minibatch shuffling)."""
        return {"updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
