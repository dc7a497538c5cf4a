"""The final decoder layer computed only at the columns a loss reads.

A loss reads the last hidden state at a few columns: a reward model at each sequence's last token, a causal LM at
the columns whose logits predict targets (``logits_to_keep``). The layers below the last one must run at every
column, since the last layer's keys and values need them all. The last layer itself is, per column ``t``::

    h_t = x_t + o_proj(attention(q(norm1(x_t)), k(norm1(x_≤t)), v(norm1(x_≤t))))
    y_t = h_t + mlp(norm2(h_t))

so ``y_t`` depends on the other columns only through their keys and values. :func:`final_layer_at` makes the final
layer compute ``y`` at the read columns alone: the keys and values at every column, the query, attention output,
``o_proj``, MLP and their backward at the ``K`` read columns instead of all ``T``. The values are the full
forward's up to float rounding; the backbone's last hidden state then has ``K`` columns instead of ``T``.

With ``H``-wide layers and a ``4H`` MLP, the keys and values are 2 of the layer's 16 ``H²`` per column: a reward
model (``K = 1`` or ``2`` per row) skips ~7/8 of its last layer, a quarter of the matrix products of a 4-layer
model. Applies to transformers ≥ 5 decoder layers of the Llama family (:data:`SUPPORTED_LAYERS`); any other model,
a layer wrapped by FSDP or partitioned by DeepSpeed ZeRO-3, or a forward with a KV cache runs the whole layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from alignkit.ops import last_logits, unwrap_peft

SUPPORTED_LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"})
_LAYERS_RETURN_TENSORS = int(transformers.__version__.split(".")[0]) >= 5  # they returned tuples before 5.0
#: The keywords under which a decoder layer may get the KV cache: ``cache`` from transformers 5.24 on (which deprecates
#: the other), ``past_key_values`` before.
CACHE_KEYWORDS = ("cache", "past_key_values")


class _Attention(Protocol):
    """What :func:`_forward_at` reads of a supported layer's ``self_attn`` (``LlamaAttention`` and its kin)."""

    config: transformers.PretrainedConfig
    head_dim: int
    attention_dropout: float
    scaling: float
    q_proj: nn.Module
    k_proj: nn.Module
    v_proj: nn.Module
    o_proj: nn.Module


class _QKNormAttention(_Attention, Protocol):
    """Qwen3's attention, which also normalises each head's query and key."""

    q_norm: nn.Module
    k_norm: nn.Module


class _DecoderLayer(Protocol):
    """What :func:`_forward_at` reads of a decoder layer of :data:`SUPPORTED_LAYERS` (``nn.Module`` types its
    submodules as ``Tensor | Module``)."""

    training: bool
    self_attn: _Attention
    input_layernorm: nn.Module
    post_attention_layernorm: nn.Module
    mlp: nn.Module


def final_decoder_layer(model: nn.Module) -> nn.Module | None:
    """The last decoder layer of ``model`` (a transformers model, or a peft wrapper of one) when
    :func:`final_layer_at` can compute it at a subset of columns, else None."""
    if not _LAYERS_RETURN_TENSORS:
        return None
    base = unwrap_peft(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", ""), base)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return None
    if len(layers) != getattr(backbone.config, "num_hidden_layers", len(layers)):
        return None
    layer = layers[-1]
    if type(layer).__name__ not in SUPPORTED_LAYERS or "forward" in vars(layer):  # FSDP2 renames; hooks patch forward
        return None
    if any(hasattr(p, "ds_id") for p in layer.parameters()):  # DeepSpeed ZeRO-3 partitions the weights
        return None
    return layer


@contextmanager
def final_layer_at(model: nn.Module, columns: Tensor | int) -> Iterator[bool]:
    """Within the block, ``model``'s final decoder layer computes its output at ``columns`` only.

    Args:
        model: a transformers decoder (causal LM, sequence classifier or bare backbone), or a peft wrapper.
        columns: an int ``n`` for the last ``n`` columns of every row (what ``logits_to_keep=n`` reads), or a
            ``(B,)`` / ``(B, K)`` tensor of column indices per row.

    Yields:
        True when the layer is computed at ``columns`` only: the backbone's last hidden state (and the hidden
        state a causal LM feeds its head) is then ``(B, K, H)``, column ``k`` holding column ``columns[:, k]``;
        ``(B, 1, H)`` for a ``(B,)`` tensor. False when the model is not supported: nothing changes.
    """
    layer = final_decoder_layer(model)
    if layer is None:
        yield False
        return
    full_forward = layer.forward

    def forward_at_columns(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _forward_at(cast(_DecoderLayer, layer), full_forward, columns, hidden_states, *args, **kwargs)

    layer.forward = forward_at_columns
    try:
        yield True
    finally:
        del layer.forward


@contextmanager
def last_columns(model: nn.Module, count: int) -> Iterator[dict[str, int]]:
    """Read a causal LM at its last ``count`` columns: within the block the final decoder layer runs there only
    (:func:`final_layer_at`), and the yielded forward keyword arguments make the LM head do the same
    (``logits_to_keep``, :func:`alignkit.ops.last_logits`; ``{}`` for a model without the option, whose logits
    then cover every column, so callers slice them from the end)."""
    with final_layer_at(model, count):
        yield last_logits(model, count)


def _read_index(columns: Tensor | int, batch: int, length: int, device: torch.device) -> Tensor:
    """``columns`` as a ``(B, K)`` int64 index."""
    if isinstance(columns, int):
        count = min(max(columns, 1), length)
        return torch.arange(length - count, length, device=device).expand(batch, count)
    index = columns.to(device=device, dtype=torch.long)
    return index[:, None] if index.dim() == 1 else index


def _forward_at(layer: _DecoderLayer, full_forward, columns: Tensor | int, hidden_states: Tensor,
                attention_mask: Tensor | None = None, *, position_embeddings: tuple[Tensor, Tensor] | None = None,
                **kwargs: Any) -> Tensor:
    """The decoder layer's output at the read columns, ``(B, T, H) -> (B, K, H)``. A forward the shortcut does not
    cover (one with a KV cache, under whichever of :data:`CACHE_KEYWORDS` transformers passes it, a mask of another
    kind, no position embeddings) runs the whole layer with the keyword arguments it was given, unchanged."""
    B, T, _ = hidden_states.shape
    index = _read_index(columns, B, T, hidden_states.device)  # (B, K)
    rows = torch.arange(B, device=index.device)[:, None]  # (B, 1)
    attn = layer.self_attn
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    mask_rows = _mask_rows(attention_mask, index, T)
    cached = any(kwargs.get(name) is not None for name in CACHE_KEYWORDS)
    if (cached or position_embeddings is None or mask_rows is None
            or (attention_mask is None and window is not None and T > window)):
        full = full_forward(hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                            **kwargs)
        return full[rows, index]
    normed = layer.input_layernorm(hidden_states)  # (B, T, H)
    head_dim = attn.head_dim
    query = attn.q_proj(normed[rows, index]).view(B, index.shape[1], -1, head_dim)  # (B, K, heads, d)
    key = attn.k_proj(normed).view(B, T, -1, head_dim)  # (B, T, kv_heads, d)
    value = attn.v_proj(normed).view(B, T, -1, head_dim).transpose(1, 2)  # (B, kv_heads, T, d)
    if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
        qk_norm = cast(_QKNormAttention, attn)
        query, key = qk_norm.q_norm(query), qk_norm.k_norm(key)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # (B, T, d)
    query = _rotate(query.transpose(1, 2), cos[rows, index], sin[rows, index])  # (B, heads, K, d)
    key = _rotate(key.transpose(1, 2), cos, sin)  # (B, kv_heads, T, d)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    dropout = attn.attention_dropout if layer.training else 0.0
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask_rows, dropout_p=dropout,
                                         scale=attn.scaling)  # (B, heads, K, d)
    out = attn.o_proj(out.transpose(1, 2).reshape(B, index.shape[1], -1))  # (B, K, H)
    hidden = hidden_states[rows, index] + out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x (B, n, S, d)`` with ``cos, sin (B, S, d)``, as the Llama family applies it."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _mask_rows(attention_mask: Tensor | None, index: Tensor, length: int) -> Tensor | None:
    """The attention mask's query rows at ``index (B, K)``: ``(B, 1 or heads, K, T)``; causal when the layer got
    no mask (transformers passes None for an unpadded causal batch). None for a mask of another kind."""
    if attention_mask is None:
        keys = torch.arange(length, device=index.device)
        return (keys[None, None, :] <= index[:, :, None])[:, None]  # (B, 1, K, T)
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4 or attention_mask.shape[-1] != length:
        return None
    B = index.shape[0]
    rows = torch.arange(B, device=index.device)[:, None]
    return attention_mask.expand(B, -1, -1, -1)[rows, :, index].transpose(1, 2)  # (B, heads, K, T)
