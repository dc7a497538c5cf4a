"""The combined reward of online samples: :class:`Scoring` is a mixin of :class:`alignkit.module.AlignModule`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from alignkit.errors import PluginError
from alignkit.manager import call_each
from alignkit.plugin import RewardOutput
from alignkit.rewards import combine_rewards, normalize_rewards
from alignkit.types import Rollout


@dataclass
class RewardCombination:
    """How the reward plugins' scores become one reward: weighted sum, then normalisation and clipping."""

    normalize: Literal["none", "batch", "running"] = "none"
    """``batch``: whiten within each batch; ``running``: divide by running statistics over all steps."""
    clip: float | None = None
    """Clip the combined reward to [-clip, clip] after normalisation."""


class Scoring:
    """Scores a rollout with every reward plugin, for a ``LightningModule`` with a plugin manager ``pm``, the reward
    plugins ``rewards``, a ``reward_combination`` (:class:`RewardCombination`), running statistics
    ``reward_moments``, ``gather_rows`` (:class:`alignkit.distributed.DataParallel`) and ``nonfinite``."""

    def score(self, rollout: Rollout) -> tuple[Tensor, dict[str, float]] | None:
        """Every reward plugin scores the rollout; the weighted sum is normalised and clipped. None when a
        reward is not finite and ``skip_nonfinite`` skips the batch."""
        outputs: list[RewardOutput] = call_each(self.pm, "alignkit_score", RewardOutput, prompts=rollout.prompts,
                                                responses=rollout.responses, rollout=rollout)
        if not outputs and not getattr(self.algorithm, "needs_rewards", True):
            return torch.zeros(len(rollout.prompts), device=self.device), {}
        if not outputs:
            raise PluginError("no reward plugin scored the rollout: list at least one under model.rewards")
        weights = {r.name: r.weight for r in self.rewards}
        named = {o.name: o.scores.to(self.device).float() for o in outputs}
        for name, part in named.items():
            if not torch.isfinite(part).all():  # before normalisation: running statistics must stay finite
                return self.nonfinite(f"reward {name!r}", part)
        combined, parts = combine_rewards(named, {name: weights.get(name, 1.0) for name in named})
        stats = {f"objective/scores/{name}": float(part.mean()) for name, part in parts.items()} if len(parts) > 1 else {}
        for o in outputs:
            stats.update({f"rewards/{o.name}/{k}": float(v) for k, v in o.stats.items()})
        stats["objective/scores"] = float(combined.mean())
        cfg = self.reward_combination
        # Normalise with the statistics of the global batch, so every rank shapes rewards identically.
        everyone = self.gather_rows(combined.detach())  # (world, B)
        combined = normalize_rewards(everyone.flatten(), cfg.normalize, self.reward_moments, cfg.clip)
        return combined.view_as(everyone)[self.global_rank], stats


