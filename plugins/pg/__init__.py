"""Critic-free policy gradient for RLHF: advantage estimators (``advantages``), policy losses (``losses``), DAPO's
shaping and filtering (``shaping``), one configurable algorithm (``PolicyGradient``) and its named presets."""

from alignkit_plugins.pg.algorithm import PGExperience, PolicyGradient
from alignkit_plugins.pg.presets import CISPO, DAPO, GRPO, GSPO, RLOO, DrGRPO, ReinforcePP, ReMax

__all__ = ["PolicyGradient", "PGExperience", "GRPO", "DrGRPO", "DAPO", "GSPO", "CISPO", "RLOO", "ReinforcePP", "ReMax"]
