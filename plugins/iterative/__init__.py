"""Iterative RLHF (Bai et al. 2022; Llama 2): rounds of sampling from the current policy, new preference
labels, a refreshed reward model on every label so far, and PPO (or DPO) from the current policy.

- :func:`~alignkit_plugins.iterative.rounds.iterate`: the ``alignkit iterate`` command; rounds and steps
  are resumable, their state read from ``<run_dir>/round_k/`` (:class:`~alignkit_plugins.iterative.rounds.RoundState`).
- :mod:`~alignkit_plugins.iterative.labellers`: who labels a round — :class:`AnnotatorLabeller` (the
  task's simulated annotator), :class:`JudgeLabeller` (an AI judge with ``compare``) or
  :class:`FileLabeller` (humans, through a file; the run pauses until it is filled).
"""

from alignkit_plugins.iterative.labellers import (
    AnnotatorLabeller,
    FileLabeller,
    Judge,
    JudgeLabeller,
    LabelContext,
    Labeller,
    LabelsPending,
)

__all__ = ["AnnotatorLabeller", "FileLabeller", "Judge", "JudgeLabeller", "LabelContext", "Labeller",
           "LabelsPending", "RoundState", "iterate"]


def __getattr__(name: str):
    """``iterate`` and ``RoundState`` load on first use: their module imports Lightning, which listing the
    labellers (``alignkit plugins``) must not pay for."""
    if name in ("RoundState", "iterate"):
        from alignkit_plugins.iterative import rounds

        return getattr(rounds, name)
    raise AttributeError(f"module 'alignkit_plugins.iterative' has no attribute {name!r}")
