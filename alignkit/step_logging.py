"""Which training steps log: :class:`StepLogging` is a mixin of :class:`alignkit.module.AlignModule`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L

if TYPE_CHECKING:
    # The mixin is combined with `LightningModule` in `AlignModule`: type checkers see that base, run time does not.
    from lightning import LightningModule as _LightningModule
else:
    _LightningModule = object


def last_training_batch(trainer: L.Trainer, stepped: bool = True) -> bool:
    """Whether the batch being trained is the run's last: its optimiser step reaches ``max_steps``, or it is the last
    batch of the last epoch. ``stepped``: the optimiser already stepped for this batch."""
    if 0 < trainer.max_steps <= trainer.global_step + (0 if stepped else 1):
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
    return trainer.is_last_batch and trainer.current_epoch + 1 >= max_epochs


class StepLogging(_LightningModule):
    """Logging decisions and logging of loss statistics, for a ``LightningModule`` with ``world_size`` and a
    ``_logged_a_step`` flag (False until this process logged a training step)."""

    # Provided by the host (`AlignModule`) and its other mixins: declared here for type checkers only.
    _logged_a_step: bool
    if TYPE_CHECKING:
        @property
        def world_size(self) -> int: ...

    def should_log(self, stepped: bool) -> bool:
        """Whether this training step's metrics reach the loggers. Lightning writes ``on_step`` metrics every
        ``trainer.log_every_n_steps`` batches, but every ``self.log`` pays its bookkeeping on every step, so
        the other steps skip logging (and building the metrics). The first and the last step always log, so
        ``metrics.json``'s ``first``/``final`` are exact. ``stepped``: the optimiser already stepped for this
        batch (online steps log after their update)."""
        trainer = self._trainer
        if trainer is None or not self._logged_a_step or self._lightning_writes_logs(trainer):
            self._logged_a_step = True
            return True
        return last_training_batch(trainer, stepped)

    def _lightning_writes_logs(self, trainer: L.Trainer) -> bool:
        """Whether Lightning writes this training batch's ``on_step`` metrics: when its logging step (the batches
        that stepped the optimiser before this one, plus one) is a multiple of ``log_every_n_steps``, or the
        trainer stops. Before this batch's step, the batches that stepped are ``global_step`` under automatic
        optimisation (one optimiser step per batch that steps); an online batch steps several times, so there
        they are the batches completed (online algorithms accumulate no batches)."""
        # Set on the trainer by Lightning's logger connector; `Trainer` does not declare it.
        every: int = getattr(trainer, "log_every_n_steps")
        if every == 0:
            return False
        if self.automatic_optimization:
            stepped = trainer.global_step
        else:
            stepped = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        return (stepped + 1) % every == 0 or trainer.should_stop

    def log_stats(self, stats: dict[str, Any], prefix: str, batch: Any, extra: dict[str, Any], on_epoch: bool = False):
        size = getattr(batch, "num_pairs", None) or len(getattr(batch, "input_ids", [0]))
        values = {**extra, **{prefix + k: v for k, v in stats.items()}}
        self.log_dict(values, on_step=not on_epoch, on_epoch=on_epoch,
                      batch_size=size, prog_bar=False, sync_dist=on_epoch or self.world_size > 1)

