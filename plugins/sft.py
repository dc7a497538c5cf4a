"""Supervised fine-tuning (RLHF stage 1): next-token cross-entropy on the response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit import (
    Algorithm,
    LossAggregation,
    LossOutput,
    SFTBatch,
    agg_loss,
    first_target_column,
    hookimpl,
    last_columns,
)

IGNORE = -100


def sft_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
             aggregation: LossAggregation = "token-mean") -> tuple[Tensor, Tensor]:
    """Cross-entropy of the next-token prediction over labelled positions, aggregated by ``aggregation``
    (:func:`alignkit.aggregation.agg_loss`); the default is the token mean

    ``L = −(1/N) Σ_{t: labels[t+1] ≠ −100} log p(labels[t+1] | tokens ≤ t)``, N the number of labelled
    targets; prompt and padding positions carry ``−100`` and count neither in the sum nor in N.

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` token ids, ``−100`` where masked.
        label_smoothing: cross-entropy label smoothing ε.
        aggregation: ``token-mean`` (every target token weighs the same), ``seq-mean-token-sum`` or
            ``seq-mean-token-mean`` (every row weighs the same: a demonstration, or a packed row with packing).
    Returns:
        ``(loss, units)``: the scalar loss and the count it averages over (``N`` for the token mean, the
        demonstrations otherwise: the ``LossOutput.units`` with which the host makes the mean exact over
        accumulated batches and ranks).
    """
    targets = labels[:, 1:]  # (B, T - 1)
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                reduction="none", label_smoothing=label_smoothing).view_as(targets)
    return agg_loss(per_token, targets != IGNORE, aggregation)


class SFT(Algorithm):
    """Supervised fine-tuning on demonstrations; prompt tokens and padding are masked out of the loss."""

    data_kind = "sft"

    def __init__(self, label_smoothing: float = 0.0, loss_aggregation: LossAggregation = "token-mean"):
        """
        Args:
            label_smoothing: cross-entropy label smoothing (0: none).
            loss_aggregation: how token losses are averaged (:func:`alignkit.aggregation.agg_loss`): ``token-mean``
                over every target token of the optimiser step, or a mean over demonstrations (``seq-mean-*``).
        """
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"algorithm.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing, self.loss_aggregation = label_smoothing, loss_aggregation

    @hookimpl
    def alignkit_loss(self, module, batch: SFTBatch) -> LossOutput:
        # The LM head runs only from the column before the batch's first labelled token: the logits of the
        # prompt columns every row shares carry no target (at a 32k vocabulary the LM head is most of the work).
        T = batch.input_ids.shape[1]
        keep = T - first_target_column(batch.labels != IGNORE) + 1
        with last_columns(module.policy, keep) as extra:  # so does the final decoder layer
            logits = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   position_ids=batch.position_ids, use_cache=False,
                                   **extra).logits  # (B, T - start, V)
        start = T - logits.shape[1]  # the first column with logits
        loss, units = sft_loss(logits, batch.labels[:, start:], self.label_smoothing, self.loss_aggregation)
        count = (batch.labels[:, 1:] != IGNORE).sum()
        return LossOutput(loss, units=units, stats={"tokens/trained": count.float(),
                                                    "ppl": torch.exp(loss.detach().clamp(max=20))})
