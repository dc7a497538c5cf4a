"""The constitution: a YAML file of principles, loaded into typed dataclasses, and the prompt templates a
language-model critic, reviser and judge reads (after Bai et al. 2022, "Constitutional AI").

A constitution file holds a list ``principles``; every principle has a ``name`` and three texts::

    principles:
      - name: positive
        critique_request: Point out every negative word in the review ...
        revision_request: Rewrite the review so that it is positive ...
        comparison_question: Which of these reviews is more positive?

Prompts (``{...}`` are filled in; ``\\n`` is a newline)::

    dialogue    Human: {prompt}\\n\\nAssistant: {response}
    critique    {dialogue}\\n\\nCritique request: {critique_request}\\n\\nCritique:
    revision    {critique prompt} {critique}\\n\\nRevision request: {revision_request}\\n\\nRevision:
    comparison  Consider the following conversation between a human and an assistant:\\n\\n
                Human: {prompt}\\n\\n{comparison_question}\\nOptions:\\n(A) {a}\\n(B) {b}\\n
                The answer is: (

The comparison prompt ends just before the option letter, so the judge's next-token distribution over
the option labels is its preference.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from alignkit import DataError, read_user_text

#: The constitution that ships with alignkit (principles for the ``sentiment`` task and general ones).
DEFAULT_CONSTITUTION = Path(__file__).with_name("constitution.yaml")


class ConstitutionError(DataError):
    """A constitution file is missing, unreadable or malformed; the message names the file and field."""


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution."""

    name: str
    """Short identifier, unique within the constitution (e.g. ``positive``)."""
    critique_request: str
    """Asked after the dialogue: what the critic should look for in the response."""
    revision_request: str
    """Asked after the critique: how the reviser should rewrite the response."""
    comparison_question: str
    """Asked before the two options: which response better follows the principle."""


@dataclass(frozen=True)
class Constitution:
    """An ordered, non-empty set of principles with unique names."""

    principles: tuple[Principle, ...]
    source: str = "<memory>"
    """Where the principles were read from (for messages)."""

    def __post_init__(self) -> None:
        if not self.principles:
            raise ConstitutionError(f"constitution {self.source}: no principles")
        names = [p.name for p in self.principles]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConstitutionError(f"constitution {self.source}: duplicate principle name(s) {', '.join(duplicates)}")

    @property
    def names(self) -> list[str]:
        """The principles' names, in file order."""
        return [p.name for p in self.principles]

    def get(self, name: str) -> Principle:
        """The principle called ``name``."""
        for principle in self.principles:
            if principle.name == name:
                return principle
        raise KeyError(f"constitution {self.source} has no principle {name!r}; it has {', '.join(self.names)}")

    def sample(self, rng: random.Random) -> Principle:
        """One principle drawn uniformly with ``rng``."""
        return self.principles[rng.randrange(len(self.principles))]


PRINCIPLE_FIELDS = tuple(f.name for f in fields(Principle))


def parse_principle(entry: Any, index: int, source: str) -> Principle:
    """A :class:`Principle` from one entry of the file's ``principles`` list; every field must be a
    non-empty string (runs of whitespace, newlines included, become one space) and no other field is
    allowed."""
    where = f"constitution {source}: principles[{index}]"
    if not isinstance(entry, dict):
        raise ConstitutionError(f"{where} must be a mapping with fields {', '.join(PRINCIPLE_FIELDS)}")
    unknown = sorted(set(entry) - set(PRINCIPLE_FIELDS))
    if unknown:
        raise ConstitutionError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; "
                                f"allowed: {', '.join(PRINCIPLE_FIELDS)}")
    values = {}
    for name in PRINCIPLE_FIELDS:
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            label = f"{where} ({entry['name']})" if isinstance(entry.get("name"), str) else where
            raise ConstitutionError(f"{label}: field {name!r} must be a non-empty string, got {value!r}")
        values[name] = " ".join(value.split())
    return Principle(**values)


def parse_constitution(data: Any, source: str = "<memory>") -> Constitution:
    """A :class:`Constitution` from parsed YAML: a mapping with a non-empty list ``principles``."""
    if not isinstance(data, dict) or "principles" not in data:
        raise ConstitutionError(f"constitution {source}: expected a mapping with a 'principles' list")
    entries = data["principles"]
    if not isinstance(entries, list) or not entries:
        raise ConstitutionError(f"constitution {source}: 'principles' must be a non-empty list")
    return Constitution(tuple(parse_principle(e, i, source) for i, e in enumerate(entries)), source)


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read a constitution YAML file (the shipped :data:`DEFAULT_CONSTITUTION` when ``path`` is None)."""
    path = DEFAULT_CONSTITUTION if path is None else Path(path).expanduser()
    if not path.is_file():
        raise ConstitutionError(f"constitution file {path} does not exist")
    try:
        data = yaml.safe_load(read_user_text(path))
    except yaml.YAMLError as exc:
        raise ConstitutionError(f"constitution {path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_constitution(data, str(path))


# ------------------------------------------------------------------------------------------ prompts

COMPARISON_PREAMBLE = "Consider the following conversation between a human and an assistant:"
ANSWER_PREFIX = "The answer is: ("


def dialogue(prompt: str, response: str) -> str:
    """The human turn and the assistant's response, as the critic sees them."""
    return f"Human: {prompt}\n\nAssistant: {response}"


def critique_prompt(prompt: str, response: str, principle: Principle) -> str:
    """The dialogue followed by the principle's critique request; the critic continues after ``Critique:``."""
    return f"{dialogue(prompt, response)}\n\nCritique request: {principle.critique_request}\n\nCritique:"


def revision_prompt(prompt: str, response: str, critique: str, principle: Principle) -> str:
    """The critique prompt, the critique, then the principle's revision request; the reviser continues
    after ``Revision:``."""
    return (f"{critique_prompt(prompt, response, principle)} {critique}\n\n"
            f"Revision request: {principle.revision_request}\n\nRevision:")


def comparison_prompt(prompt: str, a: str, b: str, principle: Principle,
                      labels: tuple[str, str] = ("A", "B")) -> str:
    """The multiple-choice question of a pairwise judgement, ending with ``The answer is: (`` so that the
    next token is the judge's choice among ``labels``."""
    first, second = labels
    return (f"{COMPARISON_PREAMBLE}\n\nHuman: {prompt}\n\n{principle.comparison_question}\n"
            f"Options:\n({first}) {a}\n({second}) {b}\n{ANSWER_PREFIX}")
