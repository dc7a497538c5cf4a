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
    "shuffled_minibatches": "alignkit.types",
    # errors a plugin raises or catches
    "PluginError": "alignkit.errors",
    "ConfigError": "alignkit.errors",
    "DataError": "alignkit.errors",
    "NonFiniteError": "alignkit.errors",
    "RunExistsError": "alignkit.errors",
    # forward and loss helpers
    "token_logprobs": "alignkit.ops",
    "entropy_from_logits": "alignkit.ops",
    "masked_sum": "alignkit.ops",
    "masked_mean": "alignkit.ops",
    "masked_whiten": "alignkit.ops",
    "first_target_column": "alignkit.ops",
    "Reduce": "alignkit.ops",
    "agg_loss": "alignkit.aggregation",
    "LossAggregation": "alignkit.aggregation",
    "sequence_scores": "alignkit.models.loading",
    "last_columns": "alignkit.models.final_layer",
    "share_prompts": "alignkit.pairs",
    "check_shared_prompt": "alignkit.pairs",
    "SharedPromptPairs": "alignkit.pairs",
    "CHOSEN": "alignkit.pairs",
    "REJECTED": "alignkit.pairs",
    "SamplingConfig": "alignkit.rollout",
    "response_logprobs": "alignkit.rollout",
    "position_ids_from_mask": "alignkit.rollout",
    "sample_texts": "alignkit.rollout",
    "left_pad": "alignkit.rollout",
    "right_pad": "alignkit.data.modules",
    "encode_prompt": "alignkit.data.tokenize",
    "encode_response": "alignkit.data.tokenize",
    "truncate_to_fit": "alignkit.data.tokenize",
    "TruncationStats": "alignkit.data.tokenize",
    # reward arithmetic
    "aggregate_ensemble": "alignkit.rewards",
    "EnsembleMethod": "alignkit.rewards",
    "ENSEMBLE_METHODS": "alignkit.rewards",
    # simulated feedback
    "SimulatedAnnotator": "alignkit.task",
    "bradley_terry": "alignkit.task",
    "Lexicon": "alignkit.task",
    "sample_pairs": "alignkit.collect",
    "label_summary": "alignkit.collect",
    "PREFERENCES_FILE": "alignkit.collect",
    # models and seeds
    "ModelConfig": "alignkit.models.loading",
    "load_model": "alignkit.models.loading",
    "derive_seed": "alignkit.seeds",
    "resolve_seed": "alignkit.seeds",
    "fixed_seed": "alignkit.seeds",
    "ANNOTATOR": "alignkit.seeds",
    "FEEDBACK": "alignkit.seeds",
    "ALGORITHM": "alignkit.seeds",
    # files: atomic writes and JSON lines
    "read_jsonl": "alignkit.io",
    "read_user_text": "alignkit.io",
    "write_jsonl": "alignkit.io",
    "append_jsonl": "alignkit.io",
    "atomic_write_text": "alignkit.io",
    "atomic_write_json": "alignkit.io",
    "atomic_write_bytes": "alignkit.io",
    # runs: training, evaluating, run directories
    "fit": "alignkit.fitting",
    "finish_wandb_run": "alignkit.fitting",
    "evaluate": "alignkit.evaluation",
    "default_run_dir": "alignkit.run",
    "check_fresh": "alignkit.run",
    "METRICS_FILE": "alignkit.run",
    "MODEL_DIR": "alignkit.run",
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
    from alignkit.collect import PREFERENCES_FILE, label_summary, sample_pairs
    from alignkit.data.modules import right_pad
    from alignkit.data.tokenize import TruncationStats, encode_prompt, encode_response, truncate_to_fit
    from alignkit.errors import ConfigError, DataError, NonFiniteError, PluginError, RunExistsError
    from alignkit.evaluation import evaluate
    from alignkit.fitting import finish_wandb_run, fit
    from alignkit.io import (
        append_jsonl,
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_text,
        read_jsonl,
        read_user_text,
        write_jsonl,
    )
    from alignkit.models.final_layer import last_columns
    from alignkit.models.loading import ModelConfig, load_model, sequence_scores
    from alignkit.ops import (
        Reduce,
        entropy_from_logits,
        first_target_column,
        masked_mean,
        masked_sum,
        masked_whiten,
        token_logprobs,
    )
    from alignkit.pairs import CHOSEN, REJECTED, SharedPromptPairs, check_shared_prompt, share_prompts
    from alignkit.plugin import Algorithm, OnlineAlgorithm, Reward, RewardOutput, hookimpl
    from alignkit.rewards import ENSEMBLE_METHODS, EnsembleMethod, aggregate_ensemble
    from alignkit.rollout import SamplingConfig, left_pad, position_ids_from_mask, response_logprobs, sample_texts
    from alignkit.run import METRICS_FILE, MODEL_DIR, check_fresh, default_run_dir
    from alignkit.seeds import ALGORITHM, ANNOTATOR, FEEDBACK, derive_seed, fixed_seed, resolve_seed
    from alignkit.task import Demonstration, Lexicon, PreferencePair, SimulatedAnnotator, Task, bradley_terry
    from alignkit.types import (
        LossOutput,
        PreferenceBatch,
        PromptBatch,
        Rollout,
        SFTBatch,
        TensorRecord,
        shuffled_minibatches,
    )
