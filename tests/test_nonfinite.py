"""NaN/inf never silently corrupts the weights: a non-finite loss, reward or gradient at optimiser step k
stops the run with a message naming step k and the quantity, or, with ``model.skip_nonfinite``, skips the
batch, whose optimiser step then leaves the weights and AdamW's moments exactly as they were."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import QUIET, SFT_RECIPE, TINY_MODEL, run_cli

from alignkit.data.modules import PromptData, SFTData
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule, NonFiniteError, RewardCombination
from alignkit.plugin import Reward, RewardOutput, hookimpl
from alignkit.rollout import SamplingConfig
from alignkit.types import LossOutput
from alignkit_plugins.ppo import PPO
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
BAD_STEP = 2


def poisoned(module, loss: torch.Tensor, kind: str) -> torch.Tensor:
    """``loss`` made NaN (``kind="loss"``), or kept finite but with NaN gradients (``kind="gradient"``:
    d sqrt(u)/du is inf at u = 0, and inf · 0 = NaN)."""
    if kind == "loss":
        return loss * float("nan")
    first = next(p for p in module.policy.parameters() if p.requires_grad)
    return loss + torch.sqrt(first.sum() * 0.0)


class BadSFT(SFT):
    """SFT whose training loss is NaN, or whose gradients are NaN, at optimiser step ``step``."""

    def __init__(self, step: int = BAD_STEP, kind: str = "loss"):
        super().__init__()
        self.step, self.kind = step, kind

    @hookimpl
    def alignkit_loss(self, module, batch) -> LossOutput:
        out = super().alignkit_loss(module, batch)
        if module.trainer.training and module.global_step == self.step:
            return LossOutput(poisoned(module, out.loss, self.kind), out.stats)
        return out


class BadPPO(PPO):
    """PPO whose update loss has NaN gradients at optimiser step ``step``."""

    def __init__(self, step: int = BAD_STEP, **kwargs):
        super().__init__(**kwargs)
        self.step = step

    @hookimpl
    def alignkit_loss(self, module, batch) -> LossOutput:
        out = super().alignkit_loss(module, batch)
        if module.global_step == self.step:
            return LossOutput(poisoned(module, out.loss, "gradient"), out.stats)
        return out


class NaNReward(Reward):
    """Response length as reward, but NaN for one response of the ``bad_call``-th batch it scores."""

    def __init__(self, bad_call: int = BAD_STEP, name: str | None = None, weight: float = 1.0):
        super().__init__(name=name or "lengthy", weight=weight)
        self.bad_call, self.calls = bad_call, 0

    def score(self, prompts, responses, rollout=None) -> RewardOutput:
        scores = torch.tensor([float(len(r)) for r in responses])
        if self.calls == self.bad_call:
            scores[1] = float("nan")
        self.calls += 1
        return RewardOutput(self.reward_name, scores)


class AroundStep(L.Callback):
    """Copies of the trainable weights and of AdamW's state just before and just after the first batch that
    starts at optimiser step ``step``."""

    def __init__(self, step: int):
        self.step, self.batch_idx = step, None
        self.before: dict | None = None
        self.after: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.before is None:
            self.before, self.batch_idx = snapshot(pl_module), batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx and self.after is None:
            self.after = snapshot(pl_module)


def snapshot(module) -> dict:
    optimizer = module.trainer.optimizers[0]
    names = {p: n for n, p in module.named_parameters()}
    return {
        "weights": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
        "adam": {names[p]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"]), "weights changed"
    assert a["adam"].keys() == b["adam"].keys()
    for name, state in a["adam"].items():
        assert all(torch.equal(v, b["adam"][name][k]) for k, v in state.items()), f"AdamW state of {name} changed"


def sft_module(kind: str, skip: bool) -> tuple[AlignModule, SFTData]:
    data = SFTData(task=SentimentTask(num_train_prompts=40), batch_size=8, max_length=48, max_prompt_length=16,
                   val_fraction=0.0)
    return AlignModule(algorithm=BadSFT(kind=kind), policy=TINY, skip_nonfinite=skip), data


def ppo_module(skip: bool, reward: NaNReward | None = None, algorithm: PPO | None = None):
    sampling = SamplingConfig(max_new_tokens=4)
    algorithm = algorithm or PPO(sampling=sampling, update_epochs=1, num_minibatches=1)
    module = AlignModule(algorithm=algorithm, policy=TINY, rewards=[reward or NaNReward(bad_call=99)],
                         reward_combination=RewardCombination(normalize="running"), skip_nonfinite=skip)
    return module, PromptData(task=SentimentTask(num_train_prompts=16), batch_size=4, max_prompt_length=16)


def fit(module, data, tmp_path, steps: int = 4, callbacks: list | None = None) -> L.Trainer:
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks or [])
    trainer.fit(module, datamodule=data)
    return trainer


# ---------------------------------------------------------------------------------------------- stop

@pytest.mark.parametrize("kind, quantity", [("loss", "train loss"), ("gradient", "gradient of policy.")])
def test_nonfinite_loss_or_gradient_stops_the_run(kind, quantity, tmp_path):
    module, data = sft_module(kind, skip=False)
    around = AroundStep(BAD_STEP)
    with pytest.raises(NonFiniteError, match=f"^step {BAD_STEP}: {quantity}") as info:
        fit(module, data, tmp_path, callbacks=[around])
    assert "skip_nonfinite" in str(info.value)
    assert_same(around.before, snapshot(module))  # nothing stepped with the bad batch


def test_nonfinite_reward_stops_the_run(tmp_path):
    module, data = ppo_module(skip=False, reward=NaNReward(bad_call=BAD_STEP))
    with pytest.raises(NonFiniteError, match=f"^step {BAD_STEP}: reward 'lengthy' is not finite"):
        fit(module, data, tmp_path)


def test_nonfinite_gradient_stops_a_manual_optimisation_run(tmp_path):
    algorithm = BadPPO(sampling=SamplingConfig(max_new_tokens=4), update_epochs=1, num_minibatches=1)
    module, data = ppo_module(skip=False, algorithm=algorithm)
    # Gradient clipping spreads the NaN to every gradient before the check: any parameter may be named.
    with pytest.raises(NonFiniteError, match=f"^step {BAD_STEP}: gradient of "):
        fit(module, data, tmp_path)


def test_the_cli_reports_it_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--run_dir", tmp_path / "run",
                 "--model.algorithm=test_nonfinite.BadSFT", "--data.init_args.task.init_args.num_train_prompts=40",
                 "--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.limit_val_batches=0"])
    assert info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"alignkit: error: NonFiniteError: step {BAD_STEP}: train loss is not finite")
    assert not (tmp_path / "run" / "model").exists()


# ---------------------------------------------------------------------------------------------- skip

@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_skip_leaves_weights_and_optimizer_untouched(kind, tmp_path, capsys):
    module, data = sft_module(kind, skip=True)
    around = AroundStep(BAD_STEP)
    trainer = fit(module, data, tmp_path, steps=4, callbacks=[around])
    assert_same(around.before, around.after)
    assert f"skipping batch: step {BAD_STEP}:" in capsys.readouterr().out
    final = snapshot(module)["weights"]
    assert any(not torch.equal(final[n], w) for n, w in around.before["weights"].items())  # later steps trained
    assert all(torch.isfinite(w).all() for w in final.values()) and trainer.global_step == 4


def test_skip_a_nonfinite_reward(tmp_path, capsys):
    module, data = ppo_module(skip=True, reward=NaNReward(bad_call=BAD_STEP))
    around = AroundStep(BAD_STEP)
    trainer = fit(module, data, tmp_path, steps=3, callbacks=[around])
    assert_same(around.before, around.after)
    assert f"skipping batch: step {BAD_STEP}: reward 'lengthy'" in capsys.readouterr().out
    # The skipped batch took no optimiser step and left the running reward statistics alone.
    assert trainer.global_step == 3 and module.rewards[0].calls == 4
    assert module.reward_moments.count == 3 * 4
    assert all(torch.isfinite(p).all() for p in module.parameters())
