"""Loss aggregation whose value does not depend on how an optimiser step's data is split.

An optimiser step sees a minibatch that may be split into micro-batches (``accumulate_grad_batches``, an online
algorithm's gradient accumulation) and spread over data-parallel ranks. Averaging each micro-batch's loss over its
own tokens and then averaging those means weighs a token of a short micro-batch more than one of a long one
(lengths ``[10, 1, 1, 1]`` split in two: ×0.59 on the long row's tokens, ×3.25 on a one-token row). The fix, as in
verl's ``agg_loss``, is to divide every micro-batch's sum by the whole step's count. Two pieces do it:

- a loss computes its local mean with :func:`agg_loss` and reports the count it divided by as
  :attr:`alignkit.LossOutput.units`;
- the host (:class:`StepMean`) differentiates ``mean × units`` (the local sum) for every micro-batch, and before
  the optimiser step (and before clipping) divides the summed gradients by the step's count over every
  micro-batch and rank. The step's gradient is then exactly that of one mean over the whole minibatch.

Shapes: ``B`` sequences, ``T`` tokens per sequence; ``mask`` is 1 on the tokens that count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, get_args

import torch
from torch import Tensor

#: ``token-mean``: every token of the step weighs the same (long responses weigh more);
#: ``seq-mean-token-sum``: per sequence the sum over its tokens, then the mean over sequences (Dr. GRPO);
#: ``seq-mean-token-mean``: per sequence the mean over its tokens, then the mean over sequences (GRPO's paper).
LossAggregation = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
LOSS_AGGREGATIONS: tuple[str, ...] = get_args(LossAggregation)


def agg_loss(values: Tensor, mask: Tensor, mode: LossAggregation = "token-mean") -> tuple[Tensor, Tensor]:
    """Aggregate per-token losses into this batch's scalar loss, and the count of units it averages over.

    With ``m`` the mask and ``n_b = Σ_t m_bt`` the tokens of sequence ``b``:

    - ``token-mean``:          ``L = Σ_bt m_bt·x_bt / N``,          ``N = Σ_b n_b`` (tokens)
    - ``seq-mean-token-sum``:  ``L = Σ_b (Σ_t m_bt·x_bt) / S``,     ``S`` = sequences
    - ``seq-mean-token-mean``: ``L = Σ_b (Σ_t m_bt·x_bt / n_b) / S``, ``S`` = sequences with a token

    Args:
        values: ``(B, T)`` per-token losses (with gradient).
        mask: ``(B, T)`` 1 (or True) on the tokens that count.
        mode: one of :data:`LOSS_AGGREGATIONS`.

    Returns:
        ``(loss, units)``: the scalar mean (0 when there is nothing to average) and the detached count it divides
        by (``N`` or ``S``). Returning ``units`` in :class:`~alignkit.types.LossOutput` lets the host make the
        mean exact over every micro-batch and rank of an optimiser step.

    Raises:
        ValueError: for an unknown ``mode``, listing the valid names.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {', '.join(LOSS_AGGREGATIONS)}")
    m = mask.to(values.dtype)
    sums = (values * m).sum(-1)  # (B,)
    if mode == "token-mean":
        total, units = sums.sum(), m.sum()
    elif mode == "seq-mean-token-sum":
        total, units = sums.sum(), torch.tensor(float(m.shape[0]), device=m.device)
    else:
        lengths = m.sum(-1)  # (B,)
        total, units = (sums / lengths.clamp(min=1.0)).sum(), (lengths > 0).to(m.dtype).sum()
    units = units.detach()
    return total / units.clamp(min=1.0), units


class StepMean:
    """The host's side of :attr:`~alignkit.types.LossOutput.units`: one optimiser step's gradient is the gradient
    of one mean over all of its units, whatever its split into micro-batches and ranks.

    For each micro-batch the host differentiates :meth:`backward_loss`; before clipping and the optimiser step it
    calls :meth:`rescale`. ``parts``: the micro-batches of the step on each rank; the host divides what it
    differentiates by ``parts`` (as Lightning's automatic optimisation does with ``accumulate_grad_batches``).
    With one micro-batch on one process, or a loss without ``units``, the loss is differentiated as it is
    (``loss / parts`` per micro-batch: the mean of the micro-batches' means).
    """

    def __init__(self) -> None:
        self.units = 0.0  # units of this rank's micro-batches since the last rescale
        self.pending = False  # a micro-batch was weighted since the last rescale (then every rank was: same split)

    def backward_loss(self, loss: Tensor, units: Tensor | float | None, parts: int, world: int,
                      gradients_reachable: bool = True, rank_mean: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """What to differentiate (after the host's division by ``parts``) for one micro-batch.

        ``gradients_reachable``: False under strategies that keep gradients in their own buffers (DeepSpeed), where
        :meth:`rescale` cannot reach them: the loss is then weighted by ``units`` over the ranks' mean ``units``
        (``rank_mean``), exact across ranks and a mean of means across micro-batches.
        """
        if units is None or (parts == 1 and world == 1):
            return loss
        count = float(units)
        if not gradients_reachable:
            mean = float(rank_mean(torch.tensor(count, device=loss.device))) if rank_mean is not None else count
            return loss * (count / max(mean, 1e-12))
        self.units += count
        self.pending = True
        return loss * (count * parts)

    @torch.no_grad()
    def rescale(self, parameters: Iterable[Tensor], world: int, reduce_sum: Callable[[Tensor], Tensor],
                device: torch.device) -> None:
        """Divide the accumulated gradients by the step's units over every rank (times ``world``: data parallelism
        averages gradients over the ranks). A no-op when nothing was weighted since the last call."""
        if not self.pending:
            return
        total = float(reduce_sum(torch.tensor(self.units, dtype=torch.float64, device=device)))
        self.units, self.pending = 0.0, False
        scale = world / max(total, 1.0)
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(scale)
