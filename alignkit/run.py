"""The run directory: resolved config, checkpoints, the final HF model and a ``metrics.json`` summary.

Writes are atomic: the model and the summary are written under a temporary name and renamed into
place, so a killed run never leaves a half-written model where a finished one is expected.
"""

from __future__ import annotations

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

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"


class RunExistsError(FileExistsError):
    """The chosen run directory already holds a finished run."""


def default_run_dir(recipe: str | None) -> Path:
    stem = Path(recipe).stem if recipe else "run"
    return Path("runs") / stem / datetime.now().strftime("%Y%m%d-%H%M%S")


def check_fresh(run_dir: Path) -> None:
    """Refuse a run directory that holds a finished run: its model, or its ``metrics.json`` (the last file
    every command writes, e.g. ``collect``, which writes no model)."""
    for name, what in ((MODEL_DIR, "a finished model"), (METRICS_FILE, "a finished run")):
        if (run_dir / name).exists():
            raise RunExistsError(f"run directory {run_dir} already holds {what} ({name}); choose another --run_dir "
                                 f"(nothing was overwritten)")


def to_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.detach().float()
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2, sort_keys=True)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def atomic_save_model(module, target: Path) -> None:
    """``module.export`` into a temporary sibling folder, then swap it into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        module.export(str(tmp))
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
    """Exports the final model and writes ``metrics.json`` when fitting ends normally."""

    def __init__(self, run_dir: str | Path, recipe: str | None = None):
        self.run_dir, self.recipe = Path(run_dir), recipe
        self.started = 0.0
        self.first: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.first:
            self.first = {k: v for k, v in ((k, to_float(v)) for k, v in trainer.callback_metrics.items()) if v is not None}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        if trainer.is_global_zero:
            atomic_save_model(pl_module, self.run_dir / MODEL_DIR)
            final = {k: v for k, v in ((k, to_float(v)) for k, v in trainer.callback_metrics.items()) if v is not None}
            data = getattr(trainer, "datamodule", None)
            atomic_write_json(self.run_dir / METRICS_FILE, {
                "recipe": self.recipe,
                "algorithm": type(pl_module.algorithm).__name__,
                "global_step": trainer.global_step,
                "wall_time_s": round(time.perf_counter() - self.started, 2),
                "first": self.first,
                "final": final,
                "data": data.state_dict() if data is not None else {},
                "model": str(self.run_dir / MODEL_DIR),
            })
        trainer.strategy.barrier("alignkit-export")
