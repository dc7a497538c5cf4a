"""Small tensor operations shared by every algorithm: masked reductions and token log-probabilities.

Shapes: ``B`` batch, ``T`` sequence length, ``V`` vocabulary size. Masks are ``1`` (or ``True``) on the
tokens that count and ``0`` elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is set. values, mask: same shape."""
    masked = values * mask
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set (0 where nothing is set)."""
    mask = mask.to(values.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the masked entries; ``unbiased`` applies Bessel's correction n/(n-1)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries; with ``shift_mean=False`` the mean is
    added back, so only the scale changes. Unmasked positions are returned as computed (callers mask them).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
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
