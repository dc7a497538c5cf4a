"""The hooks through which alignkit's host calls its plugins, grouped by the phase that calls them.

Every hook is called with keywords. A plugin implements any subset of them with ``@alignkit.hookimpl``
on a method of the same name. ``module`` is always the running :class:`alignkit.module.AlignModule`,
which gives access to ``module.policy``, ``module.reference``, ``module.tokenizer`` and ``module.device``.

Order of a training step:

- offline algorithms (SFT, reward model, DPO, ...): ``alignkit_loss`` on each batch;
- online algorithms (PPO, ...): ``alignkit_rollout`` → ``alignkit_score`` (every reward plugin) →
  ``alignkit_experience`` → ``alignkit_minibatches`` × ``alignkit_loss`` → ``alignkit_after_update``.

Metrics: every phase can return statistics; the host logs them once, through the Lightning logger.
Do not add hooks that duplicate Lightning callbacks (``on_train_batch_end`` and friends).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from alignkit.module import AlignModule
    from alignkit.plugin import RewardOutput
    from alignkit.types import LossOutput, PromptBatch, Rollout

hookspec = pluggy.HookspecMarker("alignkit")


# ---------------------------------------------------------------------------------------------- setup
@hookspec
def alignkit_configure(module: AlignModule) -> None:
    """Called once after the host has built its models (policy, reference, reward models) and before
    the optimiser is created: build extra trainable modules here (e.g. a value head) as attributes of
    the algorithm, which is an ``nn.Module`` held by the host, so they are optimised and checkpointed.
    """


# ---------------------------------------------------------------------------------------------- rollout
@hookspec(firstresult=True)
def alignkit_rollout(module: AlignModule, batch: PromptBatch) -> Rollout | None:
    """Sample completions for a batch of prompts. The first non-None result wins; the built-in engine
    (:mod:`alignkit.rollout`, registered ``trylast``) samples with the policy, KV cache, left padding and
    the algorithm's :class:`~alignkit.rollout.SamplingConfig`, truncating at stop tokens/strings. A faster
    engine (e.g. vLLM) replaces it by returning a :class:`~alignkit.types.Rollout` here."""


# ---------------------------------------------------------------------------------------------- reward
@hookspec
def alignkit_score(prompts: list[str], responses: list[str], rollout: Rollout | None) -> RewardOutput | None:
    """Score completions. Every reward plugin returns a :class:`~alignkit.plugin.RewardOutput`
    (its name, scores of shape ``(B,)`` and optional detached statistics); the host combines them with
    the configured weights, normalisation and clipping."""


# ---------------------------------------------------------------------------------------------- advantage
@hookspec(firstresult=True)
def alignkit_experience(module: AlignModule, rollout: Rollout, scores: Any) -> Any:
    """Turn a scored rollout into the training batch of an online algorithm: reference log-probs,
    values, KL-shaped rewards and advantages (GAE for PPO; group baselines for GRPO/RLOO). ``scores``
    is the combined ``(B,)`` reward tensor. Returns the algorithm's own experience record."""


@hookspec(firstresult=True)
def alignkit_minibatches(module: AlignModule, experience: Any) -> Iterable[Any] | None:
    """Split an experience record into the minibatches of one update epoch (shuffled, seeded)."""


# ---------------------------------------------------------------------------------------------- loss
@hookspec(firstresult=True)
def alignkit_loss(module: AlignModule, batch: Any) -> LossOutput | None:
    """Compute the algorithm's loss on one (mini)batch and return a :class:`~alignkit.types.LossOutput`
    whose ``stats`` are detached scalars. Losses never log, call backward or step the optimiser."""


@hookspec
def alignkit_after_update(module: AlignModule, experience: Any, stats: dict[str, float]) -> None:
    """Called once after all update epochs of an online step, with the averaged update statistics:
    adapt controllers here (e.g. the adaptive KL coefficient)."""


# ---------------------------------------------------------------------------------------------- metrics
@hookspec
def alignkit_metrics(module: AlignModule, rollout: Rollout | None, experience: Any) -> dict[str, float] | None:
    """Extra metrics for the current step; the host merges every plugin's dict and logs it once."""
