"""Online DPO's pure functions: labelling the two sampled responses of each prompt, and the DPO loss on the
labelled pairs (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

The host samples ``samples_per_prompt = 2`` responses per prompt, consecutively: rows ``2i`` (response *a*) and
``2i + 1`` (response *b*) answer prompt ``i``. A judge prefers one of them; the pair then gets the DPO-family loss
of :mod:`alignkit_plugins.dpo.losses` against the frozen reference.

Shapes: ``N`` prompts (pairs), ``2N`` sampled rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit import agg_loss, masked_mean
from alignkit_plugins.dpo.losses import DPOLossTerms, DPOVariant, dpo_loss


@dataclass
class OnlinePairs:
    """The labelled pairs of one rollout: row indices into the ``2N`` sampled rows, and which pairs count."""

    chosen: Tensor  # (N,) int64: the preferred row of each pair, 2i or 2i + 1
    rejected: Tensor  # (N,) int64: the other row
    keep: Tensor  # (N,) bool: neither a tie nor two identical responses
    ties: Tensor  # (N,) bool: the judge had no preference
    identical: Tensor  # (N,) bool: both responses are the same tokens (or text)


def judge_by_scores(scores: Tensor, tie_margin: float = 0.0) -> tuple[Tensor, Tensor]:
    """A judge from scalar scores: response *a* (row ``2i``) wins iff ``s_2i − s_2i+1 > tie_margin``; the pair is
    a tie when ``|s_2i − s_2i+1| ≤ tie_margin``.

    Args:
        scores: ``(2N,)`` one score per sampled row (the host's combined reward).
        tie_margin: score gaps up to this are ties (0: only exactly equal scores).

    Returns:
        ``(a_wins, ties)``, each ``(N,)`` bool.
    """
    if scores.dim() != 1 or scores.shape[0] % 2:
        raise ValueError(f"scores must be (2N,) with the two samples of each prompt consecutive, "
                         f"got {tuple(scores.shape)}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    pairs = scores.detach().float().view(-1, 2)  # (N, 2): a, b
    delta = pairs[:, 0] - pairs[:, 1]
    ties = delta.abs() <= tie_margin
    return (delta > 0) & ~ties, ties


def identical_responses(response_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Whether the two responses of each prompt are the same tokens: same length, same ids where unmasked.

    Args:
        response_ids: ``(2N, R)`` sampled response tokens.
        response_mask: ``(2N, R)`` 1 on real response tokens.

    Returns:
        ``(N,)`` bool.
    """
    mask = response_mask.bool()
    ids = torch.where(mask, response_ids, torch.full_like(response_ids, -1)).view(-1, 2, response_ids.shape[-1])
    return (ids[:, 0] == ids[:, 1]).all(-1)


def build_pairs(a_wins: Tensor, ties: Tensor, identical: Tensor) -> OnlinePairs:
    """Chosen and rejected rows from the judge's verdicts: pair ``i`` is (``2i``, ``2i + 1``) when *a* wins, else
    (``2i + 1``, ``2i``); ties and identical responses are kept in place but marked ``keep = False`` (their loss
    weight is 0, so every process still runs the same forward and backward passes).

    Args:
        a_wins: ``(N,)`` bool, the judge prefers row ``2i``.
        ties: ``(N,)`` bool, the judge has no preference.
        identical: ``(N,)`` bool, the two responses are the same.

    Returns:
        :class:`OnlinePairs` with ``(N,)`` fields.
    """
    if not a_wins.shape == ties.shape == identical.shape or a_wins.dim() != 1:
        raise ValueError(f"a_wins, ties and identical must all be (N,), got {tuple(a_wins.shape)}, "
                         f"{tuple(ties.shape)}, {tuple(identical.shape)}")
    first = 2 * torch.arange(a_wins.shape[0], device=a_wins.device)
    b_wins = (~a_wins.bool()).long()
    chosen, rejected = first + b_wins, first + 1 - b_wins
    ties, identical = ties.bool(), identical.bool()
    return OnlinePairs(chosen, rejected, ~ties & ~identical, ties & ~identical, identical)


@dataclass
class OnlineDPOLoss:
    """The mean loss over the kept pairs of a micro-batch, the count it divides by, and the per-pair terms."""

    loss: Tensor  # () Σ_i k_i ℓ_i / max(Σ_i k_i, 1), with gradient
    units: Tensor  # () Σ_i k_i, detached: the kept pairs
    terms: DPOLossTerms  # per-pair losses ℓ (N,) and detached implicit rewards (N,)


def online_dpo_loss(variant: DPOVariant, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    reference_chosen_logps: Tensor, reference_rejected_logps: Tensor, keep: Tensor, beta: float,
                    label_smoothing: float = 0.0) -> OnlineDPOLoss:
    """The DPO-family loss (:func:`alignkit_plugins.dpo.losses.dpo_loss`) on freshly labelled pairs, averaged over
    the pairs that count:

        h_i = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))
        ℓ_i = −log σ(β h_i)  (sigmoid; ipo: (h_i − 1/(2β))², ...)
        L   = Σ_i k_i ℓ_i / Σ_i k_i

    with ``k_i = 1`` for a kept pair and 0 for a tie or two identical responses. ``units = Σ k_i`` lets the host
    make the mean exact over micro-batches and ranks (:func:`alignkit.agg_loss`); a micro-batch with no kept pair
    has loss 0 (and no gradient) and 0 units.

    Args:
        variant: sigmoid, ipo, cdpo, robust or hinge.
        policy_chosen_logps, policy_rejected_logps: ``(N,)`` log π of each pair's chosen / rejected response.
        reference_chosen_logps, reference_rejected_logps: ``(N,)`` the same under the frozen reference.
        keep: ``(N,)`` bool or 0/1: the pairs that count.
        beta: β > 0.
        label_smoothing: ε for cdpo and robust.
    """
    terms = dpo_loss(variant, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                     reference_rejected_logps, beta=beta, label_smoothing=label_smoothing)
    keep = keep.to(terms.losses.dtype)
    # a dropped pair's loss may be anything finite; zero it so 0·ℓ never meets an inf
    losses = torch.where(keep.bool(), terms.losses, torch.zeros_like(terms.losses))
    loss, units = agg_loss(losses[:, None], keep[:, None], "token-mean")
    return OnlineDPOLoss(loss, units, terms)


def pair_stats(result: OnlineDPOLoss, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               keep: Tensor) -> dict[str, Tensor]:
    """The preference-learning metrics over the kept pairs (0 when none): ``rewards/{chosen,rejected,margins,
    accuracies}`` (implicit rewards β·log π/π_ref) and ``logps/{chosen,rejected}``, all detached."""
    chosen, rejected = result.terms.chosen_rewards, result.terms.rejected_rewards
    m = keep.float()
    return {
        "rewards/chosen": masked_mean(chosen, m), "rewards/rejected": masked_mean(rejected, m),
        "rewards/margins": masked_mean(chosen - rejected, m),
        "rewards/accuracies": masked_mean((chosen > rejected).float(), m),
        "logps/chosen": masked_mean(policy_chosen_logps.detach(), m),
        "logps/rejected": masked_mean(policy_rejected_logps.detach(), m),
    }
