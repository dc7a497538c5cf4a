"""GKD, on-policy distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes"): the student (the policy) samples responses, a frozen teacher scores every position of
them, and the student minimises the token-level divergence to the teacher over the whole vocabulary
(:mod:`alignkit_plugins.gkd.losses`): reverse KL(π_student ‖ π_teacher) by default, or the generalised JSD(β).

One training step (driven by the host, ``alignkit.module.AlignModule``):

1. rollout: with probability ``lmbda`` the student samples (on-policy, the host's rollout engine); otherwise the
   teacher samples the responses (this plugin answers ``alignkit_rollout`` first): the paper's "fixed data" batch
   taken as teacher-generated outputs (sequence-level KD), since the host's online data are prompts only;
2. score: the host runs the reward plugins (it requires one; GKD does not use them: give a monitoring reward such
   as the task's gold reward);
3. experience: the sampled sequences, unchanged;
4. ``update_epochs`` × ``num_minibatches`` optimiser steps; each micro-batch runs the student with gradient and
   the teacher without, and averages the divergence with :func:`alignkit.agg_loss` (exact over micro-batches).

The teacher's forward runs per micro-batch (its ``(B, R, V)`` logits are never stored for the whole rollout).
Divergences are between the models' own distributions (temperature 1), whatever the sampling temperature.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit import (
    ALGORITHM,
    LossAggregation,
    LossOutput,
    ModelConfig,
    OnlineAlgorithm,
    PluginError,
    PromptBatch,
    Rollout,
    SamplingConfig,
    TensorRecord,
    derive_seed,
    hookimpl,
    last_columns,
    load_model,
    masked_mean,
    position_ids_from_mask,
    resolve_seed,
    shuffled_minibatches,
    token_logprobs,
)
from alignkit.rollout import generate  # not in the public namespace (see the report of issue #24)
from alignkit_plugins.gkd.losses import distillation_loss, forward_kl, reverse_kl


@dataclass
class GKDExperience(TensorRecord):
    """Sampled sequences to distil on. ``B`` responses, ``P`` prompt and ``R`` response length."""

    sequences: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    response_mask: Tensor  # (B, R)
    prompt_length: int
    on_policy: bool  # the student sampled them (else the teacher did)

    def select(self, rows: Tensor) -> GKDExperience:
        tensors: dict[str, Any] = {k: v[rows] for k, v in self.__dict__.items() if isinstance(v, Tensor)}
        return replace(self, **tensors)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


def response_logits(model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
    """The logits that predict each response token, ``(B, R, V)``, from one forward over prompt + response (the
    LM head, and the last decoder layer, only on the last ``R + 1`` columns where the model allows it)."""
    R = sequences.shape[1] - prompt_length
    with last_columns(model, R + 1) as extra:
        out = model(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False, **extra)
    return out.logits[:, -(R + 1):-1]  # position t predicts token t + 1


class GKD(OnlineAlgorithm):
    """On-policy distillation of a frozen teacher into the policy (the student)."""

    needs_rewards = False  # the teacher is the signal: reward plugins, if any, only monitor

    def __init__(
        self,
        teacher: str,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
        beta: float = 1.0,
        lmbda: float = 1.0,
        loss_aggregation: LossAggregation = "token-mean",
        update_epochs: int = 1,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        max_grad_norm: float | None = 1.0,
        seed: int | None = None,
    ):
        """
        Args:
            teacher: the teacher, any causal LM: an HF hub name or a local ``save_pretrained`` directory (e.g. an
                SFT run's ``model/``). Loaded once, frozen; its tokenizer must have the student's vocabulary.
            teacher_dtype: the teacher's parameter dtype.
            sampling: how responses are sampled (by the student, or by the teacher on off-policy steps).
            beta: β of the generalised JSD in [0, 1]: 1 (default) the reverse KL(student ‖ teacher), 0 the forward
                KL(teacher ‖ student), in between JSD(β) (:func:`alignkit_plugins.gkd.losses.generalized_jsd`).
            lmbda: λ, the fraction of steps on the student's own samples (on-policy); the other steps distil on
                responses the teacher samples. 1 (default): on-policy only.
            loss_aggregation: how per-token divergences are averaged (:func:`alignkit.agg_loss`).
            update_epochs: passes over each step's samples.
            num_minibatches: optimiser steps per update epoch.
            gradient_accumulation_steps: micro-batches accumulated into each minibatch step.
            max_grad_norm: gradient clipping norm (None: off).
            seed: seed of the on/off-policy draws and the minibatch shuffling; None: derived from the run's seed
                (role ``model.algorithm.seed``).
        """
        super().__init__(update_epochs=update_epochs, max_grad_norm=max_grad_norm)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"algorithm.beta must lie in [0, 1], got {beta}")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"algorithm.lmbda must lie in [0, 1], got {lmbda}")
        for name, value in (("num_minibatches", num_minibatches),
                            ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if value < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {value}")
        self.teacher_source, self.teacher_dtype = teacher, teacher_dtype
        self.sampling, self.beta, self.lmbda = sampling, beta, lmbda
        self.loss_aggregation = loss_aggregation
        self.num_minibatches, self.gradient_accumulation_steps, self.seed = (num_minibatches,
                                                                             gradient_accumulation_steps, seed)
        self.updates = 0
        self.on_policy = True
        # The frozen teacher is held in a list, outside the module tree: checkpoints hold only what trains (it is
        # loaded again from `teacher` at start-up, as the host does with its reference) and no strategy wraps it.
        self._teacher: list[nn.Module] = []
        self.generator: torch.Generator | None = None  # the λ draws (a torch.Generator: the host checkpoints it)

    # ------------------------------------------------------------------------------------------ setup
    @hookimpl
    def alignkit_configure(self, module) -> None:
        self.seed = resolve_seed(self.seed, ALGORITHM)
        self.generator = torch.Generator().manual_seed(derive_seed(self.seed, "gkd/lmbda"))
        teacher, tokenizer = load_model(ModelConfig(name_or_path=self.teacher_source, dtype=self.teacher_dtype),
                                        "causal_lm")
        if tokenizer.get_vocab() != module.tokenizer.get_vocab():
            raise PluginError(f"gkd: the teacher {self.teacher_source!r} and the student use different vocabularies; "
                              "token-level distillation needs the student's tokenizer")
        self._teacher = [teacher.requires_grad_(False).eval()]

    def teacher(self, device: torch.device) -> nn.Module:
        """The frozen teacher, on ``device`` (moved there on first use)."""
        if not self._teacher:
            raise PluginError("gkd: the teacher is loaded by alignkit_configure, which has not run")
        model = self._teacher[0]
        if next(model.parameters()).device != torch.device(device):
            model.to(device)
        return model

    # ------------------------------------------------------------------------------------------ rollout
    @hookimpl(tryfirst=True)
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout | None:
        """Off-policy steps (probability 1 − λ): the teacher samples. On-policy steps: None, so the host's rollout
        engine (or any faster one) samples the student."""
        self.on_policy = self.lmbda >= 1.0 or float(torch.rand((), generator=self.generator)) < self.lmbda
        if self.on_policy:
            return None
        batch = batch.to(module.device)
        return generate(self.teacher(module.device), module.tokenizer, batch.input_ids, batch.attention_mask,
                        batch.prompts, self.sampling)

    # ------------------------------------------------------------------------------------------ experience
    @hookimpl
    def alignkit_experience(self, module, rollout: Rollout, scores: Tensor) -> GKDExperience:
        rollout = rollout.to(module.device)
        return GKDExperience(rollout.sequences, rollout.attention_mask, rollout.response_mask.float(),
                             rollout.prompt_length, self.on_policy)

    @hookimpl
    def alignkit_minibatches(self, module, experience: GKDExperience) -> Iterator[list[GKDExperience]]:
        self.updates += 1
        yield from shuffled_minibatches(experience, self.num_minibatches, self.gradient_accumulation_steps,
                                        resolve_seed(self.seed, ALGORITHM), self.updates - 1)

    # ------------------------------------------------------------------------------------------ loss
    @hookimpl
    def alignkit_loss(self, module, batch: GKDExperience) -> LossOutput:
        P, mask = batch.prompt_length, batch.response_mask
        student = response_logits(module.policy, batch.sequences, batch.attention_mask, P)  # (b, R, V)
        with torch.no_grad():
            teacher = response_logits(self.teacher(module.device), batch.sequences, batch.attention_mask, P)
        V = min(student.shape[-1], teacher.shape[-1])  # heads padded past the (equal) vocabularies may differ
        student, teacher = student[..., :V], teacher[..., :V]
        loss, units, _ = distillation_loss(student, teacher, mask, self.beta, self.loss_aggregation)
        with torch.no_grad():
            s, t, targets = student.detach(), teacher, batch.sequences[:, P:]
            stats = {
                "train/loss": loss.detach(), "loss/distill": loss.detach(),
                "distill/reverse_kl": masked_mean(reverse_kl(s, t), mask),
                "distill/forward_kl": masked_mean(forward_kl(s, t), mask),
                "distill/student_logp": masked_mean(token_logprobs(s, targets), mask),
                "distill/teacher_logp": masked_mean(token_logprobs(t, targets), mask),
            }
        return LossOutput(loss, units=units, stats=stats)

    # ------------------------------------------------------------------------------------------ metrics
    @hookimpl
    def alignkit_metrics(self, module, rollout: Rollout, experience: GKDExperience) -> dict[str, float]:
        return {"distill/on_policy": float(experience.on_policy),
                "tokens/response_len_mean": float(experience.response_mask.sum(-1).mean()),
                "tokens/ended_frac": float(rollout.ended.float().mean())}

    # ------------------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        """The count of updates (which seeds the minibatch shuffling); the λ generator is saved by the host."""
        return {"updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
