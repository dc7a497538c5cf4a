"""DPO-family preference losses as pure functions of per-sequence log-probabilities.

Every loss takes the summed (or length-averaged, see :func:`sequence_logps`) log-probabilities of the
chosen and rejected responses under the policy and the frozen reference model, and works on the
log-ratio margin

    h = (log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x)).

Shapes: ``B`` preference pairs; ``N`` sequences and ``T`` tokens for :func:`sequence_logps`.
Each function returns per-pair losses (the caller reduces them, e.g. with a mean) together with the
implicit rewards β·(log π − log π_ref) of both responses, detached, for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit import masked_mean, masked_sum

DPOVariant = Literal["sigmoid", "ipo", "cdpo", "robust", "hinge"]
DPO_VARIANTS: tuple[str, ...] = get_args(DPOVariant)


@dataclass
class DPOLossTerms:
    """Per-pair outputs of a DPO-family loss.

    ``losses`` carries the autograd graph; both reward tensors are detached (logging only).
    """

    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,) β·(log π(y_c|x) − log π_ref(y_c|x)), detached
    rejected_rewards: Tensor  # (B,) β·(log π(y_r|x) − log π_ref(y_r|x)), detached


def _check_beta(beta: float) -> None:
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got beta={beta}")


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got label_smoothing={label_smoothing}")


def _log_ratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> tuple[Tensor, Tensor]:
    """Chosen and rejected log-ratios log π − log π_ref, each ``(B,)``; checks the four shapes agree."""
    shapes = {
        "policy_chosen_logps": policy_chosen_logps.shape,
        "policy_rejected_logps": policy_rejected_logps.shape,
        "reference_chosen_logps": reference_chosen_logps.shape,
        "reference_rejected_logps": reference_rejected_logps.shape,
    }
    if len(set(shapes.values())) != 1 or policy_chosen_logps.dim() != 1:
        listed = ", ".join(f"{name}={tuple(shape)}" for name, shape in shapes.items())
        raise ValueError(f"log-prob inputs must all have the same shape (B,), got {listed}")
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _terms(losses: Tensor, chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> DPOLossTerms:
    return DPOLossTerms(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> DPOLossTerms:
    """DPO loss (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7):

        L_DPO = −log σ(β h)

    the Bradley–Terry negative log-likelihood of the preference under the implicit reward
    r(x, y) = β log π(y|x)/π_ref(y|x). Computed with ``logsigmoid`` so large |β h| neither overflows
    nor loses precision.

    Args:
        policy_chosen_logps: ``(B,)`` log π(y_c|x).
        policy_rejected_logps: ``(B,)`` log π(y_r|x).
        reference_chosen_logps: ``(B,)`` log π_ref(y_c|x).
        reference_rejected_logps: ``(B,)`` log π_ref(y_r|x).
        beta: inverse temperature β > 0 (strength of the implicit KL penalty).

    Returns:
        :class:`DPOLossTerms` with ``losses`` ``(B,)`` and detached rewards ``(B,)``.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return _terms(losses, chosen, rejected, beta)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> DPOLossTerms:
    """IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17 with τ = β):

        L_IPO = (h − 1/(2β))²

    a squared regression of the log-ratio margin onto the fixed target 1/(2β), so the margin cannot
    grow without bound the way it can under the sigmoid loss.

    The IPO paper states the loss on length-averaged log-probabilities. This function does not
    average: :func:`sequence_logps` does, upstream, with ``length_normalize=True`` (the DPO plugin's
    default for ``loss_type="ipo"``).

    Args:
        policy_chosen_logps: ``(B,)`` log π(y_c|x).
        policy_rejected_logps: ``(B,)`` log π(y_r|x).
        reference_chosen_logps: ``(B,)`` log π_ref(y_c|x).
        reference_rejected_logps: ``(B,)`` log π_ref(y_r|x).
        beta: regularisation strength β = τ > 0; the target margin is 1/(2β).

    Returns:
        :class:`DPOLossTerms` with ``losses`` ``(B,)`` and detached rewards ``(B,)``.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return _terms(losses, chosen, rejected, beta)


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> DPOLossTerms:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"):
    the DPO loss against soft labels, assuming each preference is flipped with probability ε:

        L_cDPO = −(1 − ε) log σ(β h) − ε log σ(−β h)

    With ε = 0 this is exactly :func:`sigmoid_loss`. Its minimiser is the finite margin
    β h = log((1 − ε)/ε) rather than +∞.

    Args:
        policy_chosen_logps: ``(B,)`` log π(y_c|x).
        policy_rejected_logps: ``(B,)`` log π(y_r|x).
        reference_chosen_logps: ``(B,)`` log π_ref(y_c|x).
        reference_rejected_logps: ``(B,)`` log π_ref(y_r|x).
        beta: inverse temperature β > 0.
        label_smoothing: flip probability ε ∈ [0, 0.5).

    Returns:
        :class:`DPOLossTerms` with ``losses`` ``(B,)`` and detached rewards ``(B,)``.
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
    return _terms(losses, chosen, rejected, beta)


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float,
) -> DPOLossTerms:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback"): an unbiased estimate of the clean-label DPO loss when each preference is flipped with
    known probability ε:

        L_rDPO = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)

    Unlike :func:`cdpo_loss` the flipped term enters with a plus sign, which removes the noise in
    expectation; the loss is unbounded below in h for ε > 0 and undefined at ε = 0.5. With ε = 0 it
    equals :func:`sigmoid_loss`.

    Args:
        policy_chosen_logps: ``(B,)`` log π(y_c|x).
        policy_rejected_logps: ``(B,)`` log π(y_r|x).
        reference_chosen_logps: ``(B,)`` log π_ref(y_c|x).
        reference_rejected_logps: ``(B,)`` log π_ref(y_r|x).
        beta: inverse temperature β > 0.
        label_smoothing: flip probability ε ∈ [0, 0.5).

    Returns:
        :class:`DPOLossTerms` with ``losses`` ``(B,)`` and detached rewards ``(B,)``.
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = beta * (chosen - rejected)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    return _terms(losses, chosen, rejected, beta)


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> DPOLossTerms:
    """Hinge loss in the style of SLiC (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration
    with Human Feedback", calibration loss max(0, δ − log π(y_c|x) + log π(y_r|x))), applied to the
    reference-normalised margin:

        L_hinge = relu(1 − β h)

    Since relu(1 − β h) = β · relu(1/β − h), β sets the margin δ = 1/β (up to an overall scale).
    Pairs whose margin already exceeds 1/β get zero loss and zero gradient.

    Args:
        policy_chosen_logps: ``(B,)`` log π(y_c|x).
        policy_rejected_logps: ``(B,)`` log π(y_r|x).
        reference_chosen_logps: ``(B,)`` log π_ref(y_c|x).
        reference_rejected_logps: ``(B,)`` log π_ref(y_r|x).
        beta: inverse margin β > 0.

    Returns:
        :class:`DPOLossTerms` with ``losses`` ``(B,)`` and detached rewards ``(B,)``.
    """
    _check_beta(beta)
    chosen, rejected = _log_ratios(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    losses = torch.relu(1.0 - beta * (chosen - rejected))
    return _terms(losses, chosen, rejected, beta)


def dpo_loss(
    variant: DPOVariant,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DPOLossTerms:
    """Dispatch to the loss named by ``variant``: ``"sigmoid"`` (:func:`sigmoid_loss`), ``"ipo"``
    (:func:`ipo_loss`), ``"cdpo"`` (:func:`cdpo_loss`), ``"robust"`` (:func:`robust_loss`) or
    ``"hinge"`` (:func:`hinge_loss`).

    ``label_smoothing`` (ε ∈ [0, 0.5)) is read only by ``"cdpo"`` and ``"robust"``; a non-zero value
    with any other variant raises instead of being silently ignored.

    All log-prob tensors are ``(B,)``; returns :class:`DPOLossTerms` with ``(B,)`` fields.
    """
    logps = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    if variant == "cdpo":
        return cdpo_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    if variant == "robust":
        return robust_loss(*logps, beta=beta, label_smoothing=label_smoothing)
    if variant not in DPO_VARIANTS:
        raise ValueError(f"unknown DPO variant {variant!r}; expected one of {', '.join(DPO_VARIANTS)}")
    if label_smoothing != 0.0:
        raise ValueError(
            f"label_smoothing={label_smoothing} is only used by the 'cdpo' and 'robust' variants, "
            f"got variant={variant!r}"
        )
    loss_fn = {"sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss}[variant]
    return loss_fn(*logps, beta=beta)


def sequence_logps(token_logps: Tensor, loss_mask: Tensor, length_normalize: bool) -> Tensor:
    """Per-sequence log-probability from per-token log-probabilities:

        log π(y|x) = Σ_t m_t log π(y_t|x, y_<t)                 (length_normalize=False)
        log π(y|x) = Σ_t m_t log π(y_t|x, y_<t) / Σ_t m_t       (length_normalize=True)

    where m is ``loss_mask`` (1 on response tokens). The mean is the length-averaged form used by the
    IPO paper; a sequence with no response token gets 0. Masked-out positions must hold finite values
    (as :func:`alignkit.ops.token_logprobs` guarantees), since they are multiplied by 0.

    Args:
        token_logps: ``(N, T)`` log-probability of each token.
        loss_mask: ``(N, T)`` 1/True on the tokens that count.
        length_normalize: average over response tokens instead of summing.

    Returns:
        ``(N,)`` sequence log-probabilities.
    """
    if token_logps.shape != loss_mask.shape or token_logps.dim() != 2:
        raise ValueError(
            f"token_logps and loss_mask must both be (N, T), got {tuple(token_logps.shape)} "
            f"and {tuple(loss_mask.shape)}"
        )
    mask = loss_mask.to(token_logps.dtype)
    if length_normalize:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)
