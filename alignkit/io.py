"""Files that are never half-written: atomic writes and JSON-lines files.

An atomic write goes to ``.<name>.<random>.tmp`` in the target's folder, is flushed to disk (``fsync``) and
renamed over the target, so a process killed while writing (even with SIGKILL) leaves the previous file intact;
the temporary file is removed when the write fails. :func:`atomic_write_text` (and everything built on it) raises
a one-line :class:`alignkit.errors.WriteFailed` when the disk is full or the folder not writable
(:func:`as_write_failed`). An append (:func:`append_jsonl`) is flushed to disk before it returns.

Imports only the standard library and :mod:`alignkit.errors`, so every layer can use it.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, AnyStr

from alignkit.errors import DataError, WriteFailed

#: The errors of a write that cannot succeed as things stand: disk or quota full, a file too large, no permission,
#: a read-only file system.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


# ---------------------------------------------------------------------------------------------- failed writes

def write_errno(exc: BaseException) -> int | None:
    """The errno among :data:`WRITE_ERRNOS` behind ``exc`` (its chain of causes and contexts included), also when a
    library reported it only in its message (torch's zip writer, safetensors); None when there is none."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, WriteFailed):
            return current.error
        if isinstance(current, OSError) and current.errno in WRITE_ERRNOS:
            return current.errno
        text = str(current)
        for number in WRITE_ERRNOS:
            if os.strerror(number) in text or f"os error {number})" in text or f"code: {number}," in text:
                return number
        todo += [current.__cause__, current.__context__]
    return None


def as_write_failed(path: str | Path, exc: BaseException) -> BaseException:
    """``exc`` as a :class:`WriteFailed` naming ``path`` when it is a failed write (:func:`write_errno`), else
    ``exc`` itself."""
    if isinstance(exc, WriteFailed):
        return exc
    number = write_errno(exc)
    return exc if number is None else WriteFailed(path, number)


# ---------------------------------------------------------------------------------------------- atomic writes

def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_name(path: Path, suffix: str = "tmp") -> Path:
    """``.<name>.<8 random hex digits>.<suffix>`` next to ``path``: where an atomic write of ``path`` goes first."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")


def _write_synced(f: IO[AnyStr], data: AnyStr) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _write_and_replace(path: Path, data: bytes | str) -> None:
    """``data`` into ``path`` through a temporary file in the same folder (:func:`temporary_name`), fsync and
    rename (``str`` in text mode without newline translation); a failure removes the temporary file and
    re-raises the error as it came."""
    tmp = temporary_name(path)
    try:
        # "x": unlike mkstemp, the file gets the usual permissions (umask)
        if isinstance(data, bytes):
            with open(tmp, "xb") as binary:
                _write_synced(binary, data)
        else:
            with open(tmp, "x", newline="") as text:
                _write_synced(text, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file in the same folder, fsync and rename. A failure leaves
    ``path`` as it was and re-raises the error as it came: the low-level writer for callers that name the file at
    fault themselves (a checkpoint's checksum names its checkpoint); others use :func:`atomic_write_text`."""
    _write_and_replace(Path(path), data)


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` into ``path`` (its folder made if missing) through a temporary file in the same folder, fsync and
    rename; a failure leaves ``path`` as it was (:class:`alignkit.errors.WriteFailed` when the disk is full or the
    folder not writable)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_and_replace(path, text)
    except BaseException as exc:
        failed = as_write_failed(path, exc)
        if failed is exc:
            raise
        raise failed from exc


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` as indented JSON with sorted keys, written by :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------- JSON lines

def jsonl_text(rows: Iterable[Any]) -> str:
    """One ``json.dumps`` line per row, each ending in a newline."""
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """Write ``rows`` as a JSON-lines file, atomically (:func:`atomic_write_text`)."""
    atomic_write_text(Path(path), jsonl_text(rows))


def append_jsonl(path: Path, row: Any) -> None:
    """Append ``row`` as one JSON line to ``path`` (made, with its folder, if missing) and flush it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_user_text(path: str | Path) -> str:
    """The text of a file a user gave (data, prompts, labels, a constitution), decoded as UTF-8; a leading byte-order
    mark is skipped. Bytes that are not UTF-8 raise a one-line :class:`alignkit.errors.DataError` naming the file,
    the line (from 1) and the column of the first bad byte, instead of Python's byte offset into the whole file."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)  # the offset counts after the BOM
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        bad = raw[start:start + 1].hex()
        raise DataError(f"{path}, line {line}, column {column}: byte 0x{bad} is not UTF-8; save the file as UTF-8 "
                        f"(e.g. iconv -f latin1 -t utf-8)") from None


def parse_jsonl_line(path: str | Path, number: int, line: str) -> Any:
    """The value of line ``number`` (from 1) of the JSON-lines file ``path``; a line that is not valid JSON raises
    a one-line :class:`alignkit.errors.DataError` (a ValueError) naming the file and the line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The values of a JSON-lines file, in file order; blank lines are skipped, and a line that is not valid JSON
    raises a one-line :class:`alignkit.errors.DataError` naming the file and the line (:func:`parse_jsonl_line`)."""
    return [parse_jsonl_line(path, number, line)
            for number, line in enumerate(read_user_text(path).splitlines(), 1) if line.strip()]


__all__ = ["WRITE_ERRNOS", "append_jsonl", "as_write_failed", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "fsync_dir", "jsonl_text", "parse_jsonl_line", "read_jsonl", "read_user_text",
           "temporary_name", "write_errno", "write_jsonl"]
