"""Small tensor operations shared by every algorithm: masked reductions and token log-probabilities.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary size. Masks are ``1`` (or ``True``) on the
tokens that count and ``0`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

if TYPE_CHECKING:
    from peft import PeftModel

#: A reduction of a tensor across data-parallel ranks (e.g. all-reduce sum); identity on one process.
Reduce = Callable[[Tensor], Tensor]


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set. values, mask: same shape."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None, reduce: Reduce | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (0 where nothing is set).

    ``reduce`` (e.g. an all-reduce sum across data-parallel ranks) makes it the mean over every rank's
    masked entries; only for ``dim=None``.
    """
    mask = mask.to(values.dtype)
    if dim is not None:
        return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1.0)
    total = torch.stack([masked_sum(values, mask), mask.sum()])
    total = reduce(total) if reduce is not None else total
    return total[0] / total[1].clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Variance of the masked entries; ``unbiased`` applies Bessel's correction n/(n-1). With ``reduce``,
    the variance of every rank's masked entries (two reductions: the mean, then the squared deviations)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask, reduce=reduce)
    total = torch.stack([masked_sum((values - mean) ** 2, mask), mask.sum()])
    total = reduce(total) if reduce is not None else total
    squares, n = total[0], total[1]
    return squares / ((n - 1) if unbiased else n).clamp(min=1.0)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Reduce | None = None) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (of every rank, with ``reduce``); with
    ``shift_mean=False`` the mean is added back, so only the scale changes. Unmasked positions are returned
    as computed (callers mask them).
    """
    mean, var = masked_mean(values, mask, reduce=reduce), masked_var(values, mask, reduce=reduce)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[label] for every position, without keeping a full
    ``B×T×V`` log-softmax tensor around: ``logit[label] - logsumexp(logits)``.

    logits: ``(B, T, V)``; labels: ``(B, T)`` (any value where the caller will mask, e.g. ``-100``,
    is clamped to a valid index). Returns ``(B, T)`` in float32.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    index = labels.clamp(min=0).unsqueeze(-1)
    picked = logits.gather(-1, index).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position. logits ``(B, T, V)`` -> ``(B, T)``."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def first_target_column(mask: Tensor) -> int:
    """The earliest column (at least 1) at which any row of ``mask`` ``(B, T)`` holds a target token.

    A causal LM needs logits only from column ``first - 1`` on to predict the targets, so callers pass
    ``logits_to_keep = T - first + 1`` and skip the LM head (``H × V`` per position), the log-softmax and their
    backward over the prompt columns that every row shares. 1 when nothing is masked in.
    """
    rows = mask.bool().any(-1)
    if not bool(rows.any()):
        return 1
    return max(int(mask.bool().float().argmax(-1)[rows].min()), 1)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its adapters stay active), or ``model`` itself."""
    if hasattr(model, "get_base_model"):  # a peft wrapper (nn.Module types its attributes as Tensor | Module)
        return cast("PeftModel", model).get_base_model()
    return model


def accepts_argument(model: torch.nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` (of the base model, for a peft wrapper) takes ``argument`` by name."""
    import inspect

    return argument in inspect.signature(unwrap_peft(model).forward).parameters


def last_logits(model: torch.nn.Module, count: int) -> dict[str, int]:
    """Forward keyword arguments that make a causal LM compute logits at its last ``count`` positions only
    (``logits_to_keep``); ``{}`` for a model without the option, which returns every position's logits.
    Callers slice from the end, or read how many columns came back from ``logits.shape[1]``."""
    return {"logits_to_keep": count} if accepts_argument(model, "logits_to_keep") else {}


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a KV cache: ``cache`` from transformers 5.24 on (which
    deprecates ``past_key_values`` with a warning), ``past_key_values`` before."""
    return "cache" if accepts_argument(model, "cache") else "past_key_values"


def returned_cache(output):
    """The KV cache that a model's forward returned in ``output``: ``output.cache`` from transformers 5.24 on (whose
    ``past_key_values`` still reads it, with a deprecation warning), ``output.past_key_values`` before."""
    return output.cache if hasattr(output, "cache") else output.past_key_values


@contextmanager
def cached_autocast(device_type: str) -> Iterator[None]:
    """Inside a mixed-precision region, cast each trained weight to the low-precision dtype once for the
    duration of the block instead of once per forward call; a no-op outside autocast.

    Lightning's mixed precision autocasts with ``cache_enabled=False`` (weights change between steps), so every
    forward casts every weight again: in a decoding loop that is one full copy of the weights per generated
    token. For a block in which the weights do not change (a rollout) the casts are kept and reused, then
    dropped on exit, so nothing stale outlives the block. torch caches only leaf tensors that require grad,
    so frozen weights are still cast per call. The computed values are unchanged (the same deterministic cast).
    """
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    try:
        with torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=True):
            yield
    finally:
        torch.clear_autocast_cache()


@contextmanager
def training_attention(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """The attention kernel for a training forward: on CPU with a 16-bit compute ``dtype`` (autocast or 16-bit
    weights), ``scaled_dot_product_attention``'s math kernel instead of the flash-attention one, whose CPU
    backward in bfloat16 is several times slower (its forward slightly faster; measured: see
    benchmarks/README.md#cpu-attention-in-bf16). The choice is made at the forward, whose backward follows it.
    Elsewhere: unchanged.
    """
    if device_type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
