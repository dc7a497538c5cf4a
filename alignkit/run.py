"""The run directory: resolved config, checkpoints, the final HF model and a ``metrics.json`` summary.

Writes are atomic: the model, the summary and any rewrite of ``metrics.csv`` are written under a temporary name
and renamed into place, so a killed run never leaves a half-written file where a finished one is expected, and
a failed write (disk full, no permission) raises a one-line :class:`alignkit.checkpoint.WriteFailed` with the
earlier files intact.

A resumed run (``--resume true``) continues from the newest checkpoint that passes :func:`verify_checkpoint`:
a damaged one is set aside as ``<name>.corrupt`` with a one-line note and the previous one is used
(:func:`resume_checkpoint`). Its configuration must equal the saved ``config.yaml`` but for the keys in
:data:`RESUME_IGNORED_KEYS` (:func:`config_changes`), unless ``--resume_with_changes true`` is given: then the
changes are recorded in ``resume_changes.jsonl`` and :class:`NewHyperparameters` applies the optimiser's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from alignkit.checkpoint import LAST_NAME, link_atomically, recover_folder, verify_checkpoint
from alignkit.distributed import full_state_dict
from alignkit.errors import ConfigChangedError, NothingToResumeError, RunExistsError
from alignkit.io import as_write_failed, atomic_write_json, atomic_write_text, fsync_dir  # also importable from here
from alignkit.step_logging import last_training_batch

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = f"{CHECKPOINT_DIR}/{LAST_NAME}"
COMPLETIONS_FILE = "completions.jsonl"
CSV_FILE = "metrics.csv"
CONFIG_FILE = "config.yaml"
CHANGES_FILE = "resume_changes.jsonl"

#: Options that may differ between a run and its resumption: they choose what is resumed, where it lives (a run
#: directory may be moved) and how it is shown or checkpointed, not what is computed.
RESUME_IGNORED_KEYS = frozenset({"ckpt_path", "resume", "resume_with_changes", "run_dir", "trainer.default_root_dir",
                                 "keep_checkpoints", "checkpoint_every", "trainer.enable_progress_bar",
                                 "trainer.enable_model_summary", "quiet", "verbose", "experiment"})


def default_run_dir(recipe: str | None) -> Path:
    stem = Path(recipe).stem if recipe else "run"
    return Path("runs") / stem / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_fresh(run_dir: Path, resuming: bool = False) -> None:
    """Refuse a run directory that holds a finished run: its model, or its ``metrics.json`` (the last file
    every command writes, e.g. ``collect``, which writes no model); and, for a new run, one that holds the
    checkpoints of an unfinished run (``--resume true`` continues it)."""
    for name, what in ((MODEL_DIR, "a finished model"), (METRICS_FILE, "a finished run")):
        if (run_dir / name).exists():
            advice = "there is nothing to resume" if resuming else "choose another --run_dir (nothing was overwritten)"
            raise RunExistsError(f"run directory {run_dir} already holds {what} ({name}); {advice}")
    if not resuming and (found := checkpoint_candidates(run_dir)):
        raise RunExistsError(f"run directory {run_dir} holds checkpoints of an unfinished run ({CHECKPOINT_DIR}/"
                             f"{found[0].name}); continue it with --resume true or choose another --run_dir (nothing "
                             f"was overwritten)")


_STEP_FILE = re.compile(r"^step=(\d+)\.ckpt$")


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """The checkpoints in ``<run_dir>/checkpoints``, newest first: ``step=<N>.ckpt`` by step, preceded by a
    ``last.ckpt`` that is a file or folder of its own (written by an earlier version of alignkit), not a link."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    last = folder / LAST_NAME
    recover_folder(last)  # a folder checkpoint (DeepSpeed, sharded FSDP) killed mid-swap
    steps = []
    for path in folder.iterdir():
        match = _STEP_FILE.match(path.name)
        if match:
            recover_folder(path)
            steps.append((int(match.group(1)), path))
    for old in folder.glob(".step=*.ckpt.old"):  # killed between the two renames of a folder swap
        target = old.with_name(old.name[1:-len(".old")])
        recover_folder(target)
        if target.exists() and all(p != target for _, p in steps):
            steps.append((int(_STEP_FILE.match(target.name).group(1)), target))  # type: ignore[union-attr]
    own_last = [last] if last.exists() and not last.is_symlink() else []
    return own_last + [path for _, path in sorted(steps, reverse=True)]


def resume_checkpoint(run_dir: Path, set_aside: bool = True) -> Path:
    """The checkpoint ``--resume`` continues from: the newest in ``<run_dir>/checkpoints`` that passes
    :func:`verify_checkpoint`. A damaged one is reported in one line on stderr and, with ``set_aside``, renamed to
    ``<name>.corrupt`` (so no later resume picks it); ``last.ckpt`` is then pointed at the one chosen. Raises
    :class:`NothingToResumeError` (one line, naming each damaged file) when no checkpoint is usable."""
    check_fresh(run_dir, resuming=True)
    candidates = checkpoint_candidates(run_dir)
    if not candidates:
        raise NothingToResumeError(f"cannot resume {run_dir}: there is no {LAST_CHECKPOINT} in it (give the --run_dir "
                                   f"of a run that wrote a checkpoint before it stopped)")
    rejected: list[str] = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            if rejected and set_aside and path.name != LAST_NAME:
                link_atomically(path, path.parent / LAST_NAME)
            return path
        rejected.append(f"{path} ({problem})")
        aside = path.with_name(path.name + ".corrupt")
        if set_aside:
            os.replace(path, aside)
        print(f"alignkit: checkpoint {path} is damaged: {problem}; "
              + (f"set aside as {aside.name}; " if set_aside else "") + "trying the previous one", file=sys.stderr)
    raise NothingToResumeError(f"cannot resume {run_dir}: no usable checkpoint is left: {'; '.join(rejected)}")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint to resume from (usable or not)."""
    return bool(checkpoint_candidates(run_dir))


# ---------------------------------------------------------------------------------------------- config changes

_MISSING = object()


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The keys (dotted) whose values differ between two resolved configurations, with (old, new) values. Keys in
    :data:`RESUME_IGNORED_KEYS` are skipped; where a ``class_path`` differs, only it is reported (not every
    argument of the two classes)."""
    if isinstance(old, dict) and isinstance(new, dict) and "class_path" in old and "class_path" in new \
            and old["class_path"] != new["class_path"]:
        return {f"{prefix}class_path": (old["class_path"], new["class_path"])}
    changes: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(old) | set(new), key=str):
        dotted = f"{prefix}{key}"
        if dotted in RESUME_IGNORED_KEYS:
            continue
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, dotted + "."))
        elif a != b:
            changes[dotted] = (None if a is _MISSING else a, None if b is _MISSING else b)
    return changes


def _short(value: Any, width: int = 48) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    """``key (old -> new), ...`` on one line, at most ``limit`` keys."""
    parts = [f"{key} ({_short(a)} -> {_short(b)})" for key, (a, b) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return ", ".join(parts) + (f" and {more} more" if more > 0 else "")


def check_resume_config(run_dir: Path, new: dict[str, Any], allow_changes: bool) -> dict[str, tuple[Any, Any]]:
    """Compare a resuming run's configuration with ``<run_dir>/config.yaml``: raise :class:`ConfigChangedError`
    (one line listing the changed keys) unless ``allow_changes``; return the changes."""
    import yaml

    saved = run_dir / CONFIG_FILE
    if not saved.is_file():
        return {}
    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigChangedError(f"cannot resume {run_dir}: its {CONFIG_FILE} is not valid YAML "
                                 f"({' '.join(str(exc).split())[:120]})") from None
    changes = config_changes(old, new)
    if changes and not allow_changes:
        raise ConfigChangedError(
            f"cannot resume {run_dir}: the configuration differs from its {CONFIG_FILE} "
            f"in {describe_changes(changes)}; "
            f"resume with the same options, or give --resume_with_changes true to continue with the new values "
            f"(recorded in {run_dir / CHANGES_FILE}); nothing was changed")
    return changes


def record_changes(run_dir: Path, changes: dict[str, tuple[Any, Any]], checkpoint: Path) -> None:
    """Append one JSON line to ``<run_dir>/resume_changes.jsonl``: when, from which checkpoint, what changed."""
    line = {"time": datetime.now().isoformat(timespec="seconds"), "checkpoint": str(checkpoint),
            "changes": {key: {"old": a, "new": b} for key, (a, b) in changes.items()}}
    path = run_dir / CHANGES_FILE
    earlier = path.read_text() if path.is_file() else ""
    if earlier and not earlier.endswith("\n"):
        earlier += "\n"
    atomic_write_text(path, earlier + json.dumps(line, default=str) + "\n")


class NewHyperparameters(L.Callback):
    """``--resume_with_changes``: after a resumed run has restored its optimiser and scheduler, the configuration's
    optimiser hyperparameters replace the checkpoint's (which Lightning restores with the optimiser's state). A
    changed learning rate rescales the schedule: the base rate becomes the new one and the current rate follows the
    schedule from it. Values that did not change are left untouched (bit for bit)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        fresh = pl_module.configure_optimizers()
        optimizers, schedulers = _optimizers_and_schedulers(fresh)
        for live, new in zip(trainer.optimizers, optimizers):
            bases = []
            for group, new_group in zip(live.param_groups, new.param_groups):
                for key, value in new_group.items():
                    if key not in ("params", "lr", "initial_lr") and key in group and group[key] != value:
                        group[key] = value
                bases.append(new_group.get("initial_lr", new_group["lr"]))
            configs = [c for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is live]
            if not configs:
                for group, base in zip(live.param_groups, bases):
                    group["lr"] = base
            for config in configs:
                scheduler = config.scheduler
                for i, (group, base) in enumerate(zip(live.param_groups, bases)):
                    old = scheduler.base_lrs[i]
                    if old == base:
                        continue
                    scheduler.base_lrs[i] = group["initial_lr"] = base
                    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                        group["lr"] = base * scheduler.lr_lambdas[i](scheduler.last_epoch)
                    else:
                        group["lr"] = group["lr"] * base / old if old else base
                scheduler._last_lr = [group["lr"] for group in live.param_groups]
        del schedulers


def _optimizers_and_schedulers(configured: Any) -> tuple[list, list]:
    """The optimisers and schedulers of a ``configure_optimizers`` result (an optimiser, a dict, or lists)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured], []
    if isinstance(configured, dict):
        scheduler = configured.get("lr_scheduler")
        scheduler = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
        return [configured["optimizer"]], [scheduler] if scheduler is not None else []
    if isinstance(configured, (list, tuple)) and len(configured) == 2 and isinstance(configured[0], (list, tuple)):
        return list(configured[0]), [s.get("scheduler") if isinstance(s, dict) else s for s in configured[1]]
    if isinstance(configured, (list, tuple)):
        found = [_optimizers_and_schedulers(c) for c in configured]
        return [o for opts, _ in found for o in opts], [s for _, scheds in found for s in scheds]
    return [], []


def to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict, as floats."""
    return {k: v for k, v in ((k, to_float(v)) for k, v in metrics.items()) if v is not None}


def atomic_save_model(module, target: Path, state_dict: dict | None = None) -> None:
    """``module.export`` into a temporary sibling folder, then swap it into ``target``."""
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; a run's folders are as readable as any other (umask)
        module.export(str(tmp), state_dict)
        for written in tmp.rglob("*"):  # safetensors writes 0600
            written.chmod((0o777 if written.is_dir() else 0o666) & ~umask)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        failed = as_write_failed(target, exc)
        if failed is exc:
            raise
        raise failed from exc


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a finished alignkit run?)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------- metrics.csv

def read_csv_file(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and rows of a CSV file (none if it does not exist); a last line cut short by a killed process
    (no line end) is left out."""
    if not path.is_file():
        return [], []
    with path.open(newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a CSV file (none if it does not exist)."""
    return read_csv_file(path)[1]


def csv_text(fieldnames: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class DurableCSVWriter(ExperimentWriter):
    """Lightning's CSV experiment writer without its data loss: it never deletes an existing ``metrics.csv``
    (Lightning's removes it when it opens the folder). A new run replaces the file of an earlier attempt at its
    first save, and a header change rewrites the file, both atomically (a new file renamed over the old); rows are
    otherwise appended, and an append that fails is cut back. A resumed run continues the file from the rows its
    checkpoint accounts for (:meth:`continue_file`). ``rows_written`` counts the rows in the file."""

    def __init__(self, log_dir: str):  # not super().__init__: it deletes metrics.csv
        self.metrics: list[dict[str, float]] = []
        self.metrics_keys: list[str] = []
        self.hparams: dict[str, Any] = {}
        self._fs = get_filesystem(log_dir)
        self.log_dir = log_dir
        self.metrics_file_path = os.path.join(log_dir, self.NAME_METRICS_FILE)
        os.makedirs(log_dir, exist_ok=True)
        self.rows_written = 0
        self._continuing = False  # False: a file there is an earlier attempt's, replaced at the first save

    @property
    def path(self) -> Path:
        return Path(self.metrics_file_path)

    def continue_file(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        """Make the file hold ``rows`` (the part of this run before its checkpoint) and append to it from now on."""
        used = {key for row in rows for key, value in row.items() if value not in ("", None)}
        self.metrics_keys = sorted({key for key in fieldnames if key in used} | ({"step"} if rows else set()))
        text = csv_text(self.metrics_keys, [{k: row.get(k, "") for k in self.metrics_keys} for row in rows]) \
            if rows else ""
        current = None
        if self.path.is_file():
            with self.path.open(newline="") as f:
                current = f.read()
        if current is not None and current != text:
            atomic_write_text(self.path, text)
        self.rows_written = len(rows)
        self._continuing = True

    def save(self) -> None:
        if not self.metrics:
            return
        new_keys = self._record_new_keys()
        if not self._continuing or new_keys or not self.path.is_file():
            earlier = read_csv_rows(self.path)[:self.rows_written] if self._continuing else []
            atomic_write_text(self.path, csv_text(self.metrics_keys, earlier + self.metrics))
            self._continuing = True
        else:
            size = self.path.stat().st_size
            try:
                with self.path.open("a", newline="") as f:
                    csv.DictWriter(f, fieldnames=self.metrics_keys).writerows(self.metrics)
            except BaseException as exc:
                with self.path.open("r+b") as f:  # no half row left behind (cutting back needs no room)
                    f.truncate(size)
                failed = as_write_failed(self.path, exc)
                if failed is exc:
                    raise
                raise failed from exc
        self.rows_written += len(self.metrics)
        self.metrics = []

    def sync(self) -> None:
        """Flush the file to disk (a checkpoint about to be written accounts for its rows)."""
        if self.path.is_file():
            with self.path.open("rb+") as f:
                os.fsync(f.fileno())
            fsync_dir(self.path.parent)


class OptimizerStepAxis:
    """Logger mixin: every row is logged at the trainer's optimiser step count when it is written
    (``trainer.global_step``: the updates done so far, what ``max_steps``, the checkpoints' ``step=N`` names,
    ``completions.jsonl`` and ``gold_eval.jsonl`` count), instead of Lightning's own logging step (the batches that
    stepped, one per training batch: an online algorithm's batch makes several optimiser steps). So the same update
    has the same step in ``metrics.csv``, wandb, the completions and ``alignkit compare``: a training row at the step
    its batch's update(s) reached, a validation row at the step it validated. :class:`RunDirectory` hands the
    trainer over in ``setup``; until then (or without a trainer) Lightning's step is kept."""

    trainer: L.Trainer | None = None

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if self.trainer is not None:
            step = self.trainer.global_step
        super().log_metrics(metrics, step)  # type: ignore[misc]  # the logger class it is mixed into has it


class RunCSVLogger(OptimizerStepAxis, CSVLogger):
    """Lightning's CSVLogger writing through :class:`DurableCSVWriter`, on the optimiser-step axis
    (:class:`OptimizerStepAxis`)."""

    _experiment: DurableCSVWriter | None  # (only the property below sets it)

    @property
    def experiment(self) -> DurableCSVWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = DurableCSVWriter(log_dir=self.log_dir)
        return self._experiment


class RunWandbLogger(OptimizerStepAxis, WandbLogger):
    """Lightning's WandbLogger on the optimiser-step axis (:class:`OptimizerStepAxis`): wandb's
    ``trainer/global_step`` is the trainer's ``global_step``, as in ``metrics.csv`` and the completions table.
    It does not hand wandb Lightning's ``anonymous`` argument, which wandb has deprecated: any value, even None,
    printed "The anonymous setting has no effect" (through wandb's own terminal, which no warnings filter sees).

    A run that fails before it logs anything (bad data, a model that does not load, a reference pass that fails)
    leaves no wandb run behind: the wandb run starts at the first logged metrics, and the hyperparameters logged
    before are held until then. (Lightning creates every logger's experiment at set-up when ``hasattr(logger,
    "experiment")`` says it can; until the first metrics it says it cannot.)"""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._wandb_init.pop("anonymous", None)
        self._started = False
        self._held_hyperparams: list[Any] = []

    @property
    def experiment(self) -> Any:
        if not self._started:
            raise AttributeError("the wandb run starts at the first logged metrics")
        return super().experiment

    def start(self) -> None:
        """Start the wandb run (once) and log the hyperparameters held until now."""
        if self._started:
            return
        self._started = True
        for params in self._held_hyperparams:
            super().log_hyperparams(params)
        self._held_hyperparams.clear()

    def log_hyperparams(self, params: Any) -> None:
        if self._started:
            super().log_hyperparams(params)
        else:
            self._held_hyperparams.append(params)

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self.start()
        super().log_metrics(metrics, step)


def _step(row: dict[str, str]) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------- the callback

class RunDirectory(L.Callback):
    """Exports the final model and writes ``metrics.json`` when fitting ends normally.

    Its state (the first step's metrics, the latest ones and the wall time so far) travels in checkpoints, so a
    resumed run's ``metrics.json`` reads as if the run had never stopped. So does the state of ``metrics.csv``
    (the CSV logger's file in the run directory): when a checkpoint is written, the file is flushed to disk and
    the checkpoint records how many rows it holds, N, and the optimiser step at that moment, S (the step axis of
    every row, :class:`OptimizerStepAxis`). The rows that Lightning logs for that batch come after the checkpoint
    (at step S). A run resumed from the checkpoint keeps
    the first N rows and the rows right after them at steps up to S, and drops the rest, which the resumed run
    logs again; the file is rewritten atomically, never deleted. (A checkpoint of an earlier alignkit keeps the
    rows at logging steps up to its S.) The ``completions.jsonl`` samples recorded up to the checkpoint's
    optimiser step are kept, the later ones dropped. The last training step is always logged (Lightning logs every
    ``log_every_n_steps`` batches).
    """

    def __init__(self, run_dir: str | Path, recipe: str | None = None):
        self.run_dir, self.recipe = Path(run_dir), recipe
        self.started = 0.0
        self.earlier_wall_time = 0.0  # of the processes before a resume
        self.first: dict[str, float] = {}
        self.earlier_latest: dict[str, float] = {}  # latest metrics at the checkpoint a run resumed from
        self.resumed_step: int | None = None
        self.csv_rows: int | None = None  # rows of metrics.csv when the resumed checkpoint was written
        self.csv_step: int | None = None  # the optimiser step then (an earlier alignkit's: Lightning's logging step)
        self.trainer: L.Trainer | None = None
        self.log_every_n_steps: int | None = None  # the trainer's, while the last batch logs

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer
        for logger in trainer.loggers:
            if isinstance(logger, OptimizerStepAxis):
                logger.trainer = trainer

    def csv_writer(self, trainer: L.Trainer) -> DurableCSVWriter | CSVLogger | None:
        """The writer (or, for a plain CSVLogger, the logger) of ``<run_dir>/metrics.csv`` (rank 0 only)."""
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and Path(logger.log_dir) == self.run_dir:
                return logger.experiment if isinstance(logger, RunCSVLogger) else logger
        return None

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        latest = scalars(trainer.callback_metrics) if trainer is not None else {}
        state: dict[str, Any] = {"first": self.first, "latest": latest,
                                 "wall_time_s": self.earlier_wall_time + time.perf_counter() - self.started}
        if trainer is not None and trainer.is_global_zero:
            state["csv_step"] = trainer.global_step  # the step of the rows logged next (OptimizerStepAxis)
            writer = self.csv_writer(trainer)
            if isinstance(writer, DurableCSVWriter):
                writer.save()
                writer.sync()
                state["csv_rows"] = writer.rows_written
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first = dict(state_dict.get("first", {}))
        self.earlier_latest = dict(state_dict.get("latest", {}))
        self.earlier_wall_time = float(state_dict.get("wall_time_s", 0.0))
        self.csv_rows = state_dict.get("csv_rows")
        if state_dict.get("csv_step") is not None:
            # (a checkpoint of an earlier alignkit counted Lightning's logging steps: its rows are kept by that count)
            self.csv_step = int(state_dict["csv_step"])

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resumed_step = int(checkpoint["global_step"])
        if self.csv_step is None:  # a checkpoint of an earlier alignkit: Lightning's own count
            loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
            self.csv_step = int(loop.get("_batches_that_stepped", self.resumed_step - 1))

    def rows_to_keep(self, rows: list[dict[str, str]]) -> list[dict[str, str]]:
        """The rows of the old ``metrics.csv`` that the resumed checkpoint accounts for (see the class docstring)."""
        limit = self.csv_step if self.csv_step is not None else (self.resumed_step or 0) - 1
        if self.csv_rows is None:
            return [row for row in rows if (step := _step(row)) is not None and step <= limit]
        kept = rows[:self.csv_rows]
        for row in rows[self.csv_rows:]:
            step = _step(row)
            if step is None or step > limit:
                break
            kept.append(row)
        return kept

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if trainer.is_global_zero:
            resuming = f" (resuming after step {self.resumed_step - 1})" if self.resumed_step else ""
            print(f"alignkit: run directory {self.run_dir}{resuming}", file=sys.stderr, flush=True)
        if self.resumed_step is None or not trainer.is_global_zero:
            return
        writer = self.csv_writer(trainer)
        if writer is not None:
            fieldnames, rows = read_csv_file(self.run_dir / CSV_FILE)
            kept = self.rows_to_keep(rows)
            if isinstance(writer, DurableCSVWriter):
                writer.continue_file(fieldnames, kept)
            elif kept:  # a plain CSVLogger (it has deleted the file): written out with the resumed run's first rows
                writer.experiment.metrics[:0] = kept
        keep_completions(self.run_dir / COMPLETIONS_FILE, self.resumed_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.first:
            self.first = scalars(trainer.callback_metrics)
        if last_training_batch(trainer):
            # Lightning writes a batch's metrics (after this hook) when its logging step is a multiple of
            # log_every_n_steps: the last step reaches metrics.csv and wandb whatever the run's length (the attribute
            # is set on the trainer by Lightning's logger connector; Trainer does not declare it)
            self.log_every_n_steps = getattr(trainer, "log_every_n_steps")
            setattr(trainer, "log_every_n_steps", 1)
        for logger in trainer.loggers:  # a step is done: the run is worth a wandb run (started once)
            if isinstance(logger, RunWandbLogger):
                logger.start()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_every_n_steps is not None:
            setattr(trainer, "log_every_n_steps", self.log_every_n_steps)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        weights = full_state_dict(pl_module)  # every rank: gathering sharded weights is a collective
        if trainer.is_global_zero:
            atomic_save_model(pl_module, self.run_dir / MODEL_DIR, weights)
            # Metrics logged before a resume and not since (e.g. the last validation) count as in one run.
            final = {**self.earlier_latest, **scalars(trainer.callback_metrics)}
            data = getattr(trainer, "datamodule", None)
            atomic_write_json(self.run_dir / METRICS_FILE, {
                "recipe": self.recipe,
                "algorithm": type(pl_module.algorithm).__name__,
                "global_step": trainer.global_step,
                "wall_time_s": round(self.earlier_wall_time + time.perf_counter() - self.started, 2),
                "first": self.first,
                "final": final,
                "data": data.state_dict() if data is not None else {},
                "model": str(self.run_dir / MODEL_DIR),
            })
            print(run_summary(self.run_dir, trainer.global_step, self.earlier_wall_time + time.perf_counter()
                              - self.started, final), file=sys.stderr, flush=True)
        trainer.strategy.barrier("alignkit-export")


#: The metrics a run's one-line summary shows when it logged them, in this order.
SUMMARY_METRICS = ("train/loss", "val/loss", "objective/scores", "objective/kl", "eval/gold_reward", "eval/kl")


def run_summary(run_dir: Path, steps: int, wall_time_s: float, final: dict[str, float]) -> str:
    """The line ``alignkit fit`` ends with: where the run went, how long it took and how it ended."""
    shown = [f"{key} {final[key]:.4g}" for key in SUMMARY_METRICS if isinstance(final.get(key), (int, float))]
    return (f"alignkit: finished {run_dir}: {steps} step{'' if steps == 1 else 's'} in {wall_time_s:.1f} s"
            + (f"; {', '.join(shown)}" if shown else "") + f" (model in {run_dir / MODEL_DIR}, metrics in "
            f"{run_dir / METRICS_FILE})")


def keep_completions(path: Path, step: int) -> None:
    """Drop the samples recorded after optimiser step ``step`` from ``completions.jsonl``, and a last line cut
    short by a killed process (an atomic rewrite)."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # a partial write by a killed process (after its last checkpoint)
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue  # damaged by a killed write
        if record.get("step", step + 1) <= step:
            kept.append(line)
    if "".join(kept) != text:
        atomic_write_text(path, "".join(kept))
