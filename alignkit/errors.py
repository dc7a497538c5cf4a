"""Every error alignkit raises on purpose, in one place. Each message is one line naming the file, option or
value at fault; the CLI prints it as ``alignkit: error: …`` instead of a traceback."""

from __future__ import annotations

import errno
import os
from pathlib import Path


class PluginError(RuntimeError):
    """A plugin raised, returned the wrong type, or lacks a hook it must implement."""


class NonFiniteError(FloatingPointError):
    """A loss or reward became NaN/inf; the message names the step and the quantity."""


class DataError(ValueError):
    """Bad input data; the message names the source, the row or the column at fault."""


class ConfigError(ValueError):
    """A setting cannot work as given (e.g. it needs an optional package that is not installed); the message names
    the option and what to do."""


class RunExistsError(FileExistsError):
    """The chosen run directory already holds a finished run."""


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was asked for a run directory without a usable checkpoint."""


class ConfigChangedError(ValueError):
    """``--resume`` was given a configuration that differs from the run's ``config.yaml``."""


class RunLockedError(OSError):
    """Another process is writing the run directory."""


class WriteFailed(OSError):
    """A file of the run could not be written (disk full, no permission): one line saying what, where and that
    nothing written before was damaged."""

    def __init__(self, path: str | Path, error: int, detail: str = ""):
        self.path, self.error = Path(path), error
        advice = "once it is writable" if error in (errno.EACCES, errno.EPERM, errno.EROFS) else "once there is room"
        super().__init__(error, f"could not write {path}: {os.strerror(error)}{detail}; nothing written before was "
                                f"damaged (a run continues from its last checkpoint with --resume true {advice})")

    def __str__(self) -> str:
        return str(self.args[1])
