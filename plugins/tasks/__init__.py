"""Built-in simulated-feedback tasks: each owns a known gold reward that stands in for human
judgement, so alignment can be measured against the ground truth.

- :class:`ReverseTask` (``reverse``): verifiable — reverse a short list of letters; gold is
  per-position correctness minus a penalty for words after the answer.
- :class:`SentimentTask` (``sentiment``): open-ended — write a positive, on-topic short review;
  gold has diminishing returns in positive words and penalises repetition and length, so an
  over-optimised proxy reward model is hackable.
"""

from alignkit_plugins.tasks.reverse import ReverseTask
from alignkit_plugins.tasks.sentiment import SentimentTask

__all__ = ["ReverseTask", "SentimentTask"]
