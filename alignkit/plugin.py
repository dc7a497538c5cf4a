"""Base classes for plugins. Built-in algorithms and rewards subclass these exactly as an outside
package would, and are found through the ``alignkit`` entry-point group."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pluggy
from torch import Tensor, nn

from alignkit.types import Rollout

hookimpl = pluggy.HookimplMarker("alignkit")

ModelHead = Literal["causal_lm", "sequence_classification"]
DataKind = Literal["sft", "preference", "prompt"]


class Algorithm(nn.Module):
    """An alignment algorithm: declares what the host must build and implements the math as hooks
    (see :mod:`alignkit.hookspecs`). It is an ``nn.Module`` so that the trainable parts it adds (a value
    head, a critic) are moved, sharded, optimised and checkpointed with the policy.

    The constructor's arguments are the recipe's ``algorithm.init_args``.
    """

    #: Head of the trained model: a causal LM (SFT, DPO, PPO) or a scalar scorer (reward model).
    model_head: ClassVar[ModelHead] = "causal_lm"
    #: Whether the host must provide a frozen reference policy (``module.reference``).
    needs_reference: ClassVar[bool] = False
    #: Online algorithms sample from the policy inside ``training_step`` (manual optimisation).
    online: ClassVar[bool] = False
    #: The kind of data batch the algorithm trains on (checked against the data module).
    data_kind: ClassVar[DataKind] = "sft"

    @property
    def name(self) -> str:
        return type(self).__name__.lower()


class OnlineAlgorithm(Algorithm):
    """Base of online algorithms (PPO, RLOO, GRPO): the host runs rollout → score → experience →
    ``update_epochs`` × minibatches of updates in one ``training_step``."""

    online: ClassVar[bool] = True
    data_kind: ClassVar[DataKind] = "prompt"

    def __init__(self, update_epochs: int = 1, target_approx_kl: float | None = None, max_grad_norm: float | None = 1.0,
                 samples_per_prompt: int = 1):
        """
        Args:
            update_epochs: passes over each rollout batch (PPO's ``ppo_epochs``).
            target_approx_kl: stop the update epochs early once the mean approx-KL between the new and the
                sampling policy exceeds this (None: never).
            max_grad_norm: gradient clipping norm applied at every optimiser step (None: off).
            samples_per_prompt: responses sampled per prompt; the host repeats each prompt row this many times
                (consecutively) before the rollout, so group baselines (RLOO, GRPO) see their groups.
        """
        super().__init__()
        if update_epochs < 1:
            raise ValueError(f"algorithm.update_epochs must be >= 1, got {update_epochs}")
        if samples_per_prompt < 1:
            raise ValueError(f"algorithm.samples_per_prompt must be >= 1, got {samples_per_prompt}")
        self.samples_per_prompt = samples_per_prompt
        self.update_epochs = update_epochs
        self.target_approx_kl = target_approx_kl
        self.max_grad_norm = max_grad_norm


@dataclass
class RewardOutput:
    """Scores from one reward plugin: ``scores`` has shape ``(B,)``; ``stats`` are detached extras to log
    (e.g. each ensemble member's mean score and the members' disagreement)."""

    name: str
    scores: Tensor
    stats: dict[str, Tensor | float] = field(default_factory=dict)


class Reward(nn.Module, abc.ABC):
    """A reward plugin: scores ``(prompt, response)`` pairs. Subclasses implement :meth:`score`; several
    rewards are combined by the host with their ``weight``. Reward models held here are frozen."""

    def __init__(self, name: str | None = None, weight: float = 1.0):
        """
        Args:
            name: the name this reward's contribution is logged under (default: the class name).
            weight: its weight in the combined reward.
        """
        super().__init__()
        self.reward_name = name or type(self).__name__.lower()
        self.weight = weight

    @abc.abstractmethod
    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None) -> RewardOutput:
        """Score each response to its prompt; ``rollout`` carries the token ids when sampled online."""

    @hookimpl
    def alignkit_score(self, prompts: list[str], responses: list[str], rollout: Rollout | None) -> RewardOutput:
        return self.score(prompts, responses, rollout)
