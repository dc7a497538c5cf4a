"""A few sampled completions of every online step, for reading what the policy writes: appended to
``completions.jsonl`` in the run directory (``trainer.default_root_dir``) and to a wandb table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

#: rows of the wandb table kept (the newest): the table is logged whole at every step
TABLE_ROWS = 2000


class Completions(L.Callback):
    """Records ``per_step`` ``{step, prompt, response, score}`` rows of each online training batch (rank 0 only).

    The host (``AlignModule``, which adds this callback itself through ``configure_callbacks``) leaves each online
    batch's rollout and combined scores in ``pl_module.sampled``; at the end of the batch they are taken from
    there, so nothing is kept past the batch. ``step`` is the optimiser step count after the batch's update. The
    wandb table is logged whole each time, so every step's rows stay visible (never overwritten). A resumed run
    drops the rows after its checkpoint first (``alignkit.run.keep_completions``)."""

    def __init__(self, per_step: int = 4):
        self.per_step = per_step
        self.rows: list[list[Any]] = []  # every row so far, for the wandb table

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        sampled = getattr(pl_module, "sampled", None)
        # Taken: nothing is kept past the batch. (By name: `nn.Module` types its attributes as tensors or modules.)
        setattr(pl_module, "sampled", None)
        if sampled is None:
            return
        rollout, scores = sampled
        n = min(self.per_step, len(rollout.prompts))
        if n == 0 or not trainer.is_global_zero:
            return
        step = trainer.global_step
        rows = [[step, rollout.prompts[i], rollout.responses[i], float(scores[i])] for i in range(n)]
        self.rows.extend(rows)
        path = Path(trainer.default_root_dir) / "completions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for step, prompt, response, score in rows:
                f.write(json.dumps({"step": step, "prompt": prompt, "response": response, "score": score}) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("completions", columns=["step", "prompt", "response", "score"],
                                 data=self.rows[-TABLE_ROWS:], step=step)
