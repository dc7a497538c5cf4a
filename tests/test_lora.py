"""LoRA adapters (peft) for every algorithm: only adapters train, the reference is the policy with its
adapters disabled (no second copy), and the exported model is merged so plain transformers loads it."""

from __future__ import annotations

import json
import math

import lightning as L
import torch
from conftest import word_count_reward
from transformers import AutoModelForCausalLM

from alignkit.data import PreferenceData, PromptData, SFTData
from alignkit.models import LoraSettings, ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.rollout import SamplingConfig
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
LORA = ModelConfig(name_or_path="tiny", tiny=TINY, lora=LoraSettings(r=4, alpha=8))
TASK = SentimentTask(num_train_prompts=16, num_eval_prompts=4)


def trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)


def split(module) -> tuple[dict, dict]:
    state = {k: v.detach().clone() for k, v in module.policy.named_parameters()}
    return ({k: v for k, v in state.items() if "lora_" in k}, {k: v for k, v in state.items() if "lora_" not in k})


def test_sft_with_lora_trains_only_adapters_and_exports_a_merged_model(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=SFT(), policy=LORA)
    module.optimizer_config.lr = 1e-2
    adapters, base = split(module)
    assert adapters and all(not p.requires_grad for n, p in module.policy.named_parameters() if "lora_" not in n)
    trainer(tmp_path, 3).fit(module, datamodule=SFTData(task=TASK, batch_size=8, val_fraction=0))
    adapters_after, base_after = split(module)
    assert any(not torch.equal(adapters[k], adapters_after[k]) for k in adapters)
    assert all(torch.equal(base[k], base_after[k]) for k in base)
    module.export(str(tmp_path / "model"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in k for k in merged.state_dict())
    ids = module.tokenizer("review : the pizza", return_tensors="pt", add_special_tokens=False)["input_ids"]
    module.policy.eval()
    torch.testing.assert_close(merged(ids).logits, module.policy(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_dpo_with_lora_uses_the_policy_without_adapters_as_reference(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=DPO(beta=0.1), policy=LORA)
    assert module.reference is None  # no second copy of the weights
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": d.prompt, "chosen": d.response, "rejected": "bad bad bad"}) + "\n"
                            for d in TASK.demonstrations()[:8]))
    data = PreferenceData(path=str(path), batch_size=4, val_fraction=0)
    data.attach(module.tokenizer)
    data.setup()
    batch = data.collate(data.train_set[:4])
    # LoRA's B matrices start at zero: policy == reference, so the DPO loss is exactly log 2
    loss = module.algorithm.alignkit_loss(module=module, batch=batch).loss
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    adapters, base = split(module)
    module.optimizer_config.lr = 1e-2
    trainer(tmp_path, 3).fit(module, datamodule=data)
    adapters_after, base_after = split(module)
    assert any(not torch.equal(adapters[k], adapters_after[k]) for k in adapters)
    assert all(torch.equal(base[k], base_after[k]) for k in base)


def test_ppo_with_lora_runs_and_keeps_the_base_frozen(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=PPO(sampling=SamplingConfig(max_new_tokens=6), update_epochs=1), policy=LORA,
                         rewards=[word_count_reward()])
    assert module.reference is None
    adapters, base = split(module)
    trainer(tmp_path, 2).fit(module, datamodule=PromptData(task=TASK, batch_size=4))
    adapters_after, base_after = split(module)
    assert any(not torch.equal(adapters[k], adapters_after[k]) for k in adapters)
    assert all(torch.equal(base[k], base_after[k]) for k in base)
