"""Kahneman–Tversky optimisation (KTO, Ethayarajh et al. 2024): alignment from unpaired feedback.

Each example is a single completion labelled desirable or undesirable; the policy's implied reward
log π(y|x)/π_ref(y|x) is pushed above (desirable) or below (undesirable) a reference point z₀, an estimate of
KL(π ‖ π_ref) from mismatched prompt/completion pairs of the batch. :mod:`~alignkit_plugins.kto.losses` holds the
loss as a pure function, :mod:`~alignkit_plugins.kto.data` the data module (unpaired rows, or preference pairs
split into a desirable and an undesirable row) and :mod:`~alignkit_plugins.kto.algorithm` the :class:`KTO` plugin.
"""

from alignkit_plugins.kto.algorithm import KTO, completion_logps
from alignkit_plugins.kto.data import UNPAIRED, UnpairedBatch, UnpairedData
from alignkit_plugins.kto.losses import KTOLossTerms, kto_loss

__all__ = ["KTO", "KTOLossTerms", "UNPAIRED", "UnpairedBatch", "UnpairedData", "completion_logps", "kto_loss"]
