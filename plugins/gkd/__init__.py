"""GKD, on-policy distillation (Agarwal et al. 2024): the student samples, a frozen teacher scores every position,
the student minimises reverse KL or the generalised JSD(β) to it; the divergences live in
``alignkit_plugins.gkd.losses``."""

from alignkit_plugins.gkd.algorithm import GKD, GKDExperience

__all__ = ["GKD", "GKDExperience"]
