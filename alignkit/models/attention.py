"""The attention windows of a model's decoder layers, for code that draws its own 4D attention masks (the
shared-prompt layout, :mod:`alignkit.pairs`).

transformers uses a custom 4D mask as given, for every layer: it no longer adds the sliding window of a model whose
layers attend to the last ``W`` positions only (Mistral, Phi-3, Gemma 2 and 3, Qwen2/3 with ``use_sliding_window``).
A custom mask must then carry the window itself, and a model that mixes full and sliding-window layers (Gemma 2
and 3) reads one mask per kind of layer, a dict keyed by the layer types of its config.
"""

from __future__ import annotations

from torch import nn

from alignkit.ops import unwrap_peft

FULL, SLIDING = "full_attention", "sliding_attention"


def attention_windows(model: nn.Module) -> dict[str, int | None]:
    """The attention window of each kind of decoder layer of ``model`` (a transformers model or a peft wrapper),
    keyed by transformers' layer type: None for full (causal) attention, ``W`` for a sliding window, where a query
    attends to keys less than ``W`` positions back (transformers' ``sliding_window_overlay``). One entry when every
    layer attends alike, two for a model that mixes full and sliding-window layers.

    Raises:
        ValueError: the config names a layer type that is neither (chunked or linear attention, state-space layers),
            whose context a 4D mask cannot describe.
    """
    config = getattr(unwrap_peft(model), "config", None)
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):  # a multimodal model's text decoder (Gemma 3's) has its own config inside
        config = text_config()
    window = getattr(config, "sliding_window", None)
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    layer_types = getattr(config, "layer_types", None)
    if not layer_types:  # every layer alike: Mistral and Phi-3 slide wherever a window is set
        return {SLIDING: window} if window is not None else {FULL: None}
    unknown = sorted(set(layer_types) - {FULL, SLIDING})
    if unknown:
        raise ValueError(f"{type(config).__name__} has layers of type {', '.join(map(repr, unknown))}, whose context "
                         f"a 4D attention mask does not describe")
    return {kind: window if kind == SLIDING else None for kind in sorted(set(layer_types))}
