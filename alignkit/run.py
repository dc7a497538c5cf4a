"""The run directory: resolved config, checkpoints, the final HF model and a ``metrics.json`` summary.

Writes are atomic: the model and the summary are written under a temporary name and renamed into
place, so a killed run never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from alignkit.checkpoint import recover_folder
from alignkit.defaults import full_state_dict

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
COMPLETIONS_FILE = "completions.jsonl"
CSV_FILE = "metrics.csv"


class RunExistsError(FileExistsError):
    """The chosen run directory already holds a finished run."""


class NothingToResumeError(FileNotFoundError):
    """``--resume`` was asked for a run directory without a checkpoint."""


def default_run_dir(recipe: str | None) -> Path:
    stem = Path(recipe).stem if recipe else "run"
    return Path("runs") / stem / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_fresh(run_dir: Path, resuming: bool = False) -> None:
    """Refuse a run directory that holds a finished run: its model, or its ``metrics.json`` (the last file
    every command writes, e.g. ``collect``, which writes no model)."""
    for name, what in ((MODEL_DIR, "a finished model"), (METRICS_FILE, "a finished run")):
        if (run_dir / name).exists():
            advice = "there is nothing to resume" if resuming else "choose another --run_dir (nothing was overwritten)"
            raise RunExistsError(f"run directory {run_dir} already holds {what} ({name}); {advice}")


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from: ``<run_dir>/checkpoints/last.ckpt`` of an unfinished run."""
    check_fresh(run_dir, resuming=True)
    path = run_dir / LAST_CHECKPOINT
    recover_folder(path)  # a folder checkpoint (DeepSpeed, sharded FSDP) killed mid-swap
    if not path.exists():
        raise NothingToResumeError(f"cannot resume {run_dir}: there is no {LAST_CHECKPOINT} in it (give the --run_dir "
                                   f"of a run that wrote a checkpoint before it stopped)")
    return path


def to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar entries of a metrics dict, as floats."""
    return {k: v for k, v in ((k, to_float(v)) for k, v in metrics.items()) if v is not None}


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2, sort_keys=True)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_save_model(module, target: Path, state_dict: dict | None = None) -> None:
    """``module.export`` into a temporary sibling folder, then swap it into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        module.export(str(tmp), state_dict)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (is {run_dir} a finished alignkit run?)")
    return json.loads(path.read_text())


class RunDirectory(L.Callback):
    """Exports the final model and writes ``metrics.json`` when fitting ends normally.

    Its state (the first step's metrics, the latest ones and the wall time so far) travels in checkpoints, so a
    resumed run's ``metrics.json`` reads as if the run had never stopped. A run resumed from a checkpoint at
    step K keeps the rows of ``metrics.csv`` (the CSV logger's file in the run directory) logged before K and
    the ``completions.jsonl`` samples recorded up to K, and drops those of the later steps, which the resumed
    run trains again (Lightning's CSV logger would otherwise start a new file).
    """

    def __init__(self, run_dir: str | Path, recipe: str | None = None):
        self.run_dir, self.recipe = Path(run_dir), recipe
        self.started = 0.0
        self.earlier_wall_time = 0.0  # of the processes before a resume
        self.first: dict[str, float] = {}
        self.earlier_latest: dict[str, float] = {}  # latest metrics at the checkpoint a run resumed from
        self.resumed_step: int | None = None
        self.trainer: L.Trainer | None = None
        # Read before the trainer exists: Lightning's CSV logger deletes metrics.csv when it opens the folder.
        self.csv_rows = read_csv_rows(self.run_dir / CSV_FILE)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        latest = scalars(self.trainer.callback_metrics) if self.trainer is not None else {}
        return {"first": self.first, "latest": latest,
                "wall_time_s": self.earlier_wall_time + time.perf_counter() - self.started}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first = dict(state_dict.get("first", {}))
        self.earlier_latest = dict(state_dict.get("latest", {}))
        self.earlier_wall_time = float(state_dict.get("wall_time_s", 0.0))

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resumed_step = int(checkpoint["global_step"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()
        if self.resumed_step is None or not trainer.is_global_zero:
            return
        kept = [row for row in self.csv_rows if row.get("step") and int(float(row["step"])) < self.resumed_step]
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger) and Path(logger.log_dir) == self.run_dir and kept:
                logger.experiment.metrics[:0] = kept  # written out with the resumed run's first rows
        keep_completions(self.run_dir / COMPLETIONS_FILE, self.resumed_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.first:
            self.first = scalars(trainer.callback_metrics)

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
        trainer.strategy.barrier("alignkit-export")


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file (none if it does not exist)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def keep_completions(path: Path, step: int) -> None:
    """Drop the samples recorded after optimiser step ``step`` from ``completions.jsonl`` (atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) == len(lines):
        return
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.writelines(kept)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
