"""The KTO algorithm plugin: the policy learns from unpaired desirable/undesirable completions with the loss of
:mod:`alignkit_plugins.kto.losses`, against a frozen reference policy."""

from __future__ import annotations

import sys
from typing import Literal

import torch
from torch import Tensor, nn

from alignkit import (
    Algorithm,
    LossOutput,
    PluginError,
    first_target_column,
    hookimpl,
    last_columns,
    masked_sum,
    token_logprobs,
)
from alignkit_plugins.kto.data import UnpairedBatch
from alignkit_plugins.kto.losses import RECOMMENDED_RATIO, check_kto_args, kto_loss, kto_stats, weight_ratio


def completion_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
    """``(N,)`` float32 log π(y|x): the sum of the completion tokens' log-probs (``loss_mask``) of right-padded rows
    ``(N, T)``. Logits are computed only from the column before the earliest completion token on."""
    T = input_ids.shape[1]
    keep = T - first_target_column(loss_mask) + 1
    with last_columns(model, keep) as extra:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    start = T - logits.shape[1]  # (N, T - start, V): columns start .. T-1
    token_logps = token_logprobs(logits[:, :-1], input_ids[:, start + 1:])  # (N, T - start - 1)
    return masked_sum(token_logps, loss_mask[:, start + 1:].to(token_logps.dtype), dim=-1)


class KTO(Algorithm):
    """Kahneman–Tversky optimisation (Ethayarajh et al. 2024): learns from completions labelled desirable or
    undesirable, one at a time, with no pairs needed (:class:`~alignkit_plugins.kto.data.UnpairedData` also splits
    preference pairs into such rows).

    Each step scores the batch's completions with the policy (with gradient) and the frozen reference, and the
    batch's mismatched pairs (each prompt with another row's completion) with both models without gradient for the
    reference point z₀ (averaged over every data-parallel rank). Logged: ``rewards/{chosen,rejected,margins}``
    (implied rewards β·log π/π_ref of the desirable and the undesirable rows), ``logps/{chosen,rejected}`` and
    ``kto/kl`` (z₀).

    Ethayarajh et al. recommend λ_D·n_D / (λ_U·n_U) in [1, 4/3], for n_D desirable and n_U undesirable training
    rows. Split preference pairs give n_D = n_U, so the default weights fit; for an imbalanced unpaired file set
    ``desirable_weight: auto``, or the run prints a warning naming the value that would fit.
    """

    needs_reference = True
    data_kind = "unpaired"

    def __init__(self, beta: float = 0.1, desirable_weight: float | Literal["auto"] = 1.0,
                 undesirable_weight: float = 1.0):
        """
        Args:
            beta: β, the sharpness of the value function σ(β(r − z₀)) and the strength of the pull towards the
                reference (the paper's default 0.1).
            desirable_weight: λ_D, the weight of desirable rows' losses; ``auto``: ``undesirable_weight × n_U / n_D``
                from the training data's counts, so that λ_D·n_D = λ_U·n_U (printed at the first batch).
            undesirable_weight: λ_U, the weight of undesirable rows' losses.
        """
        super().__init__()
        try:
            check_kto_args(beta, 1.0 if desirable_weight == "auto" else desirable_weight, undesirable_weight)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"algorithm: {exc}") from None
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight
        self._weights: tuple[float, float] | None = None  # (λ_D, λ_U), resolved at the first batch

    @hookimpl
    def alignkit_loss(self, module, batch: UnpairedBatch) -> LossOutput:
        desirable_weight, undesirable_weight = self.weights(module)
        policy_logps = completion_logps(module.policy, batch.input_ids, batch.attention_mask, batch.loss_mask)
        with torch.no_grad():
            policy_kl = completion_logps(module.policy, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask)
            with module.reference_model() as reference:
                both = completion_logps(reference, torch.cat([batch.input_ids, batch.kl_input_ids]),
                                        torch.cat([batch.attention_mask, batch.kl_attention_mask]),
                                        torch.cat([batch.loss_mask, batch.kl_loss_mask]))
        reference_logps, reference_kl = both.split(batch.size)
        terms = kto_loss(policy_logps, reference_logps, batch.desirable, policy_kl, reference_kl, beta=self.beta,
                         desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                         reduce=module.reduce_sum)
        stats = kto_stats(terms, batch.desirable, policy_logps, reduce=module.reduce_sum)
        return LossOutput(terms.losses.mean(), stats=stats, units=batch.size)

    def weights(self, module) -> tuple[float, float]:
        """(λ_D, λ_U): resolved once from the data module's label counts, which are also checked against the
        paper's recommended range (a warning on stderr, on global rank 0)."""
        if self._weights is not None:
            return self._weights
        trainer = attached_trainer(module)
        data = getattr(trainer, "datamodule", None)
        label_counts = getattr(data, "label_counts", None)
        counts: tuple[int, int] | None = label_counts() if callable(label_counts) else None
        undesirable_weight = float(self.undesirable_weight)
        if self.desirable_weight == "auto":
            if counts is None:
                raise PluginError("kto: desirable_weight=auto needs the training data's label counts: give data an "
                                  "alignkit_plugins.kto.UnpairedData (or set desirable_weight to a number)")
            n_d, n_u = counts
            desirable_weight = undesirable_weight * n_u / n_d if n_d and n_u else 1.0
            self.note(module, f"kto: desirable_weight=auto -> {desirable_weight:.4g} ({n_d} desirable, {n_u} "
                              f"undesirable training rows; undesirable_weight={undesirable_weight:g})")
        else:
            desirable_weight = float(self.desirable_weight)
            n_d, n_u = counts if counts is not None else (0, 0)
            ratio = weight_ratio(desirable_weight, undesirable_weight, n_d, n_u)
            low, high = RECOMMENDED_RATIO
            if ratio is not None and not low - 1e-9 <= ratio <= high + 1e-9:
                fit = undesirable_weight * n_u / n_d
                self.note(module, f"alignkit: warning: kto: desirable_weight × {n_d} desirable rows / "
                                  f"(undesirable_weight × {n_u} undesirable rows) = {ratio:.3g}, outside the [1, 4/3] "
                                  f"that Ethayarajh et al. 2024 recommend: set "
                                  f"model.algorithm.init_args.desirable_weight={fit:.4g} (or auto)", warning=True)
        self._weights = (desirable_weight, undesirable_weight)
        return self._weights

    @staticmethod
    def note(module, message: str, warning: bool = False) -> None:
        """Print ``message`` once (global rank 0), on stderr for a warning."""
        trainer = attached_trainer(module)
        if trainer is None or trainer.is_global_zero:
            print(message, file=sys.stderr if warning else sys.stdout, flush=True)


def attached_trainer(module):
    """The module's Lightning trainer, or None when it is used outside one (``module.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None
