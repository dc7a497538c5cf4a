"""TRL side of ``alignkit bench --compare trl``: the same measurement as
:func:`alignkit_benchmarks.alignkit_runner.run_alignkit` with TRL's trainers on the same saved model, data and lengths
(:data:`TRAINERS`: one builder per stage).

========== ============================ ====================================================
alignkit   TRL                          configured alike
========== ============================ ====================================================
sft        ``SFTTrainer``               prompt/completion rows, loss on the completion only
rm         ``RewardTrainer``            the same saved sequence classifier (one label)
dpo        ``DPOTrainer``               sigmoid loss, β = 0.1, live reference forward
ppo        ``RLOOTrainer``              ``B`` completions per iteration (``B/2`` prompts × 2), the same
                                        reward model, ``max_completion_length = max_new_tokens``,
                                        one optimiser step per iteration, β = 0.05 (reference forward)
========== ============================ ====================================================

Both sides: float32 weights and compute (TRL defaults to bf16 autocast and gradient checkpointing; both are
switched off here, since alignkit runs neither unless asked; ``alignkit bench --precision=bf16-mixed`` turns
bf16 autocast on for both sides), no evaluation, no checkpoints, no logging
(``report_to="none"``, logging interval beyond the run), the same batch size, ``max_length`` and seed, one
dataloader process. With ``spec["group_by_length"]`` (``alignkit bench --group_by_length``, default true) the
SFT, RM and DPO trainers sample with ``train_sampling_strategy="group_by_length"`` (transformers'
``LengthGroupedSampler``), as alignkit's data modules do with their ``group_by_length``; RM and DPO rows have
no ``input_ids`` for that sampler to measure, so a ``length`` column (prompt + longer response, from the
trainer's own token ids) is added to the prepared data set and kept with ``remove_unused_columns=False``
(the collators read only their own keys). RLOO's prompt sampler (``RepeatSampler``) has no length grouping.
Data: the sentiment task's synthetic preference pairs written by
:func:`alignkit_benchmarks.assets.prepare_assets`; TRL concatenates prompt and completion *text*, so completions get a
leading space, which gives exactly the token ids alignkit builds from the separately encoded prompt and
response (the tiny tokenizer's Metaspace pre-tokeniser starts every word with ``▁``).

Run standalone (the same as ``alignkit bench --compare '[trl]'``)::

    python -m alignkit_benchmarks.trl_compare --algorithms '[dpo, rm, ppo]' --repeats 3
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from alignkit_benchmarks.flops import model_shape
from alignkit_benchmarks.memory import current_rss, peak_memory
from alignkit_benchmarks.recorder import StepRecorder
from alignkit_benchmarks.results import finish_result
from alignkit_benchmarks.sizes import Workload
from alignkit_benchmarks.stages import algorithm_class


def _rows(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _space(text: str) -> str:
    return text if text.startswith(" ") else " " + text


def _preference_rows(paths: dict[str, str]) -> list[dict[str, str]]:
    return [{"prompt": r["prompt"], "chosen": _space(r["chosen"]), "rejected": _space(r["rejected"])}
            for r in _rows(paths["preferences"])]


def _sft(trl, work, paths, dtype, tokenizer, common, recorder):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=dtype)
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": _space(r["response"])}
                              for r in _rows(paths["demonstrations"])])
    args = trl.SFTConfig(max_length=work.max_length, packing=False, completion_only_loss=True, **common)
    return trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer), None


def _reward(trl, work, paths, dtype, tokenizer, common, recorder):
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1, dtype=dtype)
    args = trl.RewardConfig(max_length=work.max_length, **common)
    data = Dataset.from_list(_preference_rows(paths))
    return trl.RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer), None


def _dpo(trl, work, paths, dtype, tokenizer, common, recorder):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=dtype)
    args = trl.DPOConfig(max_length=work.max_length, beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=False,
                         **common)
    data = Dataset.from_list(_preference_rows(paths))
    return trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer), None


def _rloo(trl, work, paths, dtype, tokenizer, common, recorder):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if work.batch_size % 2:
        raise ValueError("RLOO needs an even batch size (2 completions per prompt)")
    model = AutoModelForCausalLM.from_pretrained(paths["policy"], dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(paths["rm"], num_labels=1, dtype=dtype)
    data = Dataset.from_list([{"prompt": r["prompt"]} for r in _rows(paths["prompts"])])
    args = trl.RLOOConfig(num_generations=2, max_completion_length=work.max_new_tokens, steps_per_generation=1,
                          num_iterations=work.update_epochs, beta=0.05, temperature=1.0, top_p=1.0, top_k=0,
                          log_completions=False, **common)
    trainer = trl.RLOOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data,
                              processing_class=tokenizer, reward_processing_classes=[tokenizer])
    _instrument_rloo(trainer, recorder)
    return trainer, model_shape(reward)


#: Per stage of :data:`alignkit_benchmarks.stages.STAGES`: the builder of its TRL counterpart, returning the trainer
#: and the reward model's shape (online stages). Whether a stage is online and what data it reads come from its
#: algorithm class (``online``, ``data_kind``).
TRAINERS = {"sft": _sft, "rm": _reward, "dpo": _dpo, "ppo": _rloo}


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """One TRL measurement, ``warmup + steps`` optimiser steps of the TRL counterpart of ``spec["algorithm"]``."""
    import torch
    import trl
    from transformers import AutoTokenizer, TrainerCallback, set_seed

    stage, work, paths = spec["algorithm"], Workload(**spec["workload"]), spec["paths"]
    if stage not in TRAINERS:
        raise ValueError(f"stage {stage!r} has no TRL counterpart; known: {', '.join(TRAINERS)}")
    algorithm = algorithm_class(stage)
    device = spec["device"]
    set_seed(spec["seed"])
    recorder = StepRecorder(device)
    rss0 = current_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dtype = getattr(torch, spec["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(paths["policy"])
    steps = spec["warmup"] + spec["steps"]
    tmp = tempfile.mkdtemp(prefix="trl-bench-")
    common = dict(output_dir=tmp, per_device_train_batch_size=work.batch_size, max_steps=steps, learning_rate=1e-5,
                  report_to="none", logging_steps=10 ** 9, save_strategy="no", eval_strategy="no",
                  bf16=spec.get("precision") == "bf16-mixed",
                  fp16=False, gradient_checkpointing=False, use_cpu=not device.startswith("cuda"), disable_tqdm=True,
                  seed=spec["seed"], dataloader_num_workers=0)
    grouped = bool(spec.get("group_by_length")) and not algorithm.online  # RLOO's sampler has no length grouping
    pairs = algorithm.data_kind == "preference"
    if grouped:  # pairs: keep the `length` column added below (the collators read only their own keys)
        common.update(train_sampling_strategy="group_by_length", remove_unused_columns=not pairs)
    trainer, rm_shape = TRAINERS[stage](trl, work, paths, dtype, tokenizer, common, recorder)
    if grouped and pairs:
        _add_length_column(trainer)
    if not algorithm.online:
        _instrument_offline(trainer, recorder)

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            recorder.begin()

        def on_step_end(self, args, state, control, **kwargs):
            recorder.end_step()

    trainer.add_callback(Timer())
    try:
        trainer.train()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = model_shape(trainer.model)
    result = {**recorder.summary(spec["warmup"]), **peak_memory(device, rss0), "trl": trl.__version__,
              "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                else trainer.optimizer).__name__}
    return finish_result(spec, result, shape, rm_shape)


def _add_length_column(trainer) -> None:
    """A ``length`` column (the trainer's ``length_column_name``) for ``LengthGroupedSampler``: the tokens a pair
    pads its batch to, prompt + the longer response, from the token ids the trainer prepared."""
    def length(row: dict[str, Any]) -> dict[str, int]:
        longer = max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        return {trainer.args.length_column_name: len(row.get("prompt_ids") or []) + longer}

    trainer.train_dataset = trainer.train_dataset.map(length)


def _instrument_offline(trainer, recorder) -> None:
    """Count the tokens of every training batch (the inputs the trainer hands to ``training_step``)."""
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"]
        recorder.add("tokens/real", float(mask.sum()))
        recorder.add("tokens/padded", float(mask.numel()))
        recorder.add("tokens/length", float(mask.shape[1]))
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def _instrument_rloo(trainer, recorder) -> None:
    """Time RLOO's phases (generation, reward, the rest of the experience) and count its tokens."""
    prepare, generate, rewards = trainer._prepare_inputs, trainer._generate, trainer._calculate_rewards

    def timed_prepare(batch):
        with recorder.phase("rollout+score+experience"):
            inputs = prepare(batch)
        prompt, completion = inputs["prompt_mask"], inputs["completion_mask"]
        recorder.add("tokens/generated", float(completion.sum()))
        recorder.add("tokens/prompt", float(prompt.sum()))
        recorder.add("tokens/real", float(prompt.sum() + completion.sum()))
        recorder.add("tokens/padded", float(prompt.numel() + completion.numel()))
        recorder.add("tokens/length", float(prompt.shape[1] + completion.shape[1]))
        recorder.add("tokens/prompt_length", float(prompt.shape[1]))
        recorder.add("rows", float(prompt.shape[0]))
        return inputs

    def timed_generate(*args, **kwargs):
        with recorder.phase("rollout"):
            return generate(*args, **kwargs)

    def timed_rewards(*args, **kwargs):
        with recorder.phase("score"):
            return rewards(*args, **kwargs)

    trainer._prepare_inputs, trainer._generate = timed_prepare, timed_generate
    trainer._calculate_rewards = timed_rewards


if __name__ == "__main__":
    from jsonargparse import CLI

    from alignkit_benchmarks.command import bench

    def main(algorithms: list[str] = ["dpo", "rm", "ppo"], repeats: int = 3, steps: int = 5, warmup: int = 2,
             group_by_length: bool = True, output: str | None = None, smoke: bool = False) -> None:
        """alignkit vs TRL on DPO, reward modelling and online RL (interleaved repeats, medians)."""
        bench(algorithms=algorithms, repeats=repeats, steps=steps, warmup=warmup, compare=["trl"],
              group_by_length=group_by_length, output=output, smoke=smoke)

    CLI(main)
