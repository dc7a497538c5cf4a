"""QLoRA (``model.quantization``): the frozen base loads 4-bit NF4 through bitsandbytes (on CPU here), only the
LoRA adapters train, the reference is the quantized policy with its adapters disabled, and the export merges the
trained adapters into the base loaded again unquantized."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from conftest import word_count_reward
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.data import PreferenceData, PromptData, SFTData
from alignkit.errors import ConfigError
from alignkit.models import LoraSettings, ModelConfig, TinyModelConfig
from alignkit.models.loading import load_model
from alignkit.module import AlignModule
from alignkit.rollout import SamplingConfig
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO
from alignkit_plugins.reward_model import RewardModel
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

bnb = pytest.importorskip("bitsandbytes")

TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
QLORA = ModelConfig(name_or_path="tiny", tiny=TINY, lora=LoraSettings(r=4, alpha=8), quantization="4bit")
TASK = SentimentTask(num_train_prompts=16, num_eval_prompts=4)


def trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)


def adapters(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.named_parameters() if v.requires_grad}


def preferences(tmp_path, tokenizer) -> PreferenceData:
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": d.prompt, "chosen": d.response, "rejected": "bad bad bad"}) + "\n"
                            for d in TASK.demonstrations()[:8]))
    data = PreferenceData(path=str(path), batch_size=4, val_fraction=0)
    data.attach(tokenizer)
    data.setup()
    return data


def test_quantization_needs_lora():
    with pytest.raises(ConfigError, match="model.quantization='4bit' needs model.lora"):
        load_model(ModelConfig(tiny=TINY, quantization="4bit"), "causal_lm")


def test_sft_with_qlora_trains_adapters_on_a_4bit_base_and_exports_a_merged_full_precision_model(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=SFT(), policy=QLORA)
    q_proj = module.policy.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    before = adapters(module)
    assert before and all("lora_" in k for k in before)
    module.optimizer_config.lr = 1e-2
    trainer(tmp_path, 3).fit(module, datamodule=SFTData(task=TASK, batch_size=8, val_fraction=0))
    after = adapters(module)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    module.export(str(tmp_path / "model"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert not any("lora" in k for k in merged.state_dict())
    base = load_model(ModelConfig(tiny=TINY), "causal_lm")[0]  # the unquantized base the export merged into
    a, b = (after[f"base_model.model.model.layers.0.self_attn.q_proj.lora_{x}.default.weight"] for x in "AB")
    expected = base.model.layers[0].self_attn.q_proj.weight + (b @ a) * (8 / 4)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=1e-5, atol=1e-6)


def test_dpo_with_qlora_uses_the_quantized_policy_without_adapters_as_reference(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=DPO(beta=0.1, shared_prompt=True), policy=QLORA)
    assert module.reference is None
    data = preferences(tmp_path, module.tokenizer)
    batch = data.collate(data.train_set[:4])
    loss = module.algorithm.alignkit_loss(module=module, batch=batch).loss  # B = 0 at init: policy == reference
    torch.testing.assert_close(loss, torch.tensor(math.log(2)))
    before = adapters(module)
    module.optimizer_config.lr = 1e-2
    trainer(tmp_path, 3).fit(module, datamodule=data)
    assert any(not torch.equal(before[k], v) for k, v in adapters(module).items())


def test_reward_model_with_qlora_trains_adapters_and_the_score_head(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=RewardModel(shared_prompt=True), policy=QLORA)
    before = adapters(module)
    assert any("score" in k for k in before) and any("lora_" in k for k in before)
    module.optimizer_config.lr = 1e-2
    trainer(tmp_path, 3).fit(module, datamodule=preferences(tmp_path, module.tokenizer))
    assert any(not torch.equal(before[k], v) for k, v in adapters(module).items())
    module.export(str(tmp_path / "model"))
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")


def test_ppo_with_qlora_generates_and_trains(tmp_path):
    L.seed_everything(0)
    module = AlignModule(algorithm=PPO(sampling=SamplingConfig(max_new_tokens=6), update_epochs=1), policy=QLORA,
                         rewards=[word_count_reward()])
    before = adapters(module)
    trainer(tmp_path, 2).fit(module, datamodule=PromptData(task=TASK, batch_size=4))
    assert any(not torch.equal(before[k], v) for k, v in adapters(module).items())


def test_sft_with_an_8bit_base(tmp_path):
    L.seed_everything(0)
    policy = ModelConfig(tiny=TINY, lora=LoraSettings(r=4, alpha=8), quantization="8bit")
    module = AlignModule(algorithm=SFT(), policy=policy)
    assert isinstance(module.policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)
    before = adapters(module)
    module.optimizer_config.lr = 1e-2
    trainer(tmp_path, 2).fit(module, datamodule=SFTData(task=TASK, batch_size=8, val_fraction=0))
    assert any(not torch.equal(before[k], v) for k, v in adapters(module).items())
