"""Built-in reward plugins. Each scores ``(prompt, response)`` pairs and is listed under ``model.rewards``
in a recipe; the host combines them with their ``weight`` (then normalises and clips, see
``model.reward_combination``).

- :class:`RewardModelReward`: a trained reward model (a reward-model stage's ``model/``, or any HF
  sequence-classification model), re-tokenising the texts with its own tokenizer as in its training.
- :class:`RewardEnsemble`: K reward models aggregated by mean, worst case (``min``), uncertainty-weighted
  (``uwo``) or ``mean_minus_std``; logs each member's mean score and the members' disagreement.
- :class:`FunctionReward`: any Python function ``(prompts, responses, **kwargs) -> scores`` named by its
  dotted path; built-ins :func:`~alignkit_plugins.rewards.function.length_penalty` and
  :func:`~alignkit_plugins.rewards.function.contains`.
- :class:`GoldReward`: a task's exact gold reward, for oracle experiments.

Example::

    model:
      rewards:
        - class_path: alignkit_plugins.rewards.RewardEnsemble
          init_args: {paths: [runs/rm_ens/rm_0, runs/rm_ens/rm_1, runs/rm_ens/rm_2], method: uwo}
        - class_path: alignkit_plugins.rewards.FunctionReward
          init_args:
            function: alignkit_plugins.rewards.function.length_penalty
            kwargs: {target: 12, coef: 0.05}
"""

from alignkit_plugins.rewards.ensemble import RewardEnsemble
from alignkit_plugins.rewards.function import FunctionReward, GoldReward, contains, length_penalty
from alignkit_plugins.rewards.model import RewardModelReward

__all__ = ["FunctionReward", "GoldReward", "RewardEnsemble", "RewardModelReward", "contains", "length_penalty"]
