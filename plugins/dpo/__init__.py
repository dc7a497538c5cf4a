"""Direct preference optimisation (DPO) and its loss variants.

The DPO family trains the policy directly on preference pairs, with no reward model and no sampling:
the implicit reward β·log π(y|x)/π_ref(y|x) of the chosen response is pushed above that of the rejected
one, relative to a frozen reference policy. :mod:`~alignkit_plugins.dpo.losses` holds the losses as pure
functions (sigmoid/DPO, IPO, conservative and robust DPO for noisy labels, hinge/SLiC);
:mod:`~alignkit_plugins.dpo.algorithm` holds the :class:`DPO` plugin that computes policy and reference
log-probs (live, or precomputed once and cached) and applies the chosen loss.
"""

from alignkit_plugins.dpo.algorithm import DPO, concatenated_logps, shared_prompt_logps

__all__ = ["DPO", "concatenated_logps", "shared_prompt_logps"]
