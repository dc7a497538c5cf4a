"""Reward shaping and batch filtering of DAPO (Yu et al. 2025, arXiv:2503.14476), as pure functions.

* Overlong reward shaping (§3.4, eq. 13): a soft length penalty in the last ``L_cache`` tokens before the maximum.
* Dynamic sampling (§3.2): keep only the groups whose rewards are not all equal — a group of equal rewards has zero
  group-relative advantage everywhere and gives no gradient.

Shapes: ``N`` responses in groups of ``k`` consecutive rows per prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["overlong_penalty", "informative_groups", "group_rows"]


def overlong_penalty(lengths: Tensor, max_length: int, cache_length: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the reward:

        R_len(|y|) = 0                                    if |y| ≤ L_max − L_cache
                   = ((L_max − L_cache) − |y|) / L_cache    if L_max − L_cache < |y| ≤ L_max
                   = −1                                   if |y| > L_max

    times ``factor``. It falls linearly from 0 to −1 over the last ``L_cache`` tokens.

    Args:
        lengths: ``(N,)`` response lengths in tokens.
        max_length: L_max (the rollout's ``max_new_tokens``).
        cache_length: L_cache, 1 ≤ L_cache ≤ L_max.
        factor: scale of the penalty.

    Returns:
        ``(N,)`` float penalties in [−factor, 0].
    """
    if not 1 <= cache_length <= max_length:
        raise ValueError(f"overlong cache length must be in [1, {max_length}], got {cache_length}")
    lengths = lengths.float()
    start = float(max_length - cache_length)
    ramp = (start - lengths) / cache_length
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return factor * torch.where(lengths > max_length, torch.full_like(lengths, -1.0), penalty)


def informative_groups(rewards: Tensor, k: int, tolerance: float = 0.0) -> Tensor:
    """DAPO's dynamic-sampling filter (§3.2, the constraint ``0 < |{o_i : is_equivalent(a, o_i)}| < G``, for any
    reward): True for each group whose rewards are not all equal, ``max − min > tolerance``.

    Args:
        rewards: ``(N,)`` rewards, k consecutive rows per prompt.
        k: samples per prompt.
        tolerance: spreads at or below this count as equal.

    Returns:
        ``(N / k,)`` bool.
    """
    groups = rewards.detach().view(-1, k)
    return (groups.amax(-1) - groups.amin(-1)) > tolerance


def group_rows(keep: Tensor, k: int) -> Tensor:
    """The row indices ``(N',)`` of the groups marked in ``keep`` ``(G,)``, each group's k rows in order."""
    groups = keep.nonzero().flatten()
    return (groups[:, None] * k + torch.arange(k, device=keep.device)).flatten()
