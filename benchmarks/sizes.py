"""What is benchmarked: model sizes (named :class:`~alignkit.models.TinyModelConfig` values) and the workload."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from alignkit.models import TinyModelConfig


@dataclass
class Size:
    """A benchmarked model: the tiny model's architecture and tokenizer at another shape."""

    name: str = "tiny"
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    """The shape (``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``); its ``vocab_size`` bounds
    the tokenizer as in recipes (the default: the built-in task's tokenizer, ~430 tokens)."""
    pad_vocab_to: int | None = None
    """Pad the vocabulary (embedding and LM head) to this many ids, like the 32k-150k vocabularies of real
    models (padded ids never occur in the data). None: no padding."""


def _size(name: str, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
          pad_vocab_to: int | None = None) -> Size:
    return Size(name, TinyModelConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                                      intermediate_size=intermediate_size), pad_vocab_to)


#: Every named size: the tiny default model up to ~25M parameters (CPU) and ~350M (GPU).
PRESETS: dict[str, Size] = {s.name: s for s in [
    _size("smoke", 32, 2, 2, 64),
    _size("tiny", 64, 4, 4, 256),
    _size("5M", 256, 6, 4, 768),
    _size("25M", 512, 6, 8, 2048),
    _size("25M-v32k", 384, 4, 6, 1536, pad_vocab_to=32000),
    _size("120M-v32k", 768, 12, 12, 3072, pad_vocab_to=32000),
    _size("350M-v32k", 1024, 24, 16, 4096, pad_vocab_to=32000),
]}
CPU_SIZES = [PRESETS[n] for n in ("tiny", "5M", "25M", "25M-v32k")]
GPU_SIZES = [PRESETS[n] for n in ("25M", "25M-v32k", "120M-v32k", "350M-v32k")]
SMOKE_SIZES = [PRESETS["smoke"]]


def resolve_sizes(sizes: list[Size | str]) -> list[Size]:
    """Preset names (``"25M-v32k"``) replaced by their :class:`Size`."""
    unknown = [s for s in sizes if isinstance(s, str) and s not in PRESETS]
    if unknown:
        raise ValueError(f"unknown size {unknown[0]!r}; presets: {', '.join(PRESETS)} (or a {{name, model, "
                         f"pad_vocab_to}} mapping)")
    return [PRESETS[s] if isinstance(s, str) else s for s in sizes]


def tiny_config(size: Size, max_position_embeddings: int, seed: int) -> TinyModelConfig:
    """The size's :class:`TinyModelConfig` with room for the workload's positions and the benchmark's seed."""
    positions = max(size.model.max_position_embeddings, max_position_embeddings)
    return replace(size.model, max_position_embeddings=positions, seed=seed)


def size_dict(size: Size) -> dict:
    """A :class:`Size` as plain data (the measurement spec and the report's config)."""
    return {"name": size.name, "model": {f.name: getattr(size.model, f.name) for f in fields(TinyModelConfig)},
            "pad_vocab_to": size.pad_vocab_to}


@dataclass
class Workload:
    """Batch and sequence lengths, identical for every framework."""

    batch_size: int = 16
    """Sequences per SFT step, preference pairs per RM/DPO step, completions per online step."""
    max_length: int = 64
    """Longest prompt + response, in tokens (SFT, RM, DPO)."""
    max_prompt_length: int = 16
    max_new_tokens: int = 24
    """Generated tokens per completion (online RL)."""
    update_epochs: int = 1
    """PPO epochs per online step (RLOO: ``num_iterations``)."""
    num_pairs: int = 512
    """Synthetic preference pairs / prompts / demonstrations written for the run."""


SMOKE_WORKLOAD = Workload(batch_size=4, max_length=48, max_prompt_length=16, max_new_tokens=6, update_epochs=1,
                          num_pairs=32)
