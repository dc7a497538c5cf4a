"""Token-level divergences for on-policy distillation (GKD: Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes"), as pure functions of the student's and the teacher's
logits at the positions that predict the response tokens.

With ``p_S = softmax(student_logits)`` and ``p_T = softmax(teacher_logits)`` at one position, over the
vocabulary ``v``:

    forward KL   KL(p_T ‖ p_S) = Σ_v p_T(v) (log p_T(v) − log p_S(v))       (mode covering; supervised KD)
    reverse KL   KL(p_S ‖ p_T) = Σ_v p_S(v) (log p_S(v) − log p_T(v))       (mode seeking)
    JSD(β)       β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M),   M = β p_T + (1 − β) p_S,   0 < β < 1

JSD(β) is the paper's generalised Jensen–Shannon divergence (its Eq. with P = teacher, Q = student). It vanishes at
β = 0 and β = 1, but JSD(β)/β → forward KL as β → 0 and JSD(β)/(1 − β) → reverse KL as β → 1 (the gradients
behave like those of the two KLs, as the paper notes), so :func:`generalized_jsd` takes those limits as its
endpoints: **β = 0 is the forward KL KL(teacher ‖ student), β = 1 the reverse KL KL(student ‖ teacher)**, and
β = 0.5 the symmetric Jensen–Shannon divergence.

Shapes: ``B`` sequences, ``R`` response positions, ``V`` vocabulary. Every divergence returns ``(B, R)`` float32.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from alignkit import LossAggregation, agg_loss


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p (log p − log q) over the last dimension, with 0·log 0 = 0 (entries where p = 0, e.g.
    masked logits of −inf, add nothing even where q = 0 too)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def _log_softmax_pair(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must have the same shape (B, R, V), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    return torch.log_softmax(student_logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p_T ‖ p_S) at each position: ``(B, R, V), (B, R, V) -> (B, R)``."""
    log_s, log_t = _log_softmax_pair(student_logits, teacher_logits)
    return _kl(log_t, log_s)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p_S ‖ p_T) at each position: ``(B, R, V), (B, R, V) -> (B, R)``. On-policy distillation's default: the
    student is pushed off the tokens the teacher finds unlikely (mode seeking)."""
    log_s, log_t = _log_softmax_pair(student_logits, teacher_logits)
    return _kl(log_s, log_t)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """The generalised JSD(β) of GKD at each position: ``(B, R, V), (B, R, V) -> (B, R)``.

        M      = β p_T + (1 − β) p_S          (log M by logsumexp, no underflow)
        JSD(β) = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M)

    with the endpoints β = 0 → :func:`forward_kl` KL(p_T ‖ p_S) and β = 1 → :func:`reverse_kl` KL(p_S ‖ p_T)
    (see the module docstring for why).

    Args:
        student_logits: ``(B, R, V)`` (with gradient).
        teacher_logits: ``(B, R, V)`` (frozen).
        beta: β in [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got beta={beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    log_s, log_t = _log_softmax_pair(student_logits, teacher_logits)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, response_mask: Tensor, beta: float,
                      aggregation: LossAggregation = "token-mean") -> tuple[Tensor, Tensor, Tensor]:
    """The GKD loss of a (micro-)batch: JSD(β) per response token, aggregated by
    :func:`alignkit.agg_loss` (``token-mean``: ``L = Σ_bt m_bt D_bt / Σ_bt m_bt``).

    Args:
        student_logits: ``(B, R, V)`` the student's logits predicting each response token (with gradient).
        teacher_logits: ``(B, R, V)`` the teacher's logits at the same positions.
        response_mask: ``(B, R)`` 1 on real response tokens.
        beta: β in [0, 1]: 0 forward KL, 1 reverse KL, else JSD(β).
        aggregation: token-mean, seq-mean-token-sum or seq-mean-token-mean.

    Returns:
        ``(loss, units, per_token)``: the scalar loss, the detached count it averages over (for
        :class:`alignkit.LossOutput` ``units``) and the ``(B, R)`` divergences (0 at masked positions).
    """
    mask = response_mask.to(torch.float32)
    per_token = generalized_jsd(student_logits, teacher_logits, beta) * mask
    loss, units = agg_loss(per_token, mask, aggregation)
    return loss, units, per_token
