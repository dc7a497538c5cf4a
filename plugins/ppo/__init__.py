"""PPO (Schulman et al. 2017) for RLHF; the loss and advantage math lives in ``alignkit_plugins.ppo.math``."""

from alignkit_plugins.ppo.algorithm import PPO, PPOExperience, ValueHead

__all__ = ["PPO", "PPOExperience", "ValueHead"]
