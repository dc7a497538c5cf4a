"""The benchmarked stages: a table of algorithm plugins and their settings.

Everything else about a stage comes from what its algorithm class declares: ``online`` (rollout → score →
experience → update; scored by the benchmark's reward model), ``data_kind`` (which data module and which
synthetic file), ``model_head`` (the saved policy or the saved reward model) and ``needs_reference`` (the
reference forward in the FLOP count). Benchmarking another algorithm plugin is one more row here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Literal

PLUGIN_GROUP = "alignkit"


@dataclass(frozen=True)
class Stage:
    """One benchmarked stage."""

    plugin: str
    """Entry point of the algorithm in the ``alignkit`` group."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments of the algorithm, besides those the benchmark's options set when the algorithm
    takes them (``shared_prompt``, ``seed``, ``update_epochs``, ``sampling``)."""


STAGES: dict[str, Stage] = {
    "sft": Stage("sft"),
    "rm": Stage("reward_model"),
    "dpo": Stage("dpo", {"beta": 0.1}),
    "ppo": Stage("ppo", {"num_minibatches": 1}),
}

#: Entry point of the reward that scores the online stages (the saved reward model).
ONLINE_REWARD = "reward_model_reward"

#: Per data kind (an algorithm's ``data_kind``): the data module class in :mod:`alignkit.data` and the file of
#: the synthetic assets (:func:`alignkit_benchmarks.assets.prepare_assets`) it reads.
DATA = {"sft": ("SFTData", "demonstrations"), "preference": ("PreferenceData", "preferences"),
        "prompt": ("PromptData", "prompts")}

#: Per model head (an algorithm's ``model_head``): the saved model that is trained.
MODELS = {"causal_lm": "policy", "sequence_classification": "rm"}

Algo = Literal[tuple(STAGES)]  # type: ignore[valid-type]  # the stage names, for the command's option


def load_plugin(name: str) -> type:
    """The class registered under ``name`` in the ``alignkit`` entry-point group."""
    found = {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}
    if name not in found:
        raise ValueError(f"no plugin {name!r} in the {PLUGIN_GROUP!r} entry-point group (reinstall alignkit?)")
    return found[name].load()


def algorithm_class(stage: str) -> type:
    """The algorithm class of a stage of :data:`STAGES`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGES)}")
    return load_plugin(STAGES[stage].plugin)


def accepts(cls: type, name: str) -> bool:
    """Whether ``cls``'s constructor takes an argument ``name``."""
    return name in inspect.signature(cls.__init__).parameters


def build_algorithm(stage: str, options: dict[str, Any]):
    """The stage's algorithm: its table settings plus each of ``options`` that its constructor takes."""
    cls = algorithm_class(stage)
    chosen = {k: v for k, v in options.items() if accepts(cls, k)}
    return cls(**{**chosen, **STAGES[stage].settings})
