"""Labellers: who decides which of two sampled responses is better in a round of iterative RLHF.

- :class:`AnnotatorLabeller`: the task's simulated annotator (Bradley–Terry on the gold reward plus label
  noise), reseeded per round so that a resumed run labels exactly as an uninterrupted one.
- :class:`JudgeLabeller`: any AI judge with ``compare(prompt, a, b, principle) -> P(a ≻ b)`` (e.g. a
  Constitutional AI feedback model), asked in both orders to cancel its position bias; the principle is a
  text or the judge's own principle object.
- :class:`FileLabeller`: human labels through a file. The round writes ``to_label.jsonl`` (prompt, a, b
  and an empty ``choice``) and stops; a person fills every ``choice`` with ``"a"`` or ``"b"`` and runs the
  same command again, which validates the file and goes on.

A labeller returns :class:`~alignkit.task.PreferencePair` objects or dicts with ``prompt``, ``chosen`` and
``rejected`` (optionally ``p_chosen``); pairs may be left out (e.g. ties).
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from alignkit import (
    ANNOTATOR,
    DataError,
    PreferencePair,
    SimulatedAnnotator,
    Task,
    derive_seed,
    read_user_text,
    write_jsonl,
)

#: The file :class:`FileLabeller` writes into the round folder and reads back once filled.
TO_LABEL_FILE = "to_label.jsonl"
#: The answers a person may give in the ``choice`` field.
CHOICES = ("a", "b")

DEFAULT_PRINCIPLE = ("Choose the response that is more helpful, honest and harmless, and that better does "
                     "what the prompt asks.")

Labelled = PreferencePair | dict


@dataclass(frozen=True)
class LabelContext:
    """Where and what a labeller labels: the task, the round number (from 1), the round's folder and the
    run's seed (``iterate``'s ``seed``), which a labeller's own seeds left unset derive from."""

    task: Task
    round_index: int
    round_dir: Path
    seed: int = 0


class LabelsPending(FileNotFoundError):
    """The labels of a round are not there yet: a person has to fill a file, then run the command again."""


class Labeller(abc.ABC):
    """Decides, for each ``(prompt, a, b)`` triple, which response is preferred."""

    @abc.abstractmethod
    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              context: LabelContext) -> list[Labelled]:
        """Labelled pairs (``PreferencePair`` or dicts with prompt/chosen/rejected), in the given order;
        triples without a preference may be left out."""


def check_lengths(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> None:
    """Raise unless the three lists have the same length."""
    if not len(prompts) == len(responses_a) == len(responses_b):
        raise ValueError(f"{len(prompts)} prompts, {len(responses_a)} responses a and {len(responses_b)} "
                         f"responses b: they must have the same length")


# ------------------------------------------------------------------------------------------ simulated


class AnnotatorLabeller(Labeller):
    """The task's simulated human: :class:`~alignkit.task.SimulatedAnnotator` on the task's gold reward.

    Round ``k`` uses a fresh annotator seeded with ``annotator.seed + k``, so labels do not depend on
    which rounds ran in the same process (a resumed run labels as an uninterrupted one). An annotator without
    a seed takes ``derive_seed(context.seed, "annotator")`` (:mod:`alignkit.seeds`) as its ``annotator.seed``.
    """

    def __init__(self, annotator: SimulatedAnnotator = SimulatedAnnotator()):
        """
        Args:
            annotator: Bradley–Terry temperature on the gold gap, label-flip probability and seed.
        """
        self.annotator = annotator

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              context: LabelContext) -> list[Labelled]:
        check_lengths(prompts, responses_a, responses_b)
        base = self.annotator.seed if self.annotator.seed is not None else derive_seed(context.seed, ANNOTATOR)
        annotator = replace(self.annotator, seed=base + context.round_index)
        return list(annotator.label(context.task, prompts, responses_a, responses_b))


# ------------------------------------------------------------------------------------------ AI judge


@runtime_checkable
class Judge(Protocol):
    """An AI feedback model: the probability, in [0, 1], that response ``a`` is preferred to ``b`` for
    ``prompt`` under ``principle`` (a text, or the judge's own principle type).

    The annotations are ``Any`` on purpose: jsonargparse accepts a ``class_path`` for a protocol only when
    the class's method types match the protocol's exactly, unless the protocol's are ``Any`` — so judges
    with other (or no) annotations qualify too.
    """

    def compare(self, prompt: Any, a: Any, b: Any, principle: Any) -> Any: ...


def judge_probability(judge: Judge, prompt: str, a: str, b: str, principle: Any, both_orders: bool) -> float:
    """P(a ≻ b) from the judge; with ``both_orders`` the mean of ``compare(a, b)`` and
    ``1 − compare(b, a)``, which cancels a constant preference for the first (or second) position."""
    first = float(judge.compare(prompt, a, b, principle))
    values = [first, 1.0 - float(judge.compare(prompt, b, a, principle))] if both_orders else [first]
    for value in values:
        if not 0.0 <= value <= 1.0:  # also catches NaN
            raise ValueError(f"judge {type(judge).__name__}.compare returned {value}, expected a probability in "
                             f"[0, 1] (P(a preferred to b))")
    return sum(values) / len(values)


class JudgeLabeller(Labeller):
    """An AI judge labels the pairs (RLAIF / Constitutional AI feedback): ``a`` is chosen when the judge's
    P(a ≻ b) is above 0.5, ``b`` when below; exact ties carry no preference and are left out. The
    probability of the chosen response is kept as ``p_chosen`` and, with ``soft_labels``, as ``soft_label``,
    the reward model's training target (soft Bradley–Terry)."""

    def __init__(self, judge: Judge, principle: Any = DEFAULT_PRINCIPLE, both_orders: bool = True,
                 soft_labels: bool = True):
        """
        Args:
            judge: any object with ``compare(prompt, a, b, principle) -> float`` returning P(a ≻ b).
            principle: passed unchanged to ``judge.compare``: the principle's text, or the judge's own
                principle object (e.g. a constitution's principle, given by ``class_path``/``init_args``).
            both_orders: ask the judge in both orders and average (removes position bias; twice the calls).
            soft_labels: the reward model trains on the judge's probability (``soft_label``) instead of a
                hard choice; the pairs DPO trains on are the same either way.
        """
        if not callable(getattr(judge, "compare", None)):
            raise TypeError(f"JudgeLabeller.judge must have a compare(prompt, a, b, principle) method; "
                            f"got {type(judge).__name__}")
        if principle is None or (isinstance(principle, str) and not principle.strip()):
            raise ValueError("JudgeLabeller.principle must not be empty")
        self.judge, self.principle, self.both_orders, self.soft_labels = judge, principle, both_orders, soft_labels

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              context: LabelContext) -> list[Labelled]:
        check_lengths(prompts, responses_a, responses_b)
        pairs: list[Labelled] = []
        for prompt, a, b in zip(prompts, responses_a, responses_b):
            p_a = judge_probability(self.judge, prompt, a, b, self.principle, self.both_orders)
            if p_a > 0.5:
                pairs.append(self._pair(prompt, a, b, p_a))
            elif p_a < 0.5:
                pairs.append(self._pair(prompt, b, a, 1.0 - p_a))
        return pairs

    def _pair(self, prompt: str, chosen: str, rejected: str, p_chosen: float) -> dict[str, Any]:
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "p_chosen": p_chosen}
        return {**pair, "soft_label": p_chosen} if self.soft_labels else pair


# ------------------------------------------------------------------------------------------ humans


def to_label_rows(prompts: list[str], responses_a: list[str], responses_b: list[str]) -> list[dict]:
    """The rows a person labels: prompt, a, b and an empty ``choice``."""
    return [{"prompt": p, "a": a, "b": b, "choice": ""} for p, a, b in zip(prompts, responses_a, responses_b)]


def parse_choice(line: str, number: int, expected: dict, source: Path) -> str:
    """The choice (``"a"``, ``"b"`` or ``""`` if not filled yet) of one line of a filled file; a line that is
    no JSON object, or whose prompt/a/b differ from the sample it was written for, raises a DataError
    naming the file and the line number (from 1)."""
    where = f"{source} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be one object like "
                        f'{{"prompt": ..., "a": ..., "b": ..., "choice": "a"}}') from None
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "a", "b"):
        if row.get(key) != expected[key]:
            raise DataError(f"{where}: {key!r} differs from the sample written there; change only the "
                            f"'choice' field")
    choice = row.get("choice", "")
    if not isinstance(choice, str) or choice.strip().lower() not in ("", *CHOICES):
        raise DataError(f"{where}: choice must be \"a\" or \"b\", got {choice!r}")
    return choice.strip().lower()


def read_choices(path: Path, expected: list[dict]) -> list[str]:
    """Validated choices of a filled :data:`TO_LABEL_FILE`, one per expected row. Raises
    :class:`LabelsPending` while no choice is filled, and a DataError naming the lines at fault when the
    file is malformed, has the wrong number of rows, or is only partly filled."""
    lines = read_user_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is harmless
    if len(lines) != len(expected):
        raise DataError(f"{path}: {len(lines)} lines, expected {len(expected)} (one per sampled pair); "
                        f"do not add or remove lines")
    choices = [parse_choice(line, i + 1, row, path) for i, (line, row) in enumerate(zip(lines, expected))]
    empty = [i + 1 for i, c in enumerate(choices) if not c]
    if len(empty) == len(choices):
        raise LabelsPending(pending_message(path))
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise DataError(f"{path}: choice is empty on {len(empty)} line(s): {shown}; fill \"a\" or \"b\" on every "
                        f"line and run the same command again")
    return choices


def pending_message(path: Path) -> str:
    return (f"labels needed: fill the \"choice\" field of every line of {path} with \"a\" or \"b\" (the "
            f"better response), save it in place, and run the same command again to resume")


class FileLabeller(Labeller):
    """Human labels through ``<round>/to_label.jsonl``: the first call writes the file (prompt, a, b, empty
    ``choice``) and raises :class:`LabelsPending`, which stops the run; once a person has filled every
    ``choice`` with ``"a"`` or ``"b"``, the next call (the same command run again) reads and validates it —
    every error names the line — and returns the labelled pairs."""

    def label(self, prompts: list[str], responses_a: list[str], responses_b: list[str],
              context: LabelContext) -> list[Labelled]:
        check_lengths(prompts, responses_a, responses_b)
        path = context.round_dir / TO_LABEL_FILE
        expected = to_label_rows(prompts, responses_a, responses_b)
        if not path.is_file():
            write_jsonl(path, expected)
            raise LabelsPending(pending_message(path))
        choices = read_choices(path, expected)
        return [{"prompt": row["prompt"], "chosen": row[choice], "rejected": row["b" if choice == "a" else "a"]}
                for row, choice in zip(expected, choices)]


__all__ = ["AnnotatorLabeller", "FileLabeller", "Judge", "JudgeLabeller", "LabelContext", "Labeller",
           "LabelsPending", "TO_LABEL_FILE", "judge_probability", "read_choices"]
