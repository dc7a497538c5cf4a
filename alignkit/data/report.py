"""The data report: what a data module tells its user at set-up, so that no example is mangled in silence.

One compact block on the console, and the same numbers as a dict in the data module's ``state_dict()`` (which
the run directory's ``metrics.json`` stores under ``data``) and in the loggers' hyperparameters:

- rows read, examples kept for training and validation, examples dropped and why (too long under
  ``truncation: drop``, identical chosen/rejected answers, answers made identical by truncation);
- token lengths before truncation (50th and 95th percentile, max) of the prompt, each response and the whole
  example, against the limits ``max_prompt_length`` / ``max_length`` (with the value ``auto`` chose), and how many
  examples were cut in each part;
- the share of ``<unk>`` tokens (tokens the tokenizer could not spell).

Past :data:`TRUNCATED_WARNING` of the examples truncated (or dropped as too long), or :data:`UNK_WARNING` of the
tokens ``<unk>``, a one-line warning names the option that fixes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from alignkit.data.tokenize import TOO_LONG, TruncationStats

#: Share of truncated (or dropped as too long) examples past which the report warns.
TRUNCATED_WARNING = 0.05
#: Share of ``<unk>`` tokens past which the report warns.
UNK_WARNING = 0.01


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile: the smallest value with at least ``q`` % of the values at or below it
    (``sorted(values)[ceil(q/100 · n) − 1]``); 0 for no values. E.g. the 50th of [1, 2, 3, 10] is 2."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def lengths_summary(values: list[int]) -> dict[str, int]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values, default=0)}


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "0 %"


@dataclass
class DataReport:
    """The report of one data module after set-up (see the module docstring)."""

    source: str
    """The file, data set or task read."""
    kind: str
    """The data kind: ``sft``, ``preference`` or ``prompt``."""
    format: str | None
    """The row format (as detected), if the kind has formats."""
    rows: int
    """Rows read (after ``limit``)."""
    train: int
    """Training examples (rows of packed examples with ``packing``)."""
    val: int
    """Validation examples."""
    stats: TruncationStats
    max_length: int
    max_prompt_length: int
    responses: list[str]
    """Names of the responses of an example: ``["response"]``, ``["chosen", "rejected"]``, or none (prompts)."""
    auto: dict[str, str] = field(default_factory=dict)
    """For each limit set to ``auto``: how its value was chosen."""
    tokens: int = 0
    """Tokens of every example before truncation (prompt and responses, EOS included)."""
    unk_tokens: int = 0
    """Of which ``<unk>``."""
    identical_pairs: int = 0
    """Preference rows whose chosen and rejected answers are the same text (dropped)."""
    unk: str = "use a model whose tokenizer covers this text (model.policy.name_or_path)"
    """What fixes a high ``<unk>`` rate (the tiny model names its own option)."""
    context: str = "use a model with a longer context (model.policy.name_or_path)"
    """What fixes a context too short for the data (the tiny model names its own option)."""

    @property
    def unk_rate(self) -> float:
        return self.unk_tokens / self.tokens if self.tokens else 0.0

    def lengths(self) -> dict[str, dict[str, int]]:
        """Percentiles of the token lengths before truncation: prompt, each response, total."""
        out = {"prompt": lengths_summary(self.stats.prompt_lengths)}
        for name, values in zip(self.responses, self.stats.response_lengths):
            out[name] = lengths_summary(values)
        if self.responses:
            out["total"] = lengths_summary(self.stats.total_lengths)
        return out

    def warnings(self) -> list[str]:
        """One line per problem past its threshold, each naming the option that fixes it."""
        s, out = self.stats, []
        too_long = s.dropped_by.get(TOO_LONG, 0)
        for count, verb in ((s.truncated, "were truncated"), (too_long, "were dropped as too long")):
            if s.examples and count / s.examples > TRUNCATED_WARNING:
                out.append(f"{count} of {s.examples} examples ({_share(count, s.examples)}) {verb} "
                           f"in {self.source}: {self._raise_hint()}")
        if self.unk_rate > UNK_WARNING:
            out.append(f"{_share(self.unk_tokens, self.tokens)} of the tokens of {self.source} are <unk> "
                       f"({self.unk_tokens} of {self.tokens}): {self.unk}")
        return out

    def _raise_hint(self) -> str:
        """The options that would have kept every example whole (or the model's context, when it capped ``auto``)."""
        if any("context" in how for how in self.auto.values()):
            return f"the model's context ({self.max_length} tokens) caps max_length=auto: {self.context}"
        s = self.stats
        longest_prompt, longest = max(s.prompt_lengths, default=0), max(s.total_lengths, default=0)
        options = []
        if longest_prompt > self.max_prompt_length:
            options.append(f"data.max_prompt_length (now {self.max_prompt_length}; longest prompt {longest_prompt})")
        if self.responses and longest > self.max_length:
            options.append(f"data.max_length (now {self.max_length}; longest example {longest})")
        return "raise " + " and ".join(options) + ", or set them to auto" if options else "raise the limits"

    def as_dict(self) -> dict[str, Any]:
        """The report as plain JSON values (for ``metrics.json``, checkpoints and loggers)."""
        s = self.stats
        return {
            "source": self.source, "kind": self.kind, "format": self.format,
            "rows": self.rows, "examples": s.examples, "train": self.train, "val": self.val,
            "dropped": s.dropped, "dropped_by": dict(s.dropped_by), "identical_pairs": self.identical_pairs,
            "truncated": s.truncated, "prompt_truncated": s.prompt_truncated,
            "responses_truncated": dict(zip(self.responses, s.responses_truncated)),
            "max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "auto": dict(self.auto),
            "lengths": self.lengths(),
            "tokens": self.tokens, "unk_tokens": self.unk_tokens, "unk_rate": self.unk_rate,
            "warnings": self.warnings(),
        }

    def text(self) -> str:
        """The console block (without the warnings)."""
        s = self.stats
        fmt = f", {self.format}" if self.format else ""
        used = f"{self.train} train + {self.val} val {'examples' if self.kind != 'prompt' else 'prompts'}"
        dropped = "; ".join(f"{n} {reason}" for reason, n in s.dropped_by.items())
        lines = [f"data: {self.source} ({self.kind}{fmt}): {self.rows} rows read -> {used}, "
                 f"{s.dropped} dropped{f' ({dropped})' if dropped else ''}"]
        lengths = self.lengths()
        limits: dict[str, tuple[str, int | None, int]] = {
            "prompt": ("max_prompt_length", self.max_prompt_length, s.prompt_truncated),
            "total": ("max_length", self.max_length, s.truncated),
        }
        for name, cut in zip(self.responses, s.responses_truncated):
            limits[name] = ("", None, cut)
        width = max(len(name) for name in ["tokens", *lengths])
        shown = {name: f"{option}={'auto:' if option in self.auto else ''}{value}" if option else "-"
                 for name, (option, value, _) in limits.items()}
        room = max(len(text) for text in shown.values())
        lines.append(f"  {'tokens':<{width}}  {'p50':>5} {'p95':>5} {'max':>5}  {'limit':<{room}}  truncated")
        for name, summary in lengths.items():
            cut = limits[name][2]
            lines.append(f"  {name:<{width}}  {summary['p50']:>5} {summary['p95']:>5} {summary['max']:>5}  "
                         f"{shown[name]:<{room}}  {cut} ({_share(cut, s.examples)})")
        for option, how in self.auto.items():
            lines.append(f"  {option}=auto -> {getattr(self, option)}: {how}")
        unk = f"  <unk>: {self.unk_tokens} of {self.tokens} tokens ({_share(self.unk_tokens, self.tokens)})"
        if self.kind == "preference":
            unk += f"; identical chosen/rejected pairs dropped: {self.identical_pairs}"
        lines.append(unk)
        return "\n".join(lines)


__all__ = ["DataReport", "TRUNCATED_WARNING", "UNK_WARNING", "lengths_summary", "percentile"]
