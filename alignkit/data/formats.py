"""Read rows from files, HF data sets or tasks, and turn them into text-level records.

SFT formats: ``prompt_response`` (``prompt``, ``response``), ``alpaca`` (``instruction``, optional
``input``, ``output``), ``messages`` (a chat: list of ``{role, content}`` ending with the assistant turn).
Preference formats: ``explicit`` (``prompt``, ``chosen``, ``rejected`` strings), ``implicit`` (HH-RLHF
style: ``chosen`` and ``rejected`` full dialogues, the prompt being their shared prefix),
``conversational`` (``chosen``/``rejected`` lists of messages, with an optional ``prompt`` list).
Pairs whose two answers are the same text are returned with ``identical`` true (the data module drops them).
An optional ``margin`` column feeds the reward model's margin term, and an optional ``soft_label`` column
(the probability that ``chosen`` is preferred, e.g. an AI judge's normalised option probability) makes the
reward model train on soft targets.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import DataError
from alignkit.io import read_user_text

Message = dict[str, str]
Conversation = list[Message]

SFTFormat = Literal["auto", "prompt_response", "alpaca", "messages"]
PreferenceFormat = Literal["auto", "explicit", "implicit", "conversational"]

SFT_COLUMNS = {"prompt_response": ("prompt", "response"), "alpaca": ("instruction", "output"),
               "messages": ("messages",)}
PREFERENCE_COLUMNS = {"explicit": ("prompt", "chosen", "rejected"), "implicit": ("chosen", "rejected"),
                      "conversational": ("chosen", "rejected")}

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_TEMPLATE_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


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

    @property
    def identical(self) -> bool:
        """Whether both answers are the same text (up to surrounding whitespace): a pair with no preference in
        it, which the data module drops (or refuses, with ``strict``)."""
        return self.chosen.strip() == self.rejected.strip()


def load_rows(path: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` folder, or an HF data set name.
    JSON files are read with the standard library (see :func:`read_json_rows`); ``datasets`` is imported
    only for the others."""
    suffix = Path(path).suffix.lower()
    looks_local = suffix in {".jsonl", ".json", ".parquet"} or path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    try:
        if suffix in {".jsonl", ".json"}:
            return read_json_rows(path)
        import datasets

        if suffix == ".parquet":
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


def read_json_rows(path: str, strings: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file (one object per line; blank lines skipped) or of a JSON document (a list of
    objects; a list of other values becomes a ``text`` column; one object is one row), whatever the suffix,
    as ``datasets``' json loader reads them: every row gets every column (``None`` where a row has none, in
    the order the columns first appear) and a column mixing integers and floats holds floats. Bad JSON is a
    :class:`DataError` naming the file and the line. With ``strings``, a JSON Lines line may also be a string
    (a row of one ``text`` column, as in a JSON list of strings)."""
    text = read_user_text(path)  # a leading byte-order mark is skipped; a byte that is not UTF-8 names its line
    rows = _document_rows(path, text) if text.lstrip().startswith("[") else _line_rows(path, text, strings)
    if not any(rows):
        raise DataError(f"data {path!r} could not be read: no data")
    return _unify_columns(rows)


def _line_rows(path: str, text: str, strings: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028 etc.
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            if not rows and exc.pos >= len(line.rstrip()):  # the first line is cut short: one multi-line document
                return _document_rows(path, text)
            raise DataError(f"data {path!r} could not be read: line {number}: invalid JSON "
                            f"({exc.msg}, column {exc.colno})") from None
        if strings and isinstance(value, str):
            value = {"text": value}
        if not isinstance(value, dict):
            raise DataError(f"data {path!r} could not be read: line {number}: expected a JSON object, "
                            f"got {type(value).__name__}")
        rows.append(value)
    return rows


def _document_rows(path: str, text: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"data {path!r} could not be read: line {exc.lineno}: invalid JSON "
                        f"({exc.msg}, column {exc.colno})") from None
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise DataError(f"data {path!r} could not be read: expected JSON objects, got {type(value).__name__}")
    if not any(isinstance(item, dict) for item in value):
        return [{"text": item} for item in value]
    if not all(isinstance(item, dict) for item in value):
        raise DataError(f"data {path!r} could not be read: a JSON list mixing objects and other values")
    return value


def _unify_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every column in every row (``None`` where missing); a column of numbers that mixes integers with floats
    (or holds integers beyond 64 bits) holds floats only, as in an Arrow table."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    floats = {key for key in columns if _float_column([row.get(key) for row in rows])}
    if not floats and all(len(row) == len(columns) for row in rows):
        return rows
    return [{key: float(row[key]) if key in floats and row.get(key) is not None else row.get(key) for key in columns}
            for row in rows]


def _float_column(values: list[Any]) -> bool:
    """Whether a column holds integers that Arrow would store as floats."""
    numbers = [v for v in values if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
        return False
    ints = [v for v in numbers if isinstance(v, int)]
    return bool(ints) and (len(ints) < len(numbers) or any(not -2**63 <= v < 2**63 for v in ints))


def load_prompts(path: str, column: str = "prompt") -> list[str]:
    """Prompts from a file or data set: rows with a ``column`` field, or plain strings (JSON Lines of strings, a
    JSON list of strings, or rows with a ``text`` column only). Each prompt must be non-empty text; a one-line
    :class:`DataError` names the file and the row (counted from 1) otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in {".jsonl", ".json"} and os.path.exists(path):
        rows = read_json_rows(path, strings=True)
    else:
        rows = load_rows(path)
    columns = set(rows[0]) if rows else set()
    if column not in columns and "text" not in columns:
        raise DataError(f"prompts {path!r}: no {column!r} field; found {', '.join(sorted(columns))} (give rows with "
                        f"a {column!r} field, or plain strings)")
    prompts = []
    for number, row in enumerate(rows, 1):
        value = row.get(column) if row.get(column) is not None else row.get("text")  # a plain string's row: text
        if not isinstance(value, str) or not value.strip():
            shown = ("empty text" if isinstance(value, str) else "nothing" if value is None
                     else f"a {type(value).__name__}")
            raise DataError(f"prompts {path!r} row {number}: {column!r} must be non-empty text, got {shown}")
        prompts.append(value)
    return prompts


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
        raise DataError(f"{source}: format {fmt} needs column(s) {', '.join(missing)}; "
                        f"found {', '.join(sorted(rows[0]))}")


def _text(row: dict[str, Any], column: str, source: str, index: int) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{source} row {index + 1}: empty or non-text {column!r}")
    return value


def _conversation(value: Any, column: str, source: str, index: int) -> Conversation:
    if (not isinstance(value, list) or not value
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value)):
        raise DataError(f"{source} row {index + 1}: {column!r} must be a non-empty list of {{role, content}} messages")
    return value


def sft_records(rows: list[dict[str, Any]], fmt: SFTFormat, source: str) -> list[SFTRecord]:
    found = detect_format(rows, SFT_COLUMNS, source) if fmt == "auto" else fmt
    _require(rows, SFT_COLUMNS[found], found, source)
    records = []
    for i, row in enumerate(rows):
        if found == "prompt_response":
            records.append(SFTRecord(_text(row, "prompt", source, i), _text(row, "response", source, i)))
        elif found == "alpaca":
            instruction, extra = _text(row, "instruction", source, i), (row.get("input") or "").strip()
            template = ALPACA_TEMPLATE_WITH_INPUT if extra else ALPACA_TEMPLATE
            records.append(SFTRecord(template.format(instruction=instruction, input=extra),
                                     _text(row, "output", source, i)))
        else:
            chat = _conversation(row["messages"], "messages", source, i)
            if chat[-1]["role"] != "assistant" or not chat[-1]["content"].strip() or len(chat) < 2:
                raise DataError(f"{source} row {i + 1}: 'messages' must end with a non-empty assistant turn after a "
                                f"prompt")
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
    found = detect_format(rows, PREFERENCE_COLUMNS, source) if fmt == "auto" else fmt
    _require(rows, PREFERENCE_COLUMNS[found], found, source)
    records = []
    for i, row in enumerate(rows):
        margin = float(row.get("margin") or 0.0)
        soft_label = float(row["soft_label"]) if row.get("soft_label") is not None else 1.0
        if not 0.0 <= soft_label <= 1.0:
            raise DataError(f"{source} row {i + 1}: soft_label {soft_label} is not a probability in [0, 1]")
        prompt: str | Conversation
        if found == "explicit":
            prompt = _text(row, "prompt", source, i)
            chosen, rejected = _text(row, "chosen", source, i), _text(row, "rejected", source, i)
        elif found == "implicit":
            full_c, full_r = _text(row, "chosen", source, i), _text(row, "rejected", source, i)
            if full_c.strip() == full_r.strip():  # one dialogue twice: no answer to tell apart
                records.append(PreferenceRecord(full_c.strip(), "", "", margin, soft_label))
                continue
            prompt = implicit_prompt(full_c, full_r)
            chosen, rejected = full_c[len(prompt):], full_r[len(prompt):]
            if not prompt.strip():
                raise DataError(f"{source} row {i + 1}: 'chosen' and 'rejected' share no prompt prefix")
            if not chosen.strip() or not rejected.strip():
                raise DataError(f"{source} row {i + 1}: one of 'chosen' and 'rejected' is the other plus more text; "
                                f"the prompt they share leaves an empty answer")
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
                raise DataError(f"{source} row {i + 1}: conversational pairs need a prompt and one assistant answer "
                                f"each")
            chosen, rejected = chat_c[0]["content"], chat_r[0]["content"]
            if not chosen.strip() or not rejected.strip():
                raise DataError(f"{source} row {i + 1}: empty chosen or rejected answer")
        records.append(PreferenceRecord(prompt, chosen, rejected, margin, soft_label))
    return records
