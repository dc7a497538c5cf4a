"""Rewards computed by plain Python: any function named by its dotted path, a few built-in functions, and a
task's gold reward (for oracle experiments).

A reward function takes the prompts and the responses and returns one score per response::

    def my_reward(prompts: list[str], responses: list[str], **kwargs) -> list[float] | torch.Tensor: ...

and is selected in a recipe with::

    rewards:
      - class_path: alignkit_plugins.rewards.FunctionReward
        init_args:
          function: alignkit_plugins.rewards.function.length_penalty   # or my_package.my_module:my_reward
          kwargs: {target: 12, coef: 0.1}
          weight: 0.5
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from alignkit import PluginError, Reward, RewardOutput, Rollout, Task

RewardFunction = Callable[..., "list[float] | Tensor"]


# ------------------------------------------------------------------------------------ built-in functions

def length_penalty(prompts: list[str], responses: list[str], target: int = 12, coef: float = 0.1) -> list[float]:
    """``−coef · |words − target|`` for each response, where ``words`` is its number of
    whitespace-separated words: 0 at exactly ``target`` words, more negative further away."""
    return [coef * -abs(len(response.split()) - target) for response in responses]


def contains(prompts: list[str], responses: list[str], word: str) -> list[float]:
    """1.0 for each response that contains ``word`` as a whole word (or phrase), ignoring case, else 0.0."""
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return [1.0 if pattern.search(response) else 0.0 for response in responses]


# ------------------------------------------------------------------------------------ dotted paths

def import_callable(path: str) -> RewardFunction:
    """The callable named by ``package.module.function`` or ``package.module:function`` (the part after
    the colon may be dotted, e.g. ``module:Class.method``). Raises a one-line PluginError naming ``path``."""
    if not isinstance(path, str) or not path.strip():
        raise PluginError(f"reward function path must be a non-empty dotted path, got {path!r}")
    path = path.strip()
    if ":" in path:
        module_name, _, attrs = path.partition(":")
        candidates = [(module_name, attrs.split("."))]
    else:
        parts = path.split(".")
        # the longest importable module prefix wins: a.b.c → (a.b, [c]), then (a, [b, c])
        candidates = [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]
    if not candidates or not all(candidates[0]) or not all(candidates[0][1]):
        raise PluginError(f"reward function {path!r} is not a dotted path 'package.module.function' "
                          f"or 'package.module:function'")
    reason = "no module prefix could be imported"
    for module_name, attrs in candidates:
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name != exc.name and not module_name.startswith(exc.name + "."):
                # the module exists but one of its own imports is missing: report that, not "not found"
                raise PluginError(f"reward function {path!r}: importing {module_name} failed: {exc}") from exc
            reason = f"no module named {module_name!r}"
            continue
        except Exception as exc:
            raise PluginError(f"reward function {path!r}: importing {module_name} failed: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        for i, attr in enumerate(attrs):
            if not hasattr(obj, attr):
                where = ".".join([module_name, *attrs[:i]])
                raise PluginError(f"reward function {path!r}: {where} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        if not callable(obj):
            raise PluginError(f"reward function {path!r} is a {type(obj).__name__}, not a callable")
        return obj
    raise PluginError(f"reward function {path!r} could not be imported ({reason})")


def as_scores(result: Any, expected: int, where: str) -> Tensor:
    """A function's answer as ``(B,)`` float32 scores; a one-line PluginError when it is not B numbers."""
    try:
        scores = result.detach().float() if isinstance(result, Tensor) else torch.as_tensor(result, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise PluginError(f"{where} returned {type(result).__name__}, expected a list of {expected} numbers "
                          f"or a tensor of shape ({expected},)") from exc
    if scores.dim() == 2 and scores.shape[-1] == 1:
        scores = scores.squeeze(-1)
    if scores.dim() != 1:
        raise PluginError(f"{where} returned scores of shape {tuple(scores.shape)} for {expected} responses; "
                          f"expected shape ({expected},)")
    if scores.shape[0] != expected:
        raise PluginError(f"{where} returned {scores.shape[0]} scores for {expected} responses; "
                          f"expected one score per response")
    return scores


class FunctionReward(Reward):
    """A reward computed by any Python callable ``(prompts, responses, **kwargs) -> list[float] | Tensor``,
    named by its dotted path. Its name defaults to the function's name."""

    def __init__(self, function: str, kwargs: dict[str, Any] | None = None, name: str | None = None,
                 weight: float = 1.0):
        """
        Args:
            function: dotted path ``package.module.function`` or ``package.module:function``, e.g.
                ``alignkit_plugins.rewards.function.length_penalty``.
            kwargs: keyword arguments passed to the function at every call.
            name: the name its scores are logged under (default: the function's name).
            weight: its weight in the combined reward.
        """
        fn = import_callable(function)
        super().__init__(name=name or getattr(fn, "__name__", None) or function.replace(":", ".").rsplit(".", 1)[-1],
                         weight=weight)
        self.function_path, self.function, self.kwargs = function, fn, dict(kwargs or {})

    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None) -> RewardOutput:
        result = self.function(list(prompts), list(responses), **self.kwargs)
        scores = as_scores(result, len(responses), f"reward function {self.function_path!r}")
        return RewardOutput(self.reward_name, scores)

    def extra_repr(self) -> str:
        return f"function={self.function_path!r}, kwargs={self.kwargs}, name={self.reward_name!r}, weight={self.weight}"


class GoldReward(Reward):
    """A task's exact gold reward as a reward plugin — the oracle: optimise the true objective directly
    (an upper bound for a learned reward model), or add it with weight 0 to log it. Name defaults to
    ``gold``."""

    def __init__(self, task: Task, name: str | None = None, weight: float = 1.0):
        """
        Args:
            task: the task (``class_path`` + ``init_args``) whose ``gold_reward`` scores the responses.
            name: the name its scores are logged under (default: ``gold``).
            weight: its weight in the combined reward.
        """
        super().__init__(name=name or "gold", weight=weight)
        self.task = task

    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None) -> RewardOutput:
        gold = torch.tensor(self.task.gold_rewards(prompts, responses), dtype=torch.float32)
        return RewardOutput(self.reward_name, gold)

    def extra_repr(self) -> str:
        return f"task={type(self.task).__name__}, name={self.reward_name!r}, weight={self.weight}"


__all__ = ["FunctionReward", "GoldReward", "as_scores", "contains", "import_callable", "length_penalty"]
