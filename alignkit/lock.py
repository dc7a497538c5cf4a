"""One writer per run directory: an OS-level lock on ``<run_dir>/.lock``, held for the life of the run.

The lock is ``fcntl.flock`` on an open file, so the operating system releases it when the holding process ends,
however it ends (SIGKILL included): a lock left behind by a dead process is never in the way. The file also
records who holds it (pid, host, start time, command), which a refused second writer names. Where the file
system does not support ``flock`` (some network mounts), the recorded pid and host decide instead: a holder
on this host whose pid no longer runs is stale and taken over; one on another host is trusted.

Only global rank 0 of a multi-process run takes the lock (:func:`is_launch_rank_zero`); the other ranks write
through it.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows: the pid/host record is the lock
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"

#: Environment variables that hold a process's rank in the launchers alignkit runs under (torchrun, Lightning's
#: own DDP launcher, SLURM): a process is global rank 0 when every one present is 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_launch_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process), judged from the launcher's environment
    (before any Lightning trainer exists)."""
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in RANK_VARIABLES)


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since 2026-12-02 11:00:00 (alignkit fit ...)`` from a lock record."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if holder.get("started") else "?"
    command = " ".join(holder.get("command", []))
    if len(command) > 80:
        command = command[:77] + "..."
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {since}" + (
        f" ({command})" if command else "")


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock, or raises :class:`RunLockedError` naming the
    holder. :meth:`acquire` / :meth:`release` do the same without a ``with`` block."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
            record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                      "command": ["alignkit", *sys.argv[1:]]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _lock(self, fd: int) -> None:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._locked_error() from None
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # No flock here: the record decides.
        holder = self.read_holder()
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            if holder.get("host") != socket.gethostname() or _pid_running(pid):
                raise self._locked_error(holder)

    def _locked_error(self, holder: dict[str, Any] | None = None) -> RunLockedError:
        holder = self.read_holder() if holder is None else holder
        who = describe(holder) if holder else "another process"
        return RunLockedError(f"run directory {self.path.parent} is in use by {who}; wait for it to end or choose "
                              f"another --run_dir (nothing was written; the lock is {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder any more (the file stays: removing it would race with a new holder)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()
