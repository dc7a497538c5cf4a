"""Shared-prompt layout of preference pairs: the prompt once, then the chosen and the rejected response, in one row.

The concatenated layout of :class:`~alignkit.types.PreferenceBatch` runs the prompt through the model twice per
pair (``2(P + R)`` tokens). Here row ``i`` holds ``[prompt | chosen | rejected]`` (``P + 2R`` tokens) and a
block attention mask keeps the two responses apart::

    key →        p p p c c r r
    query  p     1 . . . . . .
           p     1 1 . . . . .
           p     1 1 1 . . . .
           c     1 1 1 1 . . .        chosen: causal over the prompt and itself
           c     1 1 1 1 1 . .
           r     1 1 1 . . 1 .        rejected: the prompt and itself, never the chosen tokens
           r     1 1 1 . . 1 1

The rejected positions restart where the prompt ends, so every token sees exactly the context and position it
has in the concatenated layout, and scores and log-probs agree with it up to float rounding. Needs a model that
takes a 4D attention mask and ``position_ids`` (transformers' decoders with ``sdpa`` or ``eager`` attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignkit.models.attention import attention_windows
from alignkit.ops import unwrap_peft
from alignkit.types import PreferenceBatch, TensorRecord

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1
MASK_IMPLEMENTATIONS = ("sdpa", "eager")  # attention implementations that take a custom 4D mask


@dataclass
class SharedPromptPairs(TensorRecord):
    """``B`` preference pairs, one row each: prompt, chosen response, rejected response, right padding."""

    input_ids: Tensor  # (B, S)
    position_ids: Tensor  # (B, S): 0 … P+Rc−1 over prompt and chosen, P … P+Rr−1 over rejected, 0 on padding
    segment: Tensor  # (B, S): PROMPT, CHOSEN, REJECTED or PAD
    prompt_length: Tensor  # (B,) P
    chosen_end: Tensor  # (B,) column of the last chosen token (the last prompt token's if the response is empty)
    rejected_end: Tensor  # (B,) column of the last rejected token (likewise)

    def attention_mask(self, implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
                       window: int | None = None) -> Tensor:
        """The ``(B, 1, S, S)`` mask drawn in the module docstring, in the form the attention implementation
        reads: boolean (True = attend) for ``sdpa``, additive (0 or the dtype's minimum) for ``eager``. With a
        sliding ``window``, a query also sees only the keys less than ``window`` positions before its own, as in
        the concatenated layout (:func:`~alignkit.models.attention.attention_windows`)."""
        if implementation not in MASK_IMPLEMENTATIONS:
            raise ValueError(f"shared_prompt needs a model with sdpa or eager attention (4D masks), "
                             f"got attn_implementation={implementation!r}")
        S = self.segment.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.segment.device).tril()  # (S, S)
        query, key = self.segment[:, :, None], self.segment[:, None, :]  # (B, S, 1), (B, 1, S)
        allowed = causal & (key != PAD) & ~((query == REJECTED) & (key == CHOSEN))  # (B, S, S)
        if window is not None:  # positions, not columns: the rejected response's restart after the prompt
            allowed &= (self.position_ids[:, :, None] - self.position_ids[:, None, :]) < window
        allowed |= torch.eye(S, dtype=torch.bool, device=allowed.device)  # padding rows attend to themselves
        allowed = allowed[:, None]
        if implementation == "sdpa":
            return allowed
        additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return additive.masked_fill(~allowed, torch.finfo(dtype).min)

    def attention_mask_for(self, model: torch.nn.Module) -> Tensor | dict[str, Tensor]:
        """:meth:`attention_mask` in the form ``model``'s attention implementation and parameter dtype need, with the
        window of its sliding-window layers: one mask, or one per layer type for a model that mixes full and
        sliding-window layers (Gemma 2 and 3), keyed as its decoder reads them."""
        implementation, dtype = attention_implementation(model), next(model.parameters()).dtype
        masks = {kind: self.attention_mask(implementation, dtype, window)
                 for kind, window in attention_windows(model).items()}
        return next(iter(masks.values())) if len(masks) == 1 else masks


def share_prompts(batch: PreferenceBatch) -> SharedPromptPairs:
    """Rearrange a concatenated preference batch into the shared-prompt layout.

    Rows ``i`` (chosen) and ``B + i`` (rejected) of ``batch`` must start with the same prompt, whose length is
    where row ``i``'s ``loss_mask`` starts (as :class:`~alignkit.data.modules.PreferenceData` collates them).
    Shapes: ``(2B, T)`` in, ``(B, S)`` out with ``S = max_i(P_i + Rc_i + Rr_i)``.
    """
    pairs = batch.num_pairs
    ids, real, targets = batch.input_ids, batch.attention_mask.bool(), batch.loss_mask.bool()
    chosen_length = real[:pairs].sum(1)  # P + Rc
    rejected_length = real[pairs:].sum(1)  # P + Rr
    has_response = targets[:pairs].any(1)
    prompt = torch.where(has_response, targets[:pairs].float().argmax(1), chosen_length)  # (B,) P
    length = chosen_length + rejected_length - prompt  # P + Rc + Rr
    column = torch.arange(int(length.max()), device=ids.device)[None]  # (1, S)
    in_chosen = column < chosen_length[:, None]  # prompt and chosen columns come from the chosen row
    valid = column < length[:, None]
    rows = torch.arange(pairs, device=ids.device)[:, None]
    source_row = torch.where(in_chosen, rows, rows + pairs)
    source_column = torch.where(in_chosen, column, column - chosen_length[:, None] + prompt[:, None])
    source_column = source_column.clamp(0, ids.shape[1] - 1)
    segment = torch.where(column < prompt[:, None], PROMPT, torch.where(in_chosen, CHOSEN, REJECTED))
    return SharedPromptPairs(
        input_ids=ids[source_row, source_column].masked_fill(~valid, 0),
        position_ids=source_column.masked_fill(~valid, 0),
        segment=segment.masked_fill(~valid, PAD),
        prompt_length=prompt,
        chosen_end=chosen_length - 1,
        rejected_end=torch.where(length > chosen_length, length - 1, prompt - 1),
    )


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation a transformers model (or peft wrapper) runs with; "sdpa" if it says none."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "sdpa"


def check_shared_prompt(model: torch.nn.Module, algorithm: str, needs_score_head: bool = False) -> None:
    """Refuse, at set-up and in one line, a model that cannot run the shared-prompt layout."""
    from alignkit.manager import PluginError

    implementation = attention_implementation(model)
    if implementation not in MASK_IMPLEMENTATIONS:
        raise PluginError(f"{algorithm}: shared_prompt needs sdpa or eager attention (4D masks), the model uses "
                          f"{implementation!r}; set shared_prompt=false")
    try:
        attention_windows(model)
    except ValueError as exc:
        raise PluginError(f"{algorithm}: shared_prompt needs attention layers: {exc}; "
                          f"set shared_prompt=false") from None
    base = unwrap_peft(model)
    if needs_score_head and not isinstance(getattr(base, "score", None), torch.nn.Module):
        raise PluginError(f"{algorithm}: shared_prompt needs a decoder classifier with a per-token score head, "
                          f"{type(base).__name__} has none; set shared_prompt=false")
