"""The training progress bar: Lightning's rich bar, showing what tells whether a run goes well."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

#: What the bar shows, label -> the metric it reads (when logged): the training loss, and for online algorithms the
#: combined reward of the rollouts and the KL to the reference (``alignkit.scoring``, the algorithms' stats).
SHOWN = {"loss": "train/loss", "reward": "objective/scores", "kl": "objective/kl"}


class AlignProgressBar(RichProgressBar):
    """Lightning's :class:`RichProgressBar` with the optimiser step out of ``max_steps`` (what an online algorithm's
    bar of rollout batches does not tell), the metrics of :data:`SHOWN` whether or not they were logged with
    ``prog_bar=True``, and no ``Epoch 0/-2`` when ``max_epochs`` is unlimited (``-1``: online recipes stop at
    ``max_steps``). The metrics are the latest logged (every ``trainer.log_every_n_steps``)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's version: always "" in a run directory
        shown: dict[str, Any] = {}
        if trainer.max_steps > 0:
            shown["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        for label, key in SHOWN.items():
            value = trainer.callback_metrics.get(key)
            if value is not None:
                shown[label] = round(float(value), 4)
        return {**shown, **items}

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs in (None, -1):  # Lightning's own reads "Epoch 0/-2" then
            return f"Epoch {current_epoch}".ljust(len(self.validation_description))
        return super()._get_train_description(current_epoch)


__all__ = ["SHOWN", "AlignProgressBar"]
