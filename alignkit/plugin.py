"""Base classes for plugins. Built-in algorithms and rewards subclass these exactly as an outside
package would, and are found through the ``alignkit`` entry-point group."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pluggy
from torch import Tensor, nn

from alignkit.types import Rollout

if TYPE_CHECKING:
    from alignkit.rollout import SamplingConfig

hookimpl = pluggy.HookimplMarker("alignkit")

ModelHead = Literal["causal_lm", "sequence_classification"]
DataKind = Literal["sft", "preference", "prompt", "unpaired"]


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
        """The algorithm's name in messages: its class name in lower case."""
        return type(self).__name__.lower()

    # Checkpoint state. Plain attributes that are not tensors of the module (a KL controller's coefficient, an
    # update counter, a cached table) travel in the checkpoint through these two methods: the host stores what
    # `extra_state` returns under ``checkpoint["alignkit"]["algorithm"]`` and gives it back to `load_extra_state`
    # when a run resumes. They deliberately are not torch's `get_extra_state`/`set_extra_state`, which would put the
    # state into ``state_dict()``: then every checkpoint written before (which lacks the ``_extra_state`` key) would
    # fail strict loading, sharded strategies would have to shard it, and exported weights would carry it.
    def extra_state(self) -> dict[str, Any]:
        """Picklable state to save in checkpoints besides the parameters and buffers (default: none)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned; called on resume only when that was not empty."""


class OnlineAlgorithm(Algorithm):
    """Base of online algorithms (PPO, RLOO, GRPO): the host runs rollout → score → experience →
    ``update_epochs`` × minibatches of updates in one ``training_step``."""

    online: ClassVar[bool] = True
    data_kind: ClassVar[DataKind] = "prompt"
    #: Whether a step needs a reward: the host refuses a run without reward plugins unless this is False
    #: (on-policy distillation learns from a teacher; its steps then get zero scores).
    needs_rewards: ClassVar[bool] = True
    #: How the rollout engine samples responses (``alignkit.defaults.DefaultRollout`` reads it); the default
    #: ``SamplingConfig()`` is set by ``__init__``, subclasses set their own after calling it.
    sampling: SamplingConfig

    def __init__(self, update_epochs: int = 1, target_approx_kl: float | None = None, max_grad_norm: float | None = 1.0,
                 samples_per_prompt: int = 1):
        """
        Args:
            update_epochs: passes over each rollout batch (PPO's ``ppo_epochs``).
            target_approx_kl: stop the update epochs early once the mean approx-KL between the new and the
                sampling policy exceeds this (None: never); the host averages ``LossOutput.approx_kl`` of the epoch's
                losses, which the algorithm must fill for this to work.
            max_grad_norm: gradient clipping norm applied at every optimiser step (None: off).
            samples_per_prompt: responses sampled per prompt; the host repeats each prompt row this many times
                (consecutively) before the rollout, so group baselines (RLOO, GRPO) see their groups.
        """
        super().__init__()
        from alignkit.rollout import SamplingConfig

        self.sampling = SamplingConfig()  # subclasses set their own (e.g. from a ``sampling`` argument)
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
        self.name = name or type(self).__name__.lower()
        self.weight = weight

    @property
    def reward_name(self) -> str:
        """The former name of :attr:`name` (still readable and settable)."""
        return self.name

    @reward_name.setter
    def reward_name(self, value: str) -> None:
        self.name = value

    @abc.abstractmethod
    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None) -> RewardOutput:
        """Score each response to its prompt; ``rollout`` carries the token ids when sampled online."""

    @hookimpl
    def alignkit_score(self, prompts: list[str], responses: list[str], rollout: Rollout | None) -> RewardOutput:
        return self.score(prompts, responses, rollout)
