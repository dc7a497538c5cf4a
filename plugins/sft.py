"""Supervised fine-tuning (RLHF stage 1): next-token cross-entropy on the response tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.models.final_layer import last_columns
from alignkit.ops import first_target_column
from alignkit.plugin import Algorithm, hookimpl
from alignkit.types import LossOutput, SFTBatch

IGNORE = -100


def sft_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """Mean token cross-entropy of the next-token prediction over labelled positions.

    ``L = −(1/N) Σ_{t: labels[t+1] ≠ −100} log p(labels[t+1] | tokens ≤ t)``, N the number of labelled
    targets; prompt and padding positions carry ``−100`` and count neither in the sum nor in N.

    Args:
        logits: ``(B, T, V)`` model outputs.
        labels: ``(B, T)`` token ids, ``−100`` where masked.
        label_smoothing: cross-entropy label smoothing ε.
    Returns:
        ``(loss, n)``: the scalar loss and this batch's number of labelled target tokens ``N`` (the loss's
        ``LossOutput.units``, with which the host makes the mean exact over accumulated batches and ranks).
    """
    targets = labels[:, 1:]
    count = (targets != IGNORE).sum()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum", label_smoothing=label_smoothing)
    return loss / count.clamp(min=1), count


class SFT(Algorithm):
    """Supervised fine-tuning on demonstrations; prompt tokens and padding are masked out of the loss."""

    data_kind = "sft"

    def __init__(self, label_smoothing: float = 0.0):
        """
        Args:
            label_smoothing: cross-entropy label smoothing (0: none).
        """
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"algorithm.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

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
        loss, count = sft_loss(logits, batch.labels[:, start:], self.label_smoothing)
        return LossOutput(loss, units=count.detach(), stats={"tokens/trained": count.detach().float(),
                                 "ppl": torch.exp(loss.detach().clamp(max=20))})
