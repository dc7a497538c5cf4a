"""Reward model (RLHF stage 2): a scalar scorer learns preferences with the Bradley–Terry loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit import (
    Algorithm,
    LossOutput,
    PreferenceBatch,
    check_shared_prompt,
    hookimpl,
    sequence_scores,
    share_prompts,
)


@dataclass
class BradleyTerryTerms:
    loss: Tensor  # scalar
    accuracy: Tensor  # scalar, detached: fraction of pairs with r_c > r_r


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_coef: float = 0.0, soft_label: Tensor | None = None) -> BradleyTerryTerms:
    """Bradley–Terry preference loss with optional margin, soft labels and reward centring.

    ``L = mean_i[ −p_i log σ(d_i) − (1 − p_i) log σ(−d_i) ] + c · mean_i[ (r_c,i + r_r,i)² ]``,
    ``d_i = r_c,i − r_r,i − m_i``; with hard labels (p = 1) the first term is ``−log σ(d_i)``.

    The margin ``m`` (Llama 2's graded preferences) asks for a larger gap on clearer comparisons; the
    centring term (Eisenstein et al. 2023) keeps rewards near zero, since the BT loss only fixes
    differences. Soft labels ``p`` (Bai et al. 2022 train on an AI judge's option probabilities) make
    the target a probability instead of a certainty.

    Args:
        chosen: ``(B,)`` scores of the preferred responses.
        rejected: ``(B,)`` scores of the rejected responses.
        margin: ``(B,)`` per-pair margins, or None.
        center_coef: weight ``c`` of the centring term (0: off).
        soft_label: ``(B,)`` probabilities ``p`` that the chosen response is preferred, or None (p = 1).
    """
    diff = chosen - rejected - (margin if margin is not None else 0.0)
    if soft_label is None:
        loss = -F.logsigmoid(diff).mean()
    else:
        loss = -(soft_label * F.logsigmoid(diff) + (1 - soft_label) * F.logsigmoid(-diff)).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return BradleyTerryTerms(loss, (chosen > rejected).float().mean().detach())


class RewardModel(Algorithm):
    """Train ``AutoModelForSequenceClassification(num_labels=1)`` on preference pairs; the score of a
    sequence is read at its last real token. Validation reports held-out accuracy."""

    model_head = "sequence_classification"
    data_kind = "preference"

    def __init__(self, use_margin: bool = True, center_coef: float = 0.0, use_soft_labels: bool = True,
                 shared_prompt: bool = False):
        """
        Args:
            use_margin: subtract the data's ``margin`` column inside the sigmoid (zeros when absent).
            center_coef: weight of the reward-centring term ``mean((r_c + r_r)²)`` (0: off).
            use_soft_labels: train on the data's ``soft_label`` column when present (ones when absent).
            shared_prompt: run each pair's prompt once, with both responses after it in one row
                (:mod:`alignkit.pairs`): ``P + 2R`` tokens per pair instead of ``2(P + R)``, the same scores
                up to float rounding. Needs a decoder classifier with sdpa or eager attention.
        """
        super().__init__()
        self.use_margin, self.center_coef, self.use_soft_labels = use_margin, center_coef, use_soft_labels
        self.shared_prompt = shared_prompt

    @hookimpl
    def alignkit_configure(self, module) -> None:
        if self.shared_prompt:
            check_shared_prompt(module.policy, "reward model", needs_score_head=True)

    def pair_scores(self, model, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """``(B,)`` scores of the chosen and of the rejected responses."""
        if self.shared_prompt:
            packed = share_prompts(batch)
            scores = sequence_scores(model, packed.input_ids, packed.attention_mask_for(model), packed.position_ids,
                                     torch.stack([packed.chosen_end, packed.rejected_end], 1))  # (B, 2)
            return scores[:, 0], scores[:, 1]
        scores = sequence_scores(model, batch.input_ids, batch.attention_mask)  # (2B,)
        return scores[: batch.num_pairs], scores[batch.num_pairs:]

    @hookimpl
    def alignkit_loss(self, module, batch: PreferenceBatch) -> LossOutput:
        chosen, rejected = self.pair_scores(module.policy, batch)
        terms = bradley_terry_loss(chosen, rejected, batch.margin if self.use_margin else None, self.center_coef,
                                   batch.soft_label if self.use_soft_labels else None)
        chosen, rejected = chosen.detach(), rejected.detach()
        return LossOutput(terms.loss, units=batch.num_pairs, stats={
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": terms.accuracy,
        })
