"""One alignkit measurement: a stage of :data:`~alignkit_benchmarks.stages.STAGES` trained for ``warmup + steps``
steps by :class:`~alignkit.module.AlignModule` under a Lightning ``Trainer``."""

from __future__ import annotations

import tempfile
from typing import Any

from alignkit_benchmarks.flops import model_shape
from alignkit_benchmarks.hook_timer import PhaseTimer
from alignkit_benchmarks.memory import current_rss, peak_memory
from alignkit_benchmarks.recorder import StepRecorder, batch_tokens, shared_prompt_tokens
from alignkit_benchmarks.results import finish_result
from alignkit_benchmarks.sizes import Workload
from alignkit_benchmarks.stages import DATA, MODELS, ONLINE_REWARD, build_algorithm, load_plugin


def _lightning_callback(recorder: StepRecorder, shared_prompt: bool = False):
    import lightning as L

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            recorder.begin()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if hasattr(batch, "attention_mask") and not hasattr(batch, "prompts"):
                real, padded, length = batch_tokens(batch)
                recorder.add("tokens/real", real)
                recorder.add("tokens/padded", padded)
                recorder.add("tokens/length", length)
                if shared_prompt:  # the tokens the model runs (FLOPs); throughput still counts the pairs' tokens
                    real, length = shared_prompt_tokens(batch)
                    recorder.add("tokens/computed", real)
                    recorder.add("tokens/computed_length", length)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.end_step()

    return Timer()


def run_alignkit(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement of alignkit: ``spec["algorithm"]`` (a stage name) trained for ``warmup + steps`` steps."""
    import lightning as L
    import torch

    import alignkit.data
    from alignkit.models import ModelConfig
    from alignkit.module import AlignModule, OptimizerConfig
    from alignkit.rollout import SamplingConfig

    stage, work, paths = spec["algorithm"], Workload(**spec["workload"]), spec["paths"]
    device = spec["device"]
    L.seed_everything(spec["seed"], verbose=False)
    recorder = StepRecorder(device)
    rss0 = current_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    algorithm = build_algorithm(stage, {
        "shared_prompt": spec.get("shared_prompt", False), "seed": spec["seed"], "update_epochs": work.update_epochs,
        "sampling": SamplingConfig(max_new_tokens=work.max_new_tokens, temperature=1.0)})
    shared_prompt = bool(getattr(algorithm, "shared_prompt", False))
    data_class, data_file = DATA[algorithm.data_kind]
    data = getattr(alignkit.data, data_class)(
        path=paths[data_file], batch_size=work.batch_size, max_length=work.max_length,
        max_prompt_length=work.max_prompt_length, val_fraction=0.0, seed=spec["seed"],
        group_by_length=spec.get("group_by_length", False))
    policy = ModelConfig(name_or_path=paths[MODELS[algorithm.model_head]], dtype=spec["dtype"])
    timer = PhaseTimer(recorder)
    rewards, rm_shape = [], None
    if algorithm.online:  # scored by the saved reward model
        reward = load_plugin(ONLINE_REWARD)(path=paths["rm"], batch_size=max(64, work.batch_size), dtype=spec["dtype"])
        rewards, rm_shape = [reward], model_shape(reward.model)
    module = AlignModule(algorithm=algorithm, policy=policy, optimizer=OptimizerConfig(lr=1e-5), rewards=rewards,
                         plugins=[timer], completions_per_step=0)
    steps = spec["warmup"] + spec["steps"]
    per_step = getattr(algorithm, "update_epochs", 1) if algorithm.online else 1  # optimiser steps per step
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        trainer = L.Trainer(
            max_steps=steps * per_step, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
            precision=spec.get("precision") or "32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            deterministic=spec.get("deterministic", True), callbacks=[_lightning_callback(recorder, shared_prompt)],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=data)
    result = {**recorder.summary(spec["warmup"]), **peak_memory(device, rss0), "hooks": timer.totals()}
    return finish_result(spec, result, model_shape(module.policy), rm_shape)
