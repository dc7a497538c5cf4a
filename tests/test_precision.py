"""``bf16-mixed`` and ``16-mixed`` precision on CPU (Lightning's autocast plugin, the same plugin GPUs use; for
``16-mixed`` with its gradient scaler, which Lightning only builds on CPU when the plugin is given explicitly, as
it turns a plain ``precision=16-mixed`` into bf16 there): every stage trains, with gradient clipping, and its
exported model computes finite log-probs. Catches what mixed precision
changes: bf16 logits reaching the log-prob and loss math, and gradient clipping with the fused AdamW default
(Lightning's MixedPrecision refuses it; alignkit clips itself under bf16-mixed, which scales no loss, and keeps
AdamW unfused under 16-mixed, whose scaler the fused kernel would unscale)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY_MODEL, preference_rows, run_cli, write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.enable_checkpointing=false", *QUIET]
PRECISIONS = {
    "bf16-mixed": "--trainer.precision=bf16-mixed",
    "16-mixed": "--trainer.plugins=[{class_path: lightning.pytorch.plugins.precision.MixedPrecision, "
                "init_args: {precision: 16-mixed, device: cpu}}]",
}
GOLD = ("--model.rewards=[{class_path: alignkit_plugins.rewards.GoldReward, "
        "init_args: {task: alignkit_plugins.tasks.SentimentTask}}]")
STAGES = {
    "sft": lambda prefs: ["--config", "recipes/sft.yaml", *TINY_MODEL, "--trainer.gradient_clip_val=1.0"],
    "rm": lambda prefs: ["--config", "recipes/reward_model.yaml", *TINY_MODEL, "--model.policy.name_or_path=tiny",
                         f"--data.init_args.path={prefs}", "--trainer.gradient_clip_val=1.0"],
    "dpo": lambda prefs: ["--config", "recipes/dpo.yaml", *TINY_MODEL, "--model.policy.name_or_path=tiny",
                          f"--data.init_args.path={prefs}", "--trainer.gradient_clip_val=1.0"],
    "ppo": lambda prefs: ["--config", "recipes/ppo_rlhf.yaml", *TINY_MODEL, "--model.policy.name_or_path=tiny", GOLD,
                          "--model.algorithm.init_args.sampling.max_new_tokens=6", "--data.init_args.batch_size=4",
                          "--data.init_args.task.init_args.num_train_prompts=8"],  # PPO clips (max_grad_norm)
}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("stage", list(STAGES))
def test_mixed_precision_trains_every_stage(stage, precision, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(16))
    run_cli(["fit", *STAGES[stage](prefs), PRECISIONS[precision], *COMMON, "--run_dir", tmp_path / "run"])
    model_dir = tmp_path / "run" / "model"
    if stage == "rm":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        return
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert next(model.parameters()).dtype == torch.float32  # mixed precision keeps fp32 master weights
    ids = torch.arange(3, 13).unsqueeze(0)
    assert torch.isfinite(model(input_ids=ids).logits).all()
    # the steps were taken (16-mixed's scaler skips a step whose scaled gradients overflow)
    shape = {a.split("=")[0].rsplit(".", 1)[1]: int(a.split("=")[1]) for a in TINY_MODEL if ".tiny." in a}
    initial = load_model(ModelConfig(tiny=TinyModelConfig(**shape)), "causal_lm")[0]
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), initial.state_dict().values()))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_adamw_under_bf16_and_exact_clipping(precision):
    """bf16 autocast scales no loss, so the fused AdamW default stays on and gradient clipping (which Lightning's
    MixedPrecision refuses for any fused optimiser) clips to the exact norm; 16-mixed's scaler keeps it off."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    from alignkit.module import AlignModule
    from alignkit_plugins.sft import SFT

    module = AlignModule(algorithm=SFT(), policy=ModelConfig(tiny=TinyModelConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False,
                               plugins=[MixedPrecision(precision, "cpu")])
    optimizer = module.configure_optimizers()["optimizer"]
    assert optimizer.defaults["fused"] is (True if precision == "bf16-mixed" else None)
    torch.manual_seed(0)
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    norm = torch.nn.utils.get_total_norm(before)
    module.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    assert torch.nn.utils.get_total_norm([p.grad for p in params]) == pytest.approx(0.5, rel=1e-5)
    torch.testing.assert_close(params[0].grad, before[0] * 0.5 / (norm + 1e-6))


def attention_kernels(run) -> set[str]:
    """The scaled-dot-product-attention kernels (forward and backward) that ``run()`` calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


@pytest.mark.parametrize("autocast", [True, False])
def test_cpu_training_step_attention_kernel(autocast):
    """Under CPU bf16 autocast a training step runs SDPA's math kernel (the flash kernel's bf16 backward is
    4-6x slower there) and computes the same loss and gradients as the flash kernel; in float32 it keeps flash."""
    import contextlib

    import lightning as L

    from alignkit.module import AlignModule
    from alignkit.types import SFTBatch
    from alignkit_plugins.sft import SFT

    torch.manual_seed(0)
    module = AlignModule(algorithm=SFT(), policy=ModelConfig(tiny=TinyModelConfig(
        hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=1, enable_progress_bar=False)
    module.should_log = lambda stepped: False
    ids = torch.randint(3, 100, (2, 12))
    batch = SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)) if autocast \
        else contextlib.nullcontext
    results = []

    def train(step):
        def run():
            module.zero_grad(set_to_none=True)
            with precision():
                loss = step()
            loss.backward()
            results.append((loss.detach(), module.policy.lm_head.weight.grad.clone()))
        return run

    chosen = attention_kernels(train(lambda: module.training_step(batch, 0)))
    default = attention_kernels(train(lambda: module.loss(batch).loss))  # torch's own choice: flash
    flash = "aten::_scaled_dot_product_flash_attention_for_cpu"
    assert flash in default
    if autocast:
        assert flash not in chosen and "aten::_scaled_dot_product_attention_math" in chosen
        torch.testing.assert_close(results[0], results[1], rtol=0.02, atol=1e-3)  # bf16 rounding apart
    else:
        assert flash in chosen
        torch.testing.assert_close(results[0], results[1])
