"""Stopping on request: SIGTERM or SIGUSR1 (what SLURM, Kubernetes and most schedulers send before they pre-empt
a job) make a run write a checkpoint at the end of the current training batch and exit with
:data:`PREEMPTED_EXIT_CODE`, so that ``alignkit fit ... && next-step`` does not carry on and a scheduler can
requeue the job, which continues with ``--resume true``.

:class:`StopOnSignal` is a Lightning callback. It installs its handlers when training starts, replacing
Lightning's own SIGTERM handler (which ends the fit with exit code 0 and no checkpoint), and restores the previous
ones when training ends. A handler only records the signal; at the end of each training batch every rank agrees
whether one arrived anywhere (``strategy.reduce_boolean_decision``), :class:`alignkit.checkpoint.LastCheckpoint`
saves, and the next batch does not start: :class:`Preempted` is raised there, after Lightning has logged the
finished batch. A signal while the run is still being set up has its usual effect (the process ends; there is
nothing new to save), except SIGTERM once Lightning's handler is in place, which stops the run before its first
batch with :data:`PREEMPTED_EXIT_CODE`; a signal during the last batch lets the run finish normally.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The exit code of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint: ``EX_TEMPFAIL`` of
#: ``sysexits.h`` ("try again later"). ``alignkit pipeline`` stops at that stage with the same code.
PREEMPTED_EXIT_CODE = 75

#: The signals that stop a run at the next step boundary.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


#: The stop signal this process received outside a run's training (a study's worker before or between its cells,
#: or a run it stopped): a run that starts afterwards stops at its start. See :func:`remember_stop_signals`.
_NOTED: list[str] = []


def note_stop(name: str) -> None:
    """Remember that this process was asked to stop (by the signal ``name``)."""
    if not _NOTED:
        _NOTED.append(name)


def stop_noted() -> str | None:
    """The signal that asked this process to stop (:func:`note_stop`), or None."""
    return _NOTED[0] if _NOTED else None


def clear_stop() -> None:
    """Forget a noted stop (a study that ran its cells in this process is over)."""
    _NOTED.clear()


def remember_stop_signals(forward: Callable[[int], None] | None = None) -> dict[int, Any]:
    """Make SIGTERM and SIGUSR1 stop this process's runs instead of ending the process: the handler notes the
    signal (:func:`note_stop`), so a run that starts later stops at its start, and calls ``forward(signum)``; a run
    training meanwhile has :class:`StopOnSignal`'s handlers in place. Returns the handlers it replaced (for
    :func:`restore_handlers`); in a thread other than the main one it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handle(signum: int, frame: Any) -> None:
        note_stop(signal.Signals(signum).name)
        if forward is not None:
            forward(signum)

    previous = {}
    for name in STOP_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handle)
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the signal handlers :func:`remember_stop_signals` replaced."""
    for number, handler in previous.items():
        signal.signal(number, handler if handler is not None else signal.SIG_DFL)


class Preempted(SIGTERMException):
    """A run stopped on SIGTERM/SIGUSR1 (a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE`)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint

    def message(self) -> str:
        saved = (f"checkpoint {self.checkpoint} written; continue the run with --resume true" if self.checkpoint
                 else "no new checkpoint (no step since the last one, or checkpointing is off); continue the run "
                      "with --resume true if it has a checkpoint")
        return f"stopped by {self.signal_name} at step {self.step}: {saved} (exit code {PREEMPTED_EXIT_CODE})"


class StopOnSignal(L.Callback):
    """On SIGTERM or SIGUSR1: checkpoint at the end of the current training batch, then raise :class:`Preempted`
    (see the module docstring)."""

    def __init__(self) -> None:
        self.received: str | None = None
        """The name of the first stop signal received (None: none)."""
        self.stopping = False
        self._previous: dict[int, Any] = {}
        self._decision: tuple[int, bool] | None = None

    # ------------------------------------------------------------------------------------------ handlers
    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            try:
                print(f"alignkit: {name} received: stopping after the current step with a checkpoint",
                      file=sys.stderr, flush=True)
            except RuntimeError:  # stderr busy in the interrupted frame (reentrant call)
                pass

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is None:  # Windows has no SIGUSR1
                continue
            current = signal.getsignal(number)
            if current != self._handle:
                self._previous.setdefault(number, current)
                signal.signal(number, self._handle)

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # ------------------------------------------------------------------------------------------ decisions
    def stop_now(self, trainer: L.Trainer) -> bool:
        """Whether any rank received a stop signal; decided once per training batch (every rank must ask)."""
        batch = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        if self._decision is None or self._decision[0] != batch:
            self._decision = (batch, bool(trainer.strategy.reduce_boolean_decision(self.received is not None,
                                                                                   all=False)))
        return self._decision[1]

    def _preempted(self, trainer: L.Trainer) -> Preempted:
        checkpoint = None
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "_last_global_step_saved", None) == trainer.global_step:
            checkpoint = getattr(callback, "_last_checkpoint_saved", None) or None
        return Preempted(self.received or "a stop signal", trainer.global_step, checkpoint)

    # ------------------------------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has registered its handlers (and noted the ones it restores at teardown).
        self._install()
        if getattr(trainer, "received_sigterm", False) and self.received is None:  # Lightning's, during start-up
            self.received = "SIGTERM"
        if self.received is None and stop_noted():  # e.g. a study's worker, signalled before this run began
            self.received = stop_noted()
        if self.stop_now(trainer):  # signalled during start-up: nothing new to save
            raise self._preempted(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.stopping:
            raise self._preempted(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.stop_now(trainer):
            self.stopping = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()  # Lightning's handlers, which its teardown replaces by those it found

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether the trainer's :class:`StopOnSignal` decided to stop at the end of this training batch."""
    # Lightning's callback connector sets Trainer.callbacks (a list of Callback) without declaring it on the class
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, StopOnSignal):
            return callback.stop_now(trainer)
    return False
