"""Read rows from files, HF data sets or tasks, and turn them into text-level records.

SFT formats: ``prompt_response`` (``prompt``, ``response``), ``alpaca`` (``instruction``, optional
``input``, ``output``), ``messages`` (a chat: list of ``{role, content}`` ending with the assistant turn).
Preference formats: ``explicit`` (``prompt``, ``chosen``, ``rejected`` strings), ``implicit`` (HH-RLHF
style: ``chosen`` and ``rejected`` full dialogues, the prompt being their shared prefix),
``conversational`` (``chosen``/``rejected`` lists of messages, with an optional ``prompt`` list).
An optional ``margin`` column feeds the reward model's margin term, and an optional ``soft_label`` column
(the probability that ``chosen`` is preferred, e.g. an AI judge's normalised option probability) makes the
reward model train on soft targets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Message = dict[str, str]
Conversation = list[Message]

SFTFormat = Literal["auto", "prompt_response", "alpaca", "messages"]
PreferenceFormat = Literal["auto", "explicit", "implicit", "conversational"]

SFT_COLUMNS = {"prompt_response": ("prompt", "response"), "alpaca": ("instruction", "output"), "messages": ("messages",)}
PREFERENCE_COLUMNS = {"explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
                      "conversational": ("chosen", "rejected")}

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


class DataError(ValueError):
    """Bad input data; the message names the source, the row or the column at fault."""


@dataclass(frozen=True)
class SFTRecord:
    """One demonstration: ``prompt`` is a string or a conversation (then the chat template applies)."""

    prompt: str | Conversation
    response: str


@dataclass(frozen=True)
class PreferenceRecord:
    """One comparison: ``chosen`` ≻ ``rejected`` as answers to ``prompt``."""

    prompt: str | Conversation
    chosen: str
    rejected: str
    margin: float = 0.0
    soft_label: float = 1.0  # P(chosen ≻ rejected) as a training target; 1 for a hard label


def load_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` folder, or an HF data set name."""
    import datasets

    suffix = Path(path).suffix.lower()
    looks_local = suffix in {".jsonl", ".json", ".parquet"} or path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    try:
        if suffix in {".jsonl", ".json"}:
            ds = datasets.load_dataset("json", data_files=path, split="train")
        elif suffix == ".parquet":
            ds = datasets.load_dataset("parquet", data_files=path, split="train")
        elif looks_local:
            ds = datasets.load_from_disk(path)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data {path!r} could not be read: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return ds.to_list()


def detect_format(rows: list[dict[str, Any]], table: dict[str, tuple[str, ...]], source: str) -> str:
    columns = set(rows[0]) if rows else set()
    for name, needed in table.items():
        if set(needed) <= columns:
            if "conversational" in table and isinstance(rows[0]["chosen"], list):
                return "conversational"  # message lists, with or without an explicit prompt list
            return name
    known = "; ".join(f"{name}: {', '.join(needed)}" for name, needed in table.items())
    raise DataError(f"{source}: columns {sorted(columns)} match no known format ({known})")


def _require(rows: list[dict[str, Any]], columns: tuple[str, ...], fmt: str, source: str) -> None:
    if not rows:
        raise DataError(f"{source}: no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{source}: format {fmt} needs column(s) {', '.join(missing)}; found {', '.join(sorted(rows[0]))}")


def _text(row: dict[str, Any], column: str, source: str, index: int) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source} row {index}: empty or non-text {column!r}")
    return value


def _conversation(value: Any, column: str, source: str, index: int) -> Conversation:
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{source} row {index}: {column!r} must be a non-empty list of {{role, content}} messages")
    return value


def sft_records(rows: list[dict[str, Any]], fmt: SFTFormat, source: str) -> list[SFTRecord]:
    fmt = detect_format(rows, SFT_COLUMNS, source) if fmt == "auto" else fmt
    _require(rows, SFT_COLUMNS[fmt], fmt, source)
    records = []
    for i, row in enumerate(rows):
        if fmt == "prompt_response":
            records.append(SFTRecord(_text(row, "prompt", source, i), _text(row, "response", source, i)))
        elif fmt == "alpaca":
            instruction, extra = _text(row, "instruction", source, i), (row.get("input") or "").strip()
            template = ALPACA_TEMPLATE_WITH_INPUT if extra else ALPACA_TEMPLATE
            records.append(SFTRecord(template.format(instruction=instruction, input=extra), _text(row, "output", source, i)))
        else:
            chat = _conversation(row["messages"], "messages", source, i)
            if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip() or len(chat) < 2:
                raise DataError(f"{source} row {i}: 'messages' must end with a non-empty assistant turn after a prompt")
            records.append(SFTRecord(chat[:-1], chat[-1]["content"]))
    return records


def shared_prefix(a: str, b: str) -> str:
    """Longest common prefix of two strings."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def implicit_prompt(a: str, b: str) -> str:
    """The prompt of an implicit pair: their shared prefix, ended at a word boundary (the answers never
    start inside a word) and without trailing whitespace (it belongs to the answers)."""
    n = len(shared_prefix(a, b))
    if n < min(len(a), len(b)) and not (a[n].isspace() and b[n].isspace()):
        while n and not a[n - 1].isspace():
            n -= 1
    return a[:n].rstrip()


def preference_records(rows: list[dict[str, Any]], fmt: PreferenceFormat, source: str) -> list[PreferenceRecord]:
    fmt = detect_format(rows, PREFERENCE_COLUMNS, source) if fmt == "auto" else fmt
    _require(rows, PREFERENCE_COLUMNS[fmt], fmt, source)
    records = []
    for i, row in enumerate(rows):
        margin = float(row.get("margin") or 0.0)
        soft_label = float(row["soft_label"]) if row.get("soft_label") is not None else 1.0
        if not 0.0 <= soft_label <= 1.0:
            raise DataError(f"{source} row {i}: soft_label {soft_label} is not a probability in [0, 1]")
        if fmt == "explicit":
            prompt = _text(row, "prompt", source, i)
            chosen, rejected = _text(row, "chosen", source, i), _text(row, "rejected", source, i)
        elif fmt == "implicit":
            full_c, full_r = _text(row, "chosen", source, i), _text(row, "rejected", source, i)
            prompt = implicit_prompt(full_c, full_r)
            chosen, rejected = full_c[len(prompt):], full_r[len(prompt):]
            if not prompt.strip():
                raise DataError(f"{source} row {i}: 'chosen' and 'rejected' share no prompt prefix")
            if not chosen.strip() or not rejected.strip():
                raise DataError(f"{source} row {i}: 'chosen' and 'rejected' are identical after their shared prompt")
        else:
            chat_c = _conversation(row["chosen"], "chosen", source, i)
            chat_r = _conversation(row["rejected"], "rejected", source, i)
            if row.get("prompt"):
                prompt = _conversation(row["prompt"], "prompt", source, i)
            else:
                n = 0
                while n < min(len(chat_c), len(chat_r)) - 1 and chat_c[n] == chat_r[n]:
                    n += 1
                prompt, chat_c, chat_r = chat_c[:n], chat_c[n:], chat_r[n:]
            if not prompt or len(chat_c) != 1 or len(chat_r) != 1:
                raise DataError(f"{source} row {i}: conversational pairs need a prompt and one assistant answer each")
            chosen, rejected = chat_c[0]["content"], chat_r[0]["content"]
            if not chosen.strip() or not rejected.strip():
                raise DataError(f"{source} row {i}: empty chosen or rejected answer")
        records.append(PreferenceRecord(prompt, chosen, rejected, margin, soft_label))
    return records
