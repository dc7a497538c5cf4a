"""The combined reward of online samples: :class:`Scoring` is a mixin of :class:`alignkit.module.AlignModule`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn

from alignkit.errors import PluginError
from alignkit.manager import call_each
from alignkit.plugin import Reward, RewardOutput
from alignkit.rewards import combine_rewards, normalize_rewards
from alignkit.types import Rollout

if TYPE_CHECKING:
    # The mixin is combined with `LightningModule` in `AlignModule`; type checkers see that base, run time does not
    # (this module does not import Lightning).
    import pluggy
    from lightning import LightningModule as _LightningModule

    from alignkit.plugin import Algorithm
    from alignkit.rewards import RunningMoments
else:
    _LightningModule = object


@dataclass
class RewardCombination:
    """How the reward plugins' scores become one reward: weighted sum, then normalisation and clipping."""

    normalize: Literal["none", "batch", "running"] = "none"
    """``batch``: whiten within each batch; ``running``: divide by running statistics over all steps."""
    clip: float | None = None
    """Clip the combined reward to [-clip, clip] after normalisation."""


class Scoring(_LightningModule):
    """Scores a rollout with every reward plugin, for a ``LightningModule`` with a plugin manager ``pm``, the reward
    plugins ``rewards``, a ``reward_combination`` (:class:`RewardCombination`), running statistics
    ``reward_moments``, ``gather_rows`` (:class:`alignkit.distributed.DataParallel`) and ``nonfinite``."""

    # Provided by the host (`AlignModule`) and its other mixins: declared here for type checkers only.
    pm: pluggy.PluginManager
    algorithm: Algorithm
    rewards: nn.ModuleList
    reward_combination: RewardCombination
    reward_moments: RunningMoments
    if TYPE_CHECKING:
        def gather_rows(self, tensor: Tensor) -> Tensor: ...
        def nonfinite(self, quantity: str, value: Tensor) -> None: ...

    def score(self, rollout: Rollout) -> tuple[Tensor, dict[str, float]] | None:
        """Every reward plugin scores the rollout; the weighted sum is normalised and clipped. None when a
        reward is not finite and ``skip_nonfinite`` skips the batch."""
        outputs: list[RewardOutput] = call_each(self.pm, "alignkit_score", RewardOutput, prompts=rollout.prompts,
                                                responses=rollout.responses, rollout=rollout)
        if not outputs and not getattr(self.algorithm, "needs_rewards", True):
            return torch.zeros(len(rollout.prompts), device=self.device), {}
        if not outputs:
            raise PluginError("no reward plugin scored the rollout: list at least one under model.rewards")
        weights = {r.name: r.weight for r in cast("Iterable[Reward]", self.rewards)}  # (ModuleList items: Module)
        named = {o.name: o.scores.to(self.device).float() for o in outputs}
        for name, part in named.items():
            if not torch.isfinite(part).all():  # before normalisation: running statistics must stay finite
                self.nonfinite(f"reward {name!r}", part)
                return None
        combined, parts = combine_rewards(named, {name: weights.get(name, 1.0) for name in named})
        stats = ({f"objective/scores/{name}": float(part.mean()) for name, part in parts.items()}
                 if len(parts) > 1 else {})
        for o in outputs:
            stats.update({f"rewards/{o.name}/{k}": float(v) for k, v in o.stats.items()})
        stats["objective/scores"] = float(combined.mean())
        cfg = self.reward_combination
        # Normalise with the statistics of the global batch, so every rank shapes rewards identically.
        everyone = self.gather_rows(combined.detach())  # (world, B)
        combined = normalize_rewards(everyone.flatten(), cfg.normalize, self.reward_moments, cfg.clip)
        return combined.view_as(everyone)[self.global_rank], stats


