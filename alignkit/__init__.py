"""alignkit: aligning language models with human preferences, as plugins on a PyTorch Lightning core.

This namespace is the public API: what an algorithm, reward or task plugin needs, and nothing else. The
built-in plugins (``alignkit_plugins``) and the example packages under ``docs/examples`` import only from
here; the submodules (``alignkit.module``, ``alignkit.run``, …) are the framework's internals and may change.

Names are loaded on first use, so ``import alignkit`` (and ``alignkit --help``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # writing a plugin
    "hookimpl": "alignkit.plugin",
    "Algorithm": "alignkit.plugin",
    "OnlineAlgorithm": "alignkit.plugin",
    "Reward": "alignkit.plugin",
    "RewardOutput": "alignkit.plugin",
    "Task": "alignkit.task",
    "Demonstration": "alignkit.task",
    "PreferencePair": "alignkit.task",
    # the records that hooks pass around
    "TensorRecord": "alignkit.types",
    "SFTBatch": "alignkit.types",
    "PreferenceBatch": "alignkit.types",
    "PromptBatch": "alignkit.types",
    "Rollout": "alignkit.types",
    "LossOutput": "alignkit.types",
    # errors a plugin raises or catches
    "PluginError": "alignkit.errors",
    "DataError": "alignkit.errors",
    "NonFiniteError": "alignkit.errors",
    # forward and loss helpers
    "token_logprobs": "alignkit.ops",
    "entropy_from_logits": "alignkit.ops",
    "masked_sum": "alignkit.ops",
    "masked_mean": "alignkit.ops",
    "masked_whiten": "alignkit.ops",
    "first_target_column": "alignkit.ops",
    "agg_loss": "alignkit.aggregation",
    "LossAggregation": "alignkit.aggregation",
    "sequence_scores": "alignkit.models.loading",
    "last_columns": "alignkit.models.final_layer",
    "SamplingConfig": "alignkit.rollout",
    "response_logprobs": "alignkit.rollout",
    "position_ids_from_mask": "alignkit.rollout",
    "sample_texts": "alignkit.rollout",
    # models and seeds
    "ModelConfig": "alignkit.models.loading",
    "load_model": "alignkit.models.loading",
    "derive_seed": "alignkit.seeds",
    "resolve_seed": "alignkit.seeds",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from alignkit.aggregation import LossAggregation, agg_loss
    from alignkit.errors import DataError, NonFiniteError, PluginError
    from alignkit.models.final_layer import last_columns
    from alignkit.models.loading import ModelConfig, load_model, sequence_scores
    from alignkit.ops import (entropy_from_logits, first_target_column, masked_mean, masked_sum, masked_whiten,
                              token_logprobs)
    from alignkit.plugin import Algorithm, OnlineAlgorithm, Reward, RewardOutput, hookimpl
    from alignkit.rollout import SamplingConfig, position_ids_from_mask, response_logprobs, sample_texts
    from alignkit.seeds import derive_seed, resolve_seed
    from alignkit.task import Demonstration, PreferencePair, Task
    from alignkit.types import LossOutput, PreferenceBatch, PromptBatch, Rollout, SFTBatch, TensorRecord
