"""Durable checkpoints: atomic writes, a step-based ``last.ckpt`` and the random-number-generator states a
resumed run needs to draw the same numbers as an uninterrupted one.

A checkpoint is written to a temporary file in the target's folder, flushed to disk and renamed over the
target, so a run killed while writing (even with SIGKILL) leaves the previous checkpoint intact. Strategies that
write a folder of shards (DeepSpeed, sharded FSDP/FSDP2 checkpoints) write it as ``.last.ckpt.writing`` and
swap it in once every rank has finished (:func:`swap_in_folder`).
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

try:
    import numpy as np
except ImportError:  # numpy is optional: its generator is saved only when it is installed
    np = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.<random>.tmp`` next to the target, ``fsync``, then ``os.replace``; the
    temporary files of an earlier killed write are removed first.

    Remote paths (``scheme://...``) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a run killed while writing
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "xb") as f:  # unlike mkstemp, the file gets the usual permissions (umask)
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)


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


def writes_folder(strategy) -> bool:
    """Whether ``strategy`` saves a checkpoint as a folder of per-rank shards rather than through a checkpoint IO
    plugin (which :class:`AtomicCheckpointIO` makes atomic)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    return (isinstance(strategy, DeepSpeedStrategy)
            or (isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint)
            or (isinstance(strategy, FSDPStrategy) and strategy._state_dict_type == "sharded"))


def swap_in_folder(new: Path, target: Path) -> None:
    """Replace the folder ``target`` by the complete folder ``new``: the old one is renamed to ``.<name>.old``
    first and removed last, so a kill at any point leaves a whole checkpoint under one of the two names
    (:func:`recover_folder` puts ``.old`` back)."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """Put back the previous folder checkpoint when a run was killed between the two renames of
    :func:`swap_in_folder` (``target`` missing, ``.<name>.old`` present)."""
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)


class LastCheckpoint(ModelCheckpoint):
    """Writes ``checkpoints/last.ckpt`` (only that file) at the end of each epoch or, with ``every``, whenever
    the optimiser step count passes a multiple of ``every`` (unlike ``every_n_train_steps``, which saves
    only when the count *is* a multiple, this also fires for online algorithms, whose one training batch
    makes several optimiser steps). A resumed run overwrites the file.

    Saves happen only at the end of a training batch, where Lightning resumes exactly: a save due at a batch
    that Lightning validates after moves to the next batch (a run resumed from a checkpoint written between
    a batch and its validation would skip that validation), and there are no saves at an epoch's end hooks
    (Lightning resumes those with one extra batch, or with its logging step one too high). A save still
    pending when training ends is made then.
    """

    def __init__(self, dirpath: str | Path, every: int | None = None):
        if every is not None and every < 1:
            raise ValueError(f"--checkpoint_every must be >= 1, got {every}")
        triggers = {"every_n_train_steps": every} if every else {"every_n_epochs": 1}
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False, **triggers)
        self.every = every
        self.deferred = False

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # a resumed run counts from its checkpoint

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        if self.every is None:
            due = self.deferred or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        else:
            due = trainer.global_step // self.every > self._last_global_step_saved // self.every
        if not due:
            return
        if validation_follows(trainer) and not self.deferred:  # at most once: epochs of one batch still save
            self.deferred = True
            return
        self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """No saves here (see the class docstring)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        """No saves here (see the class docstring)."""

    def on_train_end(self, trainer, pl_module) -> None:
        if self.deferred or not self._last_checkpoint_saved:
            self.save(trainer)

    def save(self, trainer) -> None:
        self.deferred = False
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """Folder checkpoints are written under a staging name by every rank, then swapped in by rank 0."""
        if not writes_folder(trainer.strategy):
            return super()._save_checkpoint(trainer, filepath)
        target = Path(filepath)
        staging = target.with_name(f".{target.name}.writing")
        if trainer.is_global_zero and staging.exists():  # left by a run killed while writing
            shutil.rmtree(staging)
        trainer.strategy.barrier()
        super()._save_checkpoint(trainer, str(staging))
        trainer.strategy.barrier()  # every rank's shards are on disk
        if trainer.is_global_zero:
            swap_in_folder(staging, target)
        trainer.strategy.barrier()
        self._last_checkpoint_saved = filepath


def validation_follows(trainer) -> bool:
    """Whether Lightning validates right after the current training batch (the batch-count rules of its
    training epoch loop; time-based validation intervals are not considered)."""
    loop = trainer.fit_loop.epoch_loop
    every_epochs = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or not sum(trainer.num_val_batches or [0]):
        return False
    if every_epochs is not None and (trainer.current_epoch + 1) % every_epochs:
        return False
    if trainer.should_stop or loop.batch_progress.is_last_batch:
        return True
    period = trainer.val_check_batch
    if not isinstance(period, int):
        return False
    return ((loop.total_batch_idx if every_epochs is None else loop.batch_idx) + 1) % period == 0


# ---------------------------------------------------------------------------------------------- RNG states

def rng_states(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The global generators (torch CPU and CUDA, numpy, python ``random``) and the given named ones, in
    plain types that ``torch.load(weights_only=True)`` accepts."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np is not None:
        numpy_state = np.random.get_state(legacy=False)
        state["numpy"] = {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"]),
                          "has_gauss": int(numpy_state["has_gauss"]), "gauss": float(numpy_state["gauss"])}
    return state


def set_rng_states(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_states` captured. Named generators missing on either side are left alone."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state and np is not None:
        saved = state["numpy"]
        np.random.set_state({"bit_generator": "MT19937",
                             "state": {"key": np.asarray(saved["key"], dtype=np.uint32), "pos": saved["pos"]},
                             "has_gauss": saved["has_gauss"], "gauss": saved["gauss"]})
    for name, generator_state in state.get("generators", {}).items():
        if name in generators:
            generators[name].set_state(generator_state)
