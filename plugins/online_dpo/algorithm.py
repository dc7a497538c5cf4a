"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"): DPO on pairs the
current policy samples and a judge labels at every step, instead of a fixed preference file.

One training step (driven by the host, ``alignkit.module.AlignModule``):

1. rollout: the host repeats each prompt twice (``samples_per_prompt = 2``) and samples both responses from the
   current policy;
2. score: the reward plugins score every response (the host insists on at least one; with
   ``judge: annotator`` they only monitor, e.g. the task's gold reward);
3. experience (this plugin): the judge labels each pair — ``rewards``: the higher combined score wins;
   ``annotator``: the task's :class:`~alignkit.SimulatedAnnotator` (Bradley–Terry on the gold reward, label
   noise) — ties and identical responses are dropped and counted; the frozen reference's log-probs of both
   responses are computed once, without gradient;
4. ``update_epochs`` × ``num_minibatches`` optimiser steps of the DPO-family loss
   (:func:`alignkit_plugins.online_dpo.losses.online_dpo_loss`) on the labelled pairs.

Log-probabilities in the loss are those of the policy itself (temperature 1), whatever the sampling temperature;
``objective/kl`` (Σ log π_old − log π_ref per response) is logged when sampling at temperature 1. With
``judge: rewards`` the judge sees the host's combined reward after ``reward_combination`` (normalisation keeps
the order of the two scores; clipping can turn a pair into a tie).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from alignkit import (
    ALGORITHM,
    ANNOTATOR,
    LossOutput,
    OnlineAlgorithm,
    PluginError,
    Rollout,
    SamplingConfig,
    SimulatedAnnotator,
    Task,
    TensorRecord,
    derive_seed,
    hookimpl,
    resolve_seed,
    response_logprobs,
    shuffled_minibatches,
)
from alignkit_plugins.dpo.losses import DPOVariant, dpo_loss, sequence_logps
from alignkit_plugins.online_dpo.losses import (
    build_pairs,
    identical_responses,
    judge_by_scores,
    online_dpo_loss,
    pair_stats,
)

Judge = Literal["rewards", "annotator"]


@dataclass
class OnlineDPOExperience(TensorRecord):
    """Labelled pairs of one rollout, ready for DPO updates. ``N`` pairs, ``P`` prompt and ``R`` response length."""

    chosen: Tensor  # (N, P + R) prompt then the preferred response
    chosen_mask: Tensor  # (N, P + R) attention mask
    rejected: Tensor  # (N, P + R)
    rejected_mask: Tensor  # (N, P + R)
    reference_chosen: Tensor  # (N,) log π_ref(y_c|x), detached
    reference_rejected: Tensor  # (N,) log π_ref(y_r|x), detached
    keep: Tensor  # (N,) float 1/0: the pair counts (neither a tie nor identical)
    prompt_length: int
    stats: dict[str, float] = field(default_factory=dict)  # the judge's counts, for the step's metrics

    def select(self, rows: Tensor) -> OnlineDPOExperience:
        tensors: dict[str, Any] = {k: v[rows] for k, v in self.__dict__.items() if isinstance(v, Tensor)}
        return replace(self, **tensors)

    @property
    def size(self) -> int:
        return self.chosen.shape[0]


class OnlineDPO(OnlineAlgorithm):
    """DPO on two fresh samples per prompt, labelled by the run's rewards or the task's simulated annotator."""

    needs_reference = True

    def __init__(
        self,
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
        beta: float = 0.1,
        loss_type: DPOVariant = "sigmoid",
        label_smoothing: float = 0.0,
        length_normalize: bool | None = None,
        judge: Judge = "rewards",
        annotator: SimulatedAnnotator | None = None,
        task: Task | None = None,
        tie_margin: float = 0.0,
        update_epochs: int = 1,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        seed: int | None = None,
    ):
        """
        Args:
            sampling: how the two responses per prompt are sampled (max new tokens, temperature, top-p/k, stops).
            beta: β of the DPO loss (IPO: τ; hinge: 1/margin), the strength of the implicit KL penalty.
            loss_type: the DPO-family loss of :mod:`alignkit_plugins.dpo.losses`: sigmoid (DPO), ipo, cdpo,
                robust or hinge.
            label_smoothing: assumed label-flip probability ε in [0, 0.5); only for cdpo and robust.
            length_normalize: average token log-probs over the response instead of summing them; None: True for
                ``ipo``, False otherwise (as in the offline DPO plugin).
            judge: who labels each pair: ``rewards`` (the response with the higher combined score of the run's
                reward plugins wins) or ``annotator`` (the task's simulated annotator on its gold reward; the
                reward plugins then only monitor).
            annotator: the simulated annotator (Bradley–Terry temperature, label-flip probability, seed) used with
                ``judge: annotator``; None: ``SimulatedAnnotator()``. Each step labels with a fresh annotator seeded
                from ``annotator.seed``, the step and the rank, so a resumed run labels as an uninterrupted one.
            task: the task whose gold reward the annotator judges by and against which the judge's agreement is
                measured (``judge/gold_agreement``); None: the data module's task, if it has one.
            tie_margin: with ``judge: rewards``, score gaps up to this are ties (dropped).
            update_epochs: passes over each step's pairs.
            num_minibatches: optimiser steps per update epoch.
            gradient_accumulation_steps: micro-batches accumulated into each minibatch step.
            max_grad_norm: gradient clipping norm (None: off).
            seed: seed of the minibatch shuffling; None: derived from the run's seed (role ``model.algorithm.seed``).
        """
        super().__init__(update_epochs=update_epochs, max_grad_norm=max_grad_norm, samples_per_prompt=2)
        if judge not in ("rewards", "annotator"):
            raise ValueError(f"algorithm.judge must be 'rewards' or 'annotator', got {judge!r}")
        for name, value in (("num_minibatches", num_minibatches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if value < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {value}")
        if tie_margin < 0:
            raise ValueError(f"algorithm.tie_margin must be >= 0, got {tie_margin}")
        try:  # the loss functions own the argument checks: run them once on a dummy pair
            zero = torch.zeros(1)
            dpo_loss(loss_type, zero, zero, zero, zero, beta=beta, label_smoothing=label_smoothing)
        except ValueError as exc:
            raise ValueError(f"algorithm: {exc}") from None
        self.sampling = sampling
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.length_normalize = loss_type == "ipo" if length_normalize is None else length_normalize
        self.judge, self.tie_margin, self.task = judge, tie_margin, task
        annotator = annotator if annotator is not None else SimulatedAnnotator()
        # settings only: the labelling annotator of each step is built fresh from them (see `label_by_annotator`)
        self.annotator_settings = (annotator.temperature, annotator.flip_prob, annotator.seed)
        self.num_minibatches, self.gradient_accumulation_steps, self.seed = (num_minibatches,
                                                                             gradient_accumulation_steps, seed)
        self.updates = 0
        self.dropped = {"ties": 0, "identical": 0}  # over the whole run (checkpointed)

    @hookimpl
    def alignkit_configure(self, module) -> None:
        self.seed = resolve_seed(self.seed, ALGORITHM)
        temperature, flip_prob, seed = self.annotator_settings
        self.annotator_settings = (temperature, flip_prob, resolve_seed(seed, ANNOTATOR))

    def task_for(self, module) -> Task | None:
        """``task``, else the task of the running data module (None when there is none)."""
        if self.task is not None:
            return self.task
        trainer = getattr(module, "_trainer", None)
        return getattr(getattr(trainer, "datamodule", None), "task", None)

    # ------------------------------------------------------------------------------------------ judge
    def label_by_annotator(self, module, task: Task, prompts: list[str], a: list[str], b: list[str],
                           ask: list[int]) -> tuple[Tensor, Tensor, list[tuple[float, float]]]:
        """The simulated annotator's verdict on the pairs ``ask`` (indices): ``(a_wins, ties)`` ``(N,)`` bool and
        the gold rewards ``(g_chosen, g_rejected)`` of the asked pairs. A pair of equal gold is a tie: the
        annotator's label would be a coin flip."""
        temperature, flip_prob, seed = self.annotator_settings
        step_seed = derive_seed(resolve_seed(seed, ANNOTATOR), f"online_dpo/{module.global_step}/{module.global_rank}")
        annotator = SimulatedAnnotator(temperature=temperature, flip_prob=flip_prob, seed=step_seed)
        labelled = annotator.label(task, [prompts[i] for i in ask], [a[i] for i in ask], [b[i] for i in ask])
        a_wins, ties = torch.zeros(len(a), dtype=torch.bool), torch.zeros(len(a), dtype=torch.bool)
        for i, pair in zip(ask, labelled):
            a_wins[i] = pair.chosen == a[i]
            ties[i] = pair.gold_chosen == pair.gold_rejected
        return a_wins, ties, [(p.gold_chosen, p.gold_rejected) for p in labelled]

    # ------------------------------------------------------------------------------------------ experience
    @hookimpl
    def alignkit_experience(self, module, rollout: Rollout, scores: Tensor) -> OnlineDPOExperience:
        rollout = rollout.to(module.device)
        rows, P = rollout.sequences.shape[0], rollout.prompt_length
        if rows % 2:
            raise PluginError(f"online_dpo: the rollout has {rows} rows; it needs the two samples of each prompt "
                              "next to each other (samples_per_prompt=2)")
        prompts, a, b = rollout.prompts[::2], rollout.responses[::2], rollout.responses[1::2]
        identical = identical_responses(rollout.response_ids, rollout.response_mask).cpu()
        identical |= torch.tensor([x == y for x, y in zip(a, b)], dtype=torch.bool)
        task = self.task_for(module)
        if self.judge == "annotator":
            if task is None:
                raise PluginError("online_dpo: judge=annotator needs a task: set model.algorithm.init_args.task or "
                                  "use a data module with a task")
            ask = [i for i in range(len(a)) if not identical[i]]
            a_wins, ties, gold = self.label_by_annotator(module, task, prompts, a, b, ask)
        else:
            a_wins, ties = (t.cpu() for t in judge_by_scores(scores, self.tie_margin))
            gold = []
        pairs = build_pairs(a_wins, ties, identical)
        with torch.no_grad(), module.reference_model() as reference:
            reference_tokens = response_logprobs(reference, rollout.sequences, rollout.attention_mask, P, 1.0)
        reference_logps = sequence_logps(reference_tokens, rollout.response_mask, self.length_normalize)  # (2N,)
        stats = self.judge_stats(pairs, task, prompts, a, b, gold)
        if self.sampling.temperature == 1.0:  # rollout.logprobs are log π_old at the sampling temperature
            log_ratio = (rollout.logprobs - reference_tokens) * rollout.response_mask
            stats["objective/kl"] = float(log_ratio.sum(-1).mean())
        chosen, rejected = pairs.chosen.to(module.device), pairs.rejected.to(module.device)
        return OnlineDPOExperience(
            rollout.sequences[chosen], rollout.attention_mask[chosen], rollout.sequences[rejected],
            rollout.attention_mask[rejected], reference_logps[chosen].detach(), reference_logps[rejected].detach(),
            pairs.keep.float().to(module.device), P, stats)

    def judge_stats(self, pairs, task: Task | None, prompts: list[str], a: list[str], b: list[str],
                    gold: list[tuple[float, float]]) -> dict[str, float]:
        """Counts of the step's pairs (kept, ties, identical) and, with a task, how often the judge's choice has the
        higher gold reward among kept pairs of unequal gold (``judge/gold_agreement``)."""
        ties, identical = int(pairs.ties.sum()), int(pairs.identical.sum())
        self.dropped["ties"] += ties
        self.dropped["identical"] += identical
        stats = {"judge/pairs": float(len(a)), "judge/kept": float(pairs.keep.sum()), "judge/ties": float(ties),
                 "judge/identical": float(identical), "judge/ties_total": float(self.dropped["ties"]),
                 "judge/identical_total": float(self.dropped["identical"])}
        if task is not None:
            if not gold:  # judge=rewards: gold of both responses
                gold = list(zip(task.gold_rewards(prompts, a), task.gold_rewards(prompts, b)))
                gold = [(ga, gb) if bool(c % 2 == 0) else (gb, ga) for (ga, gb), c in zip(gold, pairs.chosen.tolist())]
                keep = pairs.keep.tolist()
            else:  # the annotator labelled the non-identical pairs only, in order
                keep = [k for k, same in zip(pairs.keep.tolist(), pairs.identical.tolist()) if not same]
            decided = [gc > gr for (gc, gr), k in zip(gold, keep) if k and gc != gr]
            if decided:
                stats["judge/gold_agreement"] = sum(decided) / len(decided)
        return stats

    @hookimpl
    def alignkit_minibatches(self, module, experience: OnlineDPOExperience) -> Iterator[list[OnlineDPOExperience]]:
        self.updates += 1
        yield from shuffled_minibatches(experience, self.num_minibatches, self.gradient_accumulation_steps,
                                        resolve_seed(self.seed, ALGORITHM), self.updates - 1)

    # ------------------------------------------------------------------------------------------ loss
    @hookimpl
    def alignkit_loss(self, module, batch: OnlineDPOExperience) -> LossOutput:
        P = batch.prompt_length
        sequences = torch.cat([batch.chosen, batch.rejected])  # (2n, P + R): one forward scores both
        attention = torch.cat([batch.chosen_mask, batch.rejected_mask])
        tokens = response_logprobs(module.policy, sequences, attention, P, 1.0)  # (2n, R)
        logps = sequence_logps(tokens, attention[:, P:], self.length_normalize)  # (2n,)
        n = batch.size
        policy_chosen, policy_rejected = logps[:n], logps[n:]
        result = online_dpo_loss(self.loss_type, policy_chosen, policy_rejected, batch.reference_chosen,
                                 batch.reference_rejected, batch.keep, self.beta, self.label_smoothing)
        stats = pair_stats(result, policy_chosen, policy_rejected, batch.keep)
        return LossOutput(result.loss, units=result.units, stats={"train/loss": result.loss.detach(), **stats})

    # ------------------------------------------------------------------------------------------ metrics
    @hookimpl
    def alignkit_metrics(self, module, rollout: Rollout, experience: OnlineDPOExperience) -> dict[str, float]:
        return {**experience.stats,
                "tokens/response_len_mean": float(rollout.response_mask.float().sum(-1).mean()),
                "tokens/ended_frac": float(rollout.ended.float().mean())}

    # ------------------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        """The count of updates (which seeds the minibatch shuffling) and the run's dropped-pair totals."""
        return {"updates": self.updates, "dropped": dict(self.dropped)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        self.dropped = dict(state["dropped"])
