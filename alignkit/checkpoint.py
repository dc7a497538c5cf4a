"""Durable checkpoints: atomic writes with a checksum beside each file, the last N kept, a step-based
``last.ckpt`` and the random-number-generator states a resumed run needs to draw the same numbers as an
uninterrupted one.

A checkpoint is written to a temporary file in the target's folder, flushed to disk and renamed over the
target, so a run killed while writing (even with SIGKILL) leaves the previous checkpoints intact; its SHA-256
is written beside it (``step=6.ckpt.sha256``, the format of ``sha256sum``), so a file damaged later is recognised
before a run resumes from it (:func:`verify_checkpoint`). Strategies that write a folder of shards (DeepSpeed,
sharded FSDP/FSDP2 checkpoints) write it as ``.<name>.writing`` and swap it in once every rank has finished
(:func:`swap_in_folder`).

A write that fails (disk full, no permission) raises :class:`WriteFailed`: one line naming the file, after the
temporary file is removed, so nothing written before is damaged.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, cast

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from alignkit.errors import WriteFailed  # noqa: F401  (imported from here by the CLI)

# the generic write helpers live in alignkit.io; imported here too for the code that imports them from here
from alignkit.io import (  # noqa: F401
    WRITE_ERRNOS,
    as_write_failed,
    atomic_write_bytes,
    fsync_dir,
    temporary_name,
    write_errno,
)

try:
    import numpy as np
except ImportError:  # numpy is optional: its generator is saved only when it is installed
    np = None  # type: ignore[assignment]  # (a module or None; every use checks `np is not None`)


#: The exit code of a run stopped by a write that failed (``EX_IOERR`` of ``sysexits.h``).
WRITE_FAILED_EXIT_CODE = 74


class _HashingWriter:
    """A binary file that hashes what goes through it (``torch.save`` writes a buffer with ``write`` and
    ``flush`` only)."""

    def __init__(self, file):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def checksum_path(path: str | Path) -> Path:
    """``<checkpoint>.sha256``: the checksum written beside a checkpoint file."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _discard_and_reraise(tmp: Path, target: Path, exc: BaseException) -> NoReturn:
    """A write of ``target`` through ``tmp`` failed: remove ``tmp`` and raise ``exc`` (as :class:`WriteFailed` when
    the disk is full or not writable)."""
    tmp.unlink(missing_ok=True)
    failed = as_write_failed(target, exc)
    if failed is exc:
        raise exc
    raise failed from exc


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into ``.<name>.<random>.tmp`` next to the target, ``fsync``, then ``os.replace``, then the
    file's SHA-256 into ``<name>.sha256`` (the old checksum is removed before the rename, so a checksum never
    describes another file's content; a checkpoint without one is checked by its zip records' CRCs). The temporary
    files of an earlier killed write are removed first. A write that fails leaves the previous files as they
    were and raises :class:`WriteFailed` when the disk is full or the folder not writable.

    While :attr:`staging` is set, a written file stays under its temporary name and removals wait: :meth:`commit`
    renames the files into place, then makes the links queued with :meth:`defer_link`, then removes; :meth:`discard`
    drops them instead (:class:`LastCheckpoint` publishes a checkpoint only once its step's metrics are logged).

    Remote paths (``scheme://...``) keep Lightning's own writer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.staging = False
        self._writes: list[tuple[Path, Path, str]] = []  # (temporary file, target, sha256)
        self._links: list[tuple[Path, Path]] = []
        self._removals: list[str] = []

    @property
    def pending(self) -> bool:
        return bool(self._writes or self._links or self._removals)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        tmp = temporary_name(target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = {t for t, _, _ in self._writes}
            for stale in target.parent.glob(".*.ckpt*.tmp"):  # left by a run killed while writing
                if stale not in staged:
                    stale.unlink(missing_ok=True)
            with open(tmp, "xb") as f:  # unlike mkstemp, the file gets the usual permissions (umask)
                writer = _HashingWriter(f)
                torch.save(checkpoint, cast(BinaryIO, writer))  # a file as far as torch.save goes (write, flush)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as exc:
            _discard_and_reraise(tmp, target, exc)
        if self.staging:
            self._writes.append((tmp, target, writer.sha256.hexdigest()))
        else:
            self._publish(tmp, target, writer.sha256.hexdigest())

    @staticmethod
    def _publish(tmp: Path, target: Path, digest: str) -> None:
        try:
            checksum_path(target).unlink(missing_ok=True)
            os.replace(tmp, target)
            fsync_dir(target.parent)
            atomic_write_bytes(checksum_path(target), f"{digest}  {target.name}\n".encode())
        except BaseException as exc:
            _discard_and_reraise(tmp, target, exc)
        fsync_dir(target.parent)

    def remove_checkpoint(self, path) -> None:
        if self.staging:
            self._removals.append(str(path))
            return
        super().remove_checkpoint(path)
        if "://" not in str(path):
            checksum_path(path).unlink(missing_ok=True)

    def defer_link(self, target: Path, link: Path) -> None:
        self._links.append((target, link))

    def commit(self) -> None:
        """Publish what was staged: the files, then the links, then the removals."""
        writes, links, removals = self._writes, self._links, self._removals
        self._writes, self._links, self._removals = [], [], []
        try:
            for tmp, target, digest in writes:
                self._publish(tmp, target, digest)
        except BaseException:
            for tmp, _, _ in writes:
                tmp.unlink(missing_ok=True)
            raise
        for target, link in links:
            link_atomically(target, link)
        for path in removals:
            self.remove_checkpoint(path)

    def discard(self) -> None:
        """Drop what was staged (the temporary files are removed)."""
        for tmp, _, _ in self._writes:
            tmp.unlink(missing_ok=True)
        self._writes, self._links, self._removals = [], [], []


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint ``path`` cannot be resumed from, in a few words; None when it can. A file is checked
    against the SHA-256 written beside it or, without one, by the CRC of every record of its zip archive; a
    folder checkpoint (DeepSpeed, sharded FSDP) only for being there and not empty."""
    path = Path(path)
    try:
        if path.is_dir():
            return None if any(path.iterdir()) else "an empty folder"
        size = path.stat().st_size
        if size == 0:
            return "an empty file (0 bytes)"
        expected = checksum_path(path)
        if expected.is_file():
            want = (expected.read_text().split() or [""])[0]
            got = file_sha256(path)
            if got == want:
                return None
            with zipfile.ZipFile(path):  # a cut file says so (BadZipFile below); any other change, the checksum
                pass
            return f"its SHA-256 {got[:12]}... is not the {want[:12]}... written beside it"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"record {bad} fails its CRC check"
    except FileNotFoundError:
        return "it is missing"
    except (zipfile.BadZipFile, EOFError, ValueError):
        return "not a complete checkpoint file (truncated or overwritten)"
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"


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


def link_atomically(target: Path, link: Path) -> None:
    """Make ``link`` a relative symbolic link to ``target`` (a copy where links are not allowed), replacing what
    was there in one rename."""
    for stale in link.parent.glob(f".{link.name}.*.link"):  # left by a run killed while linking
        stale.unlink(missing_ok=True)
    staging = temporary_name(link, "link")
    try:
        try:
            os.symlink(os.path.relpath(target, link.parent), staging)
        except OSError:  # e.g. Windows without the privilege
            if target.is_dir():
                shutil.copytree(target, staging)
            else:
                shutil.copy2(target, staging)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # a folder checkpoint of an earlier version of alignkit
        os.replace(staging, link)
    except BaseException as exc:
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
        failed = as_write_failed(link, exc)
        if failed is exc:
            raise
        raise failed from exc
    fsync_dir(link.parent)


def recover_folder(target: Path) -> None:
    """Put back the previous folder checkpoint when a run was killed between the two renames of
    :func:`swap_in_folder` (``target`` missing, ``.<name>.old`` present)."""
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.is_dir():
        os.replace(old, target)


#: File names of the kept checkpoints: ``step=<optimiser step>.ckpt``.
CHECKPOINT_NAME = "step={step}"
LAST_NAME = "last.ckpt"


class LastCheckpoint(ModelCheckpoint):
    """Writes ``checkpoints/step=<N>.ckpt`` at the end of each epoch or, with ``every``, whenever the optimiser
    step count passes a multiple of ``every`` (unlike ``every_n_train_steps``, which saves only when the count
    *is* a multiple, this also fires for online algorithms, whose one training batch makes several optimiser
    steps), keeps the newest ``keep`` of them (Lightning's top-k on ``step``, mode ``max``) and points the symbolic
    link ``last.ckpt`` at the newest (swapped in atomically; a copy where links are not allowed).

    Saves happen only at the end of a training batch, where Lightning resumes exactly: a save due at a batch
    that Lightning validates after moves to the next batch (a run resumed from a checkpoint written between
    a batch and its validation would skip that validation), and there are no saves at an epoch's end hooks
    (Lightning resumes those with one extra batch, or with its logging step one too high). A save still
    pending when training ends is made then. When :class:`alignkit.signals.StopOnSignal` has caught SIGTERM or
    SIGUSR1, the end of the current training batch saves at once (the validation that may follow is then not
    repeated by the resumed run).

    Lightning logs a batch's metrics after this hook, so a checkpoint is written staged (fsynced under its temporary
    name, see :class:`AtomicCheckpointIO`) and published (renamed into place, linked, the oldest removed) when the
    next batch begins, training ends, or the run stops after that batch: a run killed in between resumes from the
    previous checkpoint, and its ``metrics.csv`` never lacks the rows of the checkpoint's own batch.
    """

    def __init__(self, dirpath: str | Path, every: int | None = None, keep: int = 2):
        if every is not None and every < 1:
            raise ValueError(f"--checkpoint_every must be >= 1, got {every}")
        if keep < 1:
            raise ValueError(f"--keep_checkpoints must be >= 1, got {keep}")
        # the trigger: every `every` training steps, else every epoch (None: ModelCheckpoint's default, off)
        super().__init__(dirpath=dirpath, filename=CHECKPOINT_NAME, auto_insert_metric_name=False, monitor="step",
                         mode="max", save_top_k=keep, save_last="link", enable_version_counter=False,
                         every_n_train_steps=every if every else None, every_n_epochs=None if every else 1)
        self.every, self.keep = every, keep
        self.deferred = False
        self._staged_at: int | None = None  # batches begun when the staged checkpoint was saved

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_global_step_saved = trainer.global_step  # a resumed run counts from its checkpoint

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.commit(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.commit(trainer)  # (or discard it: see commit)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        from alignkit.signals import stop_requested

        if stop_requested(trainer):
            self.save(trainer)
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
        self.commit(trainer, logged=True)
        if self.deferred or not self._last_checkpoint_saved:
            self.save(trainer)
            self.commit(trainer, logged=True)

    def _staging_io(self, trainer) -> AtomicCheckpointIO | None:
        io = getattr(trainer.strategy, "checkpoint_io", None)
        return io if isinstance(io, AtomicCheckpointIO) and not writes_folder(trainer.strategy) else None

    def save(self, trainer) -> None:
        """Write the checkpoint (and its link, and the removal of the oldest) staged: Lightning logs the batch's
        metrics after this hook, and a checkpoint visible before that would resume without them. :meth:`commit`
        publishes it once they are logged."""
        self.deferred = False
        candidates = self._monitor_candidates(trainer)
        io = self._staging_io(trainer)
        if io is not None:
            io.staging = True
        try:
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        finally:
            if io is not None:
                io.staging = False
        if io is not None and io.pending:
            self._staged_at = trainer.fit_loop.epoch_loop.batch_progress.total.ready

    def commit(self, trainer, logged: bool = False) -> None:
        """Publish the staged checkpoint once Lightning has logged the batch it was saved at (``logged``, or a
        later batch has begun), else drop it: a run stopped in between resumes from the previous checkpoint."""
        io = self._staging_io(trainer)
        if io is None or not io.pending:
            return
        if not logged and trainer.fit_loop.epoch_loop.batch_progress.total.ready <= (self._staged_at or 0):
            io.discard()
            return
        for logger in trainer.loggers:  # the rows this checkpoint accounts for are on disk first
            sync = getattr(getattr(logger, "_experiment", None), "sync", None)
            if callable(sync):
                logger.save()
                sync()
        io.commit()

    def _should_remove_checkpoint(self, trainer, previous: str, current: str) -> bool:
        """Older checkpoints in our folder go once ``keep`` newer ones exist, the one a run resumed from included
        (Lightning keeps that one forever)."""
        if previous == current or "://" in previous or Path(previous).name == LAST_NAME:
            return False
        assert self.dirpath is not None  # given to __init__
        return Path(self.dirpath).absolute() in Path(previous).absolute().parents

    def _link_checkpoint(self, trainer, filepath: str, linkpath: str) -> None:  # type: ignore[override]
        """Point ``linkpath`` at ``filepath`` with a relative symbolic link swapped in by ``os.replace`` (a kill never
        leaves the folder without a ``last.ckpt``); staged with the checkpoint while it is."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            io = self._staging_io(trainer)
            if io is not None and io.staging:
                io.defer_link(Path(filepath), Path(linkpath))
            else:
                link_atomically(Path(filepath), Path(linkpath))
        trainer.strategy.barrier()

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
