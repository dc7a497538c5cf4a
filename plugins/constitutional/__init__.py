"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback") in two stages:

- SL-CAI: the policy answers prompts, a feedback model critiques and revises the answers under principles
  drawn from a constitution, and SFT runs on the revisions (``cai-revise`` writes the data set);
- RL-CAI: the SL-CAI policy samples response pairs, the feedback model judges them under a drawn principle
  (soft labels), and the AI-labelled preferences train a reward model (then PPO) or DPO
  (``cai-feedback`` writes the data set).

``cai-compliance`` measures how often policies follow each principle by the judge.
:class:`LMFeedback` is the critic / reviser / judge for real language models; :class:`RuleFeedback` is a
programmatic stand-in for the built-in tasks' tiny models. See ``recipes/constitutional_ai.yaml``.
"""

from alignkit_plugins.constitutional.commands import ai_feedback, compliance, critique_revise
from alignkit_plugins.constitutional.constitution import (
    DEFAULT_CONSTITUTION,
    Constitution,
    ConstitutionError,
    Principle,
    load_constitution,
)
from alignkit_plugins.constitutional.feedback import Feedback, LMFeedback, RuleFeedback, soft_label

__all__ = [
    "DEFAULT_CONSTITUTION", "Constitution", "ConstitutionError", "Feedback", "LMFeedback", "Principle",
    "RuleFeedback", "ai_feedback", "compliance", "critique_revise", "load_constitution", "soft_label",
]
