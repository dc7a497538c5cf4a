"""An ensemble of reward models as one reward plugin (Coste et al. 2024): each member scores the batch and
:func:`~alignkit.rewards.aggregate_ensemble` collapses the ``(K, B)`` scores — mean, worst case (``min``),
uncertainty-weighted (``uwo``) or ``mean_minus_std``. The members' disagreement is logged, since it rises
when the policy drifts to where the reward models were not trained (over-optimisation)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from alignkit import ENSEMBLE_METHODS, EnsembleMethod, Reward, RewardOutput, Rollout, aggregate_ensemble
from alignkit_plugins.rewards.model import RewardModelReward


class RewardEnsemble(Reward):
    """K frozen reward models whose scores are aggregated into one reward.

    Stats logged (under ``rewards/<name>/``): ``member_{k}`` the mean score of member k over the batch, and
    ``std`` the members' disagreement — the population standard deviation across members, averaged over
    the batch.

    Example (recipe)::

        rewards:
          - class_path: alignkit_plugins.rewards.RewardEnsemble
            init_args:
              paths: [runs/rm_ens/rm_0, runs/rm_ens/rm_1, runs/rm_ens/rm_2]
              method: uwo
              uncertainty_coef: 0.5
    """

    def __init__(self, paths: list[str], method: EnsembleMethod = "mean", uncertainty_coef: float = 1.0,
                 batch_size: int = 64, chat_template: bool = False, max_length: int | None = None,
                 max_prompt_length: int | None = None,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 name: str | None = None, weight: float = 1.0):
        """
        Args:
            paths: the K reward models (each a reward-model stage's ``model/`` folder or run folder, or an HF
                sequence-classification model).
            method: aggregation: ``mean``, ``min`` (worst-case optimisation), ``uwo`` (mean − λ·variance) or
                ``mean_minus_std`` (mean − λ·std).
            uncertainty_coef: λ ≥ 0 of ``uwo`` and ``mean_minus_std``.
            batch_size: sequences per forward pass of each member.
            chat_template: wrap plain-text prompts in the members' chat template (as in their training).
            max_length: truncate prompt + response to this many tokens as in training (None: no truncation).
            max_prompt_length: longest prompt kept when truncating (default: ``max_length - 1``).
            dtype: parameter dtype of the members.
            name: the name its scores are logged under.
            weight: its weight in the combined reward.
        """
        super().__init__(name=name, weight=weight)
        if not paths:
            raise ValueError("RewardEnsemble.paths must list at least one reward model, got none")
        if method not in ENSEMBLE_METHODS:
            raise ValueError(f"RewardEnsemble.method {method!r} is unknown; "
                             f"expected one of {', '.join(ENSEMBLE_METHODS)}")
        if not (math.isfinite(uncertainty_coef) and uncertainty_coef >= 0):
            raise ValueError(f"RewardEnsemble.uncertainty_coef must be a finite number >= 0, got {uncertainty_coef}")
        self.method, self.uncertainty_coef = method, uncertainty_coef
        self.members = nn.ModuleList(
            RewardModelReward(path, batch_size=batch_size, chat_template=chat_template, max_length=max_length,
                              max_prompt_length=max_prompt_length, dtype=dtype, name=f"member_{k}")
            for k, path in enumerate(paths)
        )

    def member_scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """``(K, B)`` scores, one row per member, on the first member's device."""
        rows = [member.scores(prompts, responses) for member in self.members]
        device = rows[0].device
        return torch.stack([row.to(device) for row in rows])

    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None) -> RewardOutput:
        scores = self.member_scores(prompts, responses)  # (K, B)
        reward = aggregate_ensemble(scores, self.method, self.uncertainty_coef)
        stats: dict[str, float] = {f"member_{k}": float(row.mean()) for k, row in enumerate(scores)}
        stats["std"] = float(scores.std(dim=0, unbiased=False).mean()) if scores.shape[1] else 0.0
        return RewardOutput(self.reward_name, reward, stats)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, uncertainty_coef={self.uncertainty_coef}, name={self.reward_name!r}"


__all__ = ["RewardEnsemble"]
