"""The policy-gradient presets (``alignkit_plugins.pg``) end to end: every preset's recipe runs in-process at smoke
size from one shared SFT model of the reverse task, and the built-in RLOO agrees with the documentation example
``docs/examples/alignkit-rloo`` (advantages, loss and gradient, and one training step from the same seed)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from alignkit.data import PromptData
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.rollout import SamplingConfig
from alignkit_plugins.pg import RLOO
from alignkit_plugins.pg.advantages import broadcast, grpo_advantages, rloo_advantages
from alignkit_plugins.pg.losses import ppo_clip_loss
from alignkit_plugins.rewards import GoldReward
from alignkit_plugins.tasks import SentimentTask
from tests.conftest import QUIET, RECIPES, SFT_RECIPE, TINY_MODEL, run_cli

PRESETS = {"grpo": "GRPO", "dr_grpo": "DrGRPO", "dapo": "DAPO", "gspo": "GSPO", "cispo": "CISPO", "rloo": "RLOO",
           "reinforce_pp": "ReinforcePP", "remax": "ReMax"}
REVERSE = "alignkit_plugins.tasks.ReverseTask"
TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))

alignkit_rloo = pytest.importorskip("alignkit_rloo", reason="pip install --no-deps -e docs/examples/alignkit-rloo")


@pytest.fixture(scope="module")
def reverse_sft(tmp_path_factory) -> Path:
    """A few SFT steps of the tiny model on the reverse task (its tokenizer and corpus): the model the recipes start
    from."""
    run_dir = tmp_path_factory.mktemp("sft_reverse") / "run"
    run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--model.policy.tiny.task=reverse",
             f"--data.init_args.task.class_path={REVERSE}", "--data.init_args.task.init_args.num_train_prompts=64",
             "--data.init_args.batch_size=16", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
             "--run_dir", run_dir])
    return run_dir / "model"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_recipe_runs_end_to_end(preset, reverse_sft, tmp_path):
    run_dir = tmp_path / preset
    run_cli(["fit", "--config", RECIPES / f"{preset}.yaml", *QUIET, f"--model.policy.name_or_path={reverse_sft}",
             "--data.init_args.task.init_args.num_train_prompts=32", "--data.init_args.batch_size=4",
             "--model.algorithm.init_args.sampling.max_new_tokens=8", "--trainer.max_steps=2",
             "--run_dir", run_dir])
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert summary["algorithm"] == PRESETS[preset] and summary["global_step"] == 2
    final = summary["final"]
    for name in ("objective/scores", "policy/clipfrac", "policy/approxkl", "loss/policy", "tokens/response_len_mean"):
        assert name in final and final[name] == final[name], (name, final)  # logged and not NaN
    assert (run_dir / "model" / "config.json").exists()
    if preset == "dapo":
        assert "dynamic_sampling/dropped_groups" in final
    if preset == "remax":
        assert "objective/greedy_scores" in final
    if preset == "grpo":
        assert "loss/kl" in final


def test_advantages_agree_with_the_documentation_example():
    rewards = torch.randn(24, generator=torch.Generator().manual_seed(3))
    for k in (2, 3, 4):
        torch.testing.assert_close(rloo_advantages(rewards, k), alignkit_rloo.rloo_advantages(rewards, k))
        torch.testing.assert_close(grpo_advantages(rewards, k), alignkit_rloo.grpo_advantages(rewards, k))


def test_loss_and_gradient_agree_with_the_documentation_example():
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(5)[None, :] < torch.tensor([5, 2, 1, 4])[:, None]).float()
    old = -torch.rand(4, 5, generator=g) * mask
    start = old + 0.3 * torch.randn(4, 5, generator=g) * mask
    advantages = torch.tensor([1.0, -0.5, 2.0, -1.5])
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    mine = ppo_clip_loss(ours, old, broadcast(advantages, mask), mask, 0.2, "token-mean")
    their_loss, their_stats = alignkit_rloo.clipped_pg_loss(theirs, old, advantages, mask, 0.2)
    torch.testing.assert_close(mine.loss, their_loss)
    torch.testing.assert_close(mine.approxkl, their_stats["policy/approxkl"])
    mine.loss.backward()
    their_loss.backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def one_step(algorithm, root: Path) -> dict[str, torch.Tensor]:
    """One online step (one optimiser step) of ``algorithm`` from seed 0 on the tiny model; the policy weights after."""
    L.seed_everything(0)
    module = AlignModule(algorithm=algorithm, policy=TINY, rewards=[GoldReward(task=SentimentTask())])
    module.optimizer_config.lr = 1e-2
    data = PromptData(task=SentimentTask(num_train_prompts=32, num_eval_prompts=8), batch_size=4)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return {k: v.clone() for k, v in module.policy.state_dict().items()}


def test_one_step_agrees_with_the_documentation_example(tmp_path):
    # Same seed, same rollout (the host's sampling), same reward r − β·KL, same leave-one-out advantages and the same
    # token-mean clipped loss on one minibatch: the updated weights agree (the example's minibatch order comes from
    # the global stream, so only one step is comparable).
    sampling = SamplingConfig(max_new_tokens=8)
    ours = one_step(RLOO(samples_per_prompt=4, kl_coef=0.05, num_minibatches=1, sampling=sampling), tmp_path / "ours")
    theirs = one_step(alignkit_rloo.RLOO(samples_per_prompt=4, kl_coef=0.05, num_minibatches=1, sampling=sampling),
                      tmp_path / "theirs")
    initial = {k: v for k, v in AlignModule(algorithm=RLOO(), policy=TINY).policy.state_dict().items()}
    assert any(not torch.equal(initial[k], ours[k]) for k in ours)  # the step did move the weights
    for name in ours:  # Adam's first step moves every weight by about lr = 1e-2: 1e-5 is float noise
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
