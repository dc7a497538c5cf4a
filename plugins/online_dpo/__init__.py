"""Online DPO (Guo et al. 2024): DPO on two fresh policy samples per prompt, labelled at every step by the run's
rewards or the task's simulated annotator; the pair logic and loss live in ``alignkit_plugins.online_dpo.losses``."""

from alignkit_plugins.online_dpo.algorithm import OnlineDPO, OnlineDPOExperience

__all__ = ["OnlineDPO", "OnlineDPOExperience"]
