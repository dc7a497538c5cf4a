"""The training progress bar (alignkit.progress): the step out of max_steps, the loss or the reward and KL, and no
``Epoch 0/-2`` for online recipes (max_epochs -1)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from alignkit.progress import AlignProgressBar


def bar_on(**trainer) -> AlignProgressBar:
    bar = AlignProgressBar()
    bar._trainer = SimpleNamespace(**trainer)
    return bar


def test_online_run_shows_step_reward_and_kl_and_no_negative_epoch_count():
    trainer = dict(max_epochs=-1, max_steps=160, global_step=8, progress_bar_metrics={}, loggers=[],
                   callback_metrics={"train/loss": torch.tensor(0.0356), "objective/scores": torch.tensor(-0.33125),
                                     "objective/kl": torch.tensor(0.0897), "policy/clipfrac": torch.tensor(0.1)})
    bar = bar_on(**trainer)
    assert bar._get_train_description(0).strip() == "Epoch 0"  # Lightning's reads "Epoch 0/-2"
    assert bar.get_metrics(bar.trainer, None) == {"step": "8/160", "loss": 0.0356, "reward": -0.3313, "kl": 0.0897}


def test_offline_run_shows_the_loss_and_lightnings_epoch_count():
    bar = bar_on(max_epochs=4, max_steps=-1, global_step=3, progress_bar_metrics={"val/acc": 0.5}, loggers=[],
                 callback_metrics={"train/loss": torch.tensor(1.5)})
    assert bar._get_train_description(1).strip() == "Epoch 1/3"
    assert bar.get_metrics(bar.trainer, None) == {"loss": 1.5, "val/acc": 0.5}
