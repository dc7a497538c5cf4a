"""Typed records that flow between the host (AlignModule) and the plugins.

Shapes: ``B`` sequences, ``P`` prompt length, ``R`` response length, ``T`` full length.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Record = TypeVar("_Record", bound="DataclassInstance")


class TensorRecord:
    """Mixin for dataclasses of tensors: move every tensor field to a device in one call."""

    def to(self: _Record, device: torch.device | str) -> _Record:
        return replace(self, **{
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        })


@dataclass
class LossOutput:
    """What a loss hook returns. ``stats`` are detached scalars for logging (metric name -> value);
    losses never log or step the optimiser themselves."""

    loss: Tensor
    stats: dict[str, Tensor | float] = field(default_factory=dict)
    units: Tensor | float | None = None
    """The count ``loss`` averages over in this batch: tokens for a token mean, sequences (or pairs) for a mean over
    sequences (:func:`alignkit.aggregation.agg_loss` returns it). With it, the host makes an optimiser step's
    gradient that of one mean over the whole step, however the step is split into micro-batches and ranks; None:
    each micro-batch's loss counts as one equal part of the step (a mean of means)."""
    approx_kl: Tensor | float | None = None
    """Online algorithms: the approximate KL between the updated and the sampling policy on this batch (e.g.
    PPO's mean of ``(ρ − 1) − log ρ``); the host stops an update's epochs early once their mean exceeds
    ``target_approx_kl``. None: not measured."""


@dataclass
class SFTBatch(TensorRecord):
    """Demonstrations: ``labels`` is ``input_ids`` with prompt and padding positions set to -100."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    labels: Tensor  # (B, T)
    position_ids: Tensor | None = None  # (B, T), set when sequences are packed


@dataclass
class PreferenceBatch(TensorRecord):
    """Preference pairs. Rows ``[0, B)`` are the chosen sequences and ``[B, 2B)`` the rejected ones,
    so one forward pass scores both (the concatenated forward). Right padded.

    ``loss_mask`` marks response tokens (the tokens whose log-probs form ``log π(y|x)``), aligned with
    ``input_ids``. ``margin`` is the optional per-pair margin column (zeros when absent); ``soft_label`` the
    optional probability that the chosen response is preferred (None: hard labels).
    """

    input_ids: Tensor  # (2B, T)
    attention_mask: Tensor  # (2B, T)
    loss_mask: Tensor  # (2B, T)
    margin: Tensor  # (B,)
    index: Tensor  # (B,) row of each pair in its data set (for cached reference log-probs)
    soft_label: Tensor | None = None  # (B,) P(chosen ≻ rejected) training targets

    @property
    def num_pairs(self) -> int:
        return self.margin.shape[0]


@dataclass
class PromptBatch(TensorRecord):
    """Prompts for online algorithms, left padded so generation appends on the right."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    prompts: list[str]  # the prompt texts, for reward plugins that read text
    index: Tensor  # (B,) row of each prompt in its data set

    def repeat_interleave(self, k: int) -> PromptBatch:
        """Each prompt ``k`` times in a row: rows ``i·k … i·k + k − 1`` are copies of prompt ``i``."""
        return PromptBatch(self.input_ids.repeat_interleave(k, 0), self.attention_mask.repeat_interleave(k, 0),
                           [p for p in self.prompts for _ in range(k)], self.index.repeat_interleave(k))


@dataclass
class Rollout(TensorRecord):
    """Sampled completions from the rollout engine: left-padded prompts followed by right-padded
    responses in one tensor, truncated after the first stop token.

    ``response_mask`` is 1 on real response tokens up to and including the stop token.
    ``logprobs`` are log π_old of the sampled tokens, computed exactly as the training forward computes
    them (same temperature scaling), 0 where ``response_mask`` is 0.
    """

    sequences: Tensor  # (B, P + R) prompt ids then response ids
    attention_mask: Tensor  # (B, P + R)
    response_mask: Tensor  # (B, R)
    logprobs: Tensor  # (B, R)
    ended: Tensor  # (B,) bool: the response ended with a configured stop token / string
    prompt_length: int  # P
    prompts: list[str]
    responses: list[str]  # decoded text, cut at the stop

    @property
    def response_ids(self) -> Tensor:  # (B, R)
        return self.sequences[:, self.prompt_length:]


def shuffled_minibatches(record: Any, num_minibatches: int, micro_batches: int, seed: int,
                         update: int) -> Iterator[list[Any]]:
    """One update epoch of an online algorithm: the rows of ``record`` (anything with ``size`` and ``select(rows)``,
    e.g. an experience record) in an order drawn from ``seed`` and the update's number ``update`` (so a resumed run
    draws the same orders), split into ``num_minibatches`` minibatches, one optimiser step each, of
    ``micro_batches`` micro-batches whose gradients accumulate. What ``alignkit_minibatches`` yields."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + update)
    order = torch.randperm(record.size, generator=generator)
    for rows in order.chunk(num_minibatches):
        yield [record.select(micro) for micro in rows.chunk(micro_batches)]
