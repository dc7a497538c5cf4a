"""Named presets of :class:`~alignkit_plugins.pg.algorithm.PolicyGradient`: each is the one algorithm with its paper's
defaults, registered under its own entry point (``grpo``, ``dr_grpo``, ``dapo``, ``gspo``, ``cispo``, ``rloo``,
``reinforce_pp``, ``remax``). Every other argument of ``PolicyGradient`` is accepted as well (``**kwargs``), and any
default here can be overridden in a recipe's ``init_args``. Values that depend on scale (k, β, L_cache) are the
papers' where they transfer and small-model values otherwise, as each docstring says."""

from __future__ import annotations

from typing import Any

from alignkit import LossAggregation
from alignkit_plugins.pg.advantages import AdvantageEstimator
from alignkit_plugins.pg.algorithm import KLMode, PolicyGradient
from alignkit_plugins.pg.losses import KLLossEstimator, PolicyLoss

__all__ = ["GRPO", "DrGRPO", "DAPO", "GSPO", "CISPO", "RLOO", "ReinforcePP", "ReMax"]


class GRPO(PolicyGradient):
    """GRPO (Shao et al. 2024): group mean/std advantages, PPO clip ε = 0.2, KL as a k3 loss term with β = 0.04,
    each response's tokens averaged, then the responses (``seq-mean-token-mean``)."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "grpo", policy_loss: PolicyLoss = "ppo_clip",
                 clip_range: float = 0.2, loss_aggregation: LossAggregation = "seq-mean-token-mean",
                 kl_mode: KLMode = "loss", kl_coef: float = 0.04, kl_estimator: KLLossEstimator = "k3",
                 **kwargs: Any):
        """
        Args:
            advantage_estimator: see ``PolicyGradient``; GRPO: ``grpo``.
            policy_loss: see ``PolicyGradient``; GRPO: ``ppo_clip``.
            clip_range: ε of the clip.
            loss_aggregation: GRPO's paper: ``seq-mean-token-mean``.
            kl_mode: GRPO: ``loss`` (KL in the loss, not the reward).
            kl_coef: β = 0.04.
            kl_estimator: k3, the paper's unbiased low-variance estimator.
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         loss_aggregation=loss_aggregation, kl_mode=kl_mode, kl_coef=kl_coef,
                         kl_estimator=kl_estimator, **kwargs)


class DrGRPO(PolicyGradient):
    """Dr. GRPO (Liu et al. 2025): GRPO without its two biases: no division by the group's standard deviation
    (``dr_grpo`` advantages) and no division by the response length (``seq-mean-token-sum``); no KL term."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "dr_grpo", policy_loss: PolicyLoss = "ppo_clip",
                 clip_range: float = 0.2, loss_aggregation: LossAggregation = "seq-mean-token-sum",
                 kl_mode: KLMode = "none", **kwargs: Any):
        """
        Args:
            advantage_estimator: Dr. GRPO: ``dr_grpo`` (group mean only).
            policy_loss: ``ppo_clip``.
            clip_range: ε of the clip.
            loss_aggregation: ``seq-mean-token-sum`` (no length normalisation per response).
            kl_mode: ``none`` (the paper trains rule-based rewards without KL).
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         loss_aggregation=loss_aggregation, kl_mode=kl_mode, **kwargs)


class DAPO(PolicyGradient):
    """DAPO (Yu et al. 2025): group-normalised advantages, clip-higher (ε_low 0.2, ε_high 0.28), token-level loss
    (``token-mean``), no KL, dynamic sampling and overlong reward shaping. The paper's L_cache is 4096 of 20480
    tokens (a fifth of the budget); the default here, 4 tokens, is the same fraction of the default 24 new tokens."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "grpo", policy_loss: PolicyLoss = "ppo_clip",
                 clip_range: float = 0.2, clip_range_high: float | None = 0.28,
                 loss_aggregation: LossAggregation = "token-mean", kl_mode: KLMode = "none",
                 dynamic_sampling: bool = True, overlong_buffer: int | None = 4, **kwargs: Any):
        """
        Args:
            advantage_estimator: ``grpo``.
            policy_loss: ``ppo_clip`` with the decoupled ranges below.
            clip_range: ε_low = 0.2.
            clip_range_high: ε_high = 0.28.
            loss_aggregation: ``token-mean`` (token-level policy-gradient loss).
            kl_mode: ``none``.
            dynamic_sampling: drop groups of equal rewards and sample more.
            overlong_buffer: L_cache of the soft overlong penalty (None: off).
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         clip_range_high=clip_range_high, loss_aggregation=loss_aggregation, kl_mode=kl_mode,
                         dynamic_sampling=dynamic_sampling, overlong_buffer=overlong_buffer, **kwargs)


class GSPO(PolicyGradient):
    """GSPO (Zheng et al. 2025): group-normalised advantages, the length-normalised sequence importance ratio clipped
    per sequence with ε_low 3e-4 and ε_high 4e-4, responses averaged per sequence (``seq-mean-token-mean``), no KL."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "grpo", policy_loss: PolicyLoss = "gspo",
                 clip_range: float = 3e-4, clip_range_high: float | None = 4e-4,
                 loss_aggregation: LossAggregation = "seq-mean-token-mean", kl_mode: KLMode = "none",
                 **kwargs: Any):
        """
        Args:
            advantage_estimator: ``grpo``.
            policy_loss: ``gspo``.
            clip_range: ε_low of the sequence ratio (3e-4).
            clip_range_high: ε_high of the sequence ratio (4e-4).
            loss_aggregation: ``seq-mean-token-mean`` (the paper's objective).
            kl_mode: ``none``.
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         clip_range_high=clip_range_high, loss_aggregation=loss_aggregation, kl_mode=kl_mode,
                         **kwargs)


class CISPO(PolicyGradient):
    """CISPO (MiniMax 2025): group-normalised advantages, REINFORCE weighted by the stop-gradient importance ratio
    clipped from above only (ε_low = 1: no lower bound; ε_high = 0.28 here, tuned in the paper), token-level loss,
    no KL."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "grpo", policy_loss: PolicyLoss = "cispo",
                 clip_range: float = 1.0, clip_range_high: float | None = 0.28,
                 loss_aggregation: LossAggregation = "token-mean", kl_mode: KLMode = "none", **kwargs: Any):
        """
        Args:
            advantage_estimator: ``grpo``.
            policy_loss: ``cispo``.
            clip_range: ε_low of the weight (1: none).
            clip_range_high: ε_high of the weight.
            loss_aggregation: ``token-mean``.
            kl_mode: ``none``.
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         clip_range_high=clip_range_high, loss_aggregation=loss_aggregation, kl_mode=kl_mode,
                         **kwargs)


class RLOO(PolicyGradient):
    """RLOO (Ahmadian et al. 2024): the leave-one-out baseline on the KL-penalised reward r − β·Σ_t k1_t (β 0.05),
    PPO clip 0.2, ``token-mean`` — the documentation example ``alignkit_rloo.RLOO`` with ``baseline: rloo``."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "rloo", policy_loss: PolicyLoss = "ppo_clip",
                 clip_range: float = 0.2, loss_aggregation: LossAggregation = "token-mean",
                 kl_mode: KLMode = "reward", kl_coef: float = 0.05, **kwargs: Any):
        """
        Args:
            advantage_estimator: ``rloo``.
            policy_loss: ``ppo_clip``.
            clip_range: ε of the clip.
            loss_aggregation: ``token-mean``.
            kl_mode: ``reward`` (sequence KL subtracted from the reward).
            kl_coef: β.
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         loss_aggregation=loss_aggregation, kl_mode=kl_mode, kl_coef=kl_coef, **kwargs)


class ReinforcePP(PolicyGradient):
    """REINFORCE++ (Hu 2025): per-token k1 KL in the reward (β 0.01), the return normalised over the global batch, PPO
    clip 0.2, ``token-mean``; one sample per prompt (``reinforce_pp_baseline`` with k ≥ 2 is the group variant)."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "reinforce_pp", policy_loss: PolicyLoss = "ppo_clip",
                 clip_range: float = 0.2, loss_aggregation: LossAggregation = "token-mean",
                 kl_mode: KLMode = "reward", kl_coef: float = 0.01, samples_per_prompt: int = 1, **kwargs: Any):
        """
        Args:
            advantage_estimator: ``reinforce_pp`` (or ``reinforce_pp_baseline``).
            policy_loss: ``ppo_clip``.
            clip_range: ε of the clip.
            loss_aggregation: ``token-mean``.
            kl_mode: ``reward`` (per-token k1 penalty).
            kl_coef: β.
            samples_per_prompt: k.
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss, clip_range=clip_range,
                         loss_aggregation=loss_aggregation, kl_mode=kl_mode, kl_coef=kl_coef,
                         samples_per_prompt=samples_per_prompt, **kwargs)


class ReMax(PolicyGradient):
    """ReMax (Li et al. 2023): one sample per prompt, baseline the reward of the prompt's greedy response, the KL
    penalty in the reward (β 0.05), one REINFORCE update per batch (the clip never acts at ratio 1)."""

    def __init__(self, advantage_estimator: AdvantageEstimator = "remax", policy_loss: PolicyLoss = "ppo_clip",
                 loss_aggregation: LossAggregation = "token-mean", kl_mode: KLMode = "reward",
                 kl_coef: float = 0.05, samples_per_prompt: int = 1, **kwargs: Any):
        """
        Args:
            advantage_estimator: ``remax``.
            policy_loss: ``ppo_clip`` (inert with one update epoch and one minibatch: plain REINFORCE).
            loss_aggregation: ``token-mean``.
            kl_mode: ``reward``.
            kl_coef: β.
            samples_per_prompt: k (1 in the paper).
            **kwargs: any other argument of ``PolicyGradient``.
        """
        super().__init__(advantage_estimator=advantage_estimator, policy_loss=policy_loss,
                         loss_aggregation=loss_aggregation, kl_mode=kl_mode, kl_coef=kl_coef,
                         samples_per_prompt=samples_per_prompt, **kwargs)
