"""Frozen models under mixed precision store their linear weights in the autocast dtype
(``alignkit.models.frozen_precision``): the same outputs bit for bit under autocast, tied weights untouched, a
call outside autocast still works, and a bf16-mixed DPO fit converts the reference but not the policy, with the
same losses as without the conversion."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

import alignkit.module as module_mod
from alignkit.data import PreferenceData
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.models.frozen_precision import store_in_compute_dtype
from alignkit.module import AlignModule, OptimizerConfig
from alignkit_plugins.dpo import DPO

CONFIG = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=tied)).eval().requires_grad_(False)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(1, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tied", [False, True])
def test_same_logits_under_autocast(tied, dtype):
    model = llama(tied)
    converted = copy.deepcopy(model)
    changed = store_in_compute_dtype(converted, dtype)
    assert changed == 2 * 7 + (0 if tied else 1)  # q, k, v, o, gate, up, down per layer; the LM head if untied
    ids, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, cache_enabled=False):
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = converted(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    layer = converted.model.layers[0]
    assert layer.mlp.up_proj.weight.dtype == dtype and layer.self_attn.q_proj.weight.dtype == dtype
    assert converted.model.embed_tokens.weight.dtype == torch.float32  # embeddings and norms keep float32
    assert layer.input_layernorm.weight.dtype == torch.float32
    if tied:
        assert converted.lm_head.weight is converted.model.embed_tokens.weight
        assert converted.lm_head.weight.dtype == torch.float32
    assert store_in_compute_dtype(converted, dtype) == 0  # idempotent


def test_reward_model_score_head_and_memory():
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(**CONFIG, num_labels=1)).eval().requires_grad_(False)
    reference = copy.deepcopy(rm)
    before = sum(p.numel() * p.element_size() for p in rm.parameters())
    assert store_in_compute_dtype(rm, torch.bfloat16) == 2 * 7 + 1
    after = sum(p.numel() * p.element_size() for p in rm.parameters())
    linear = sum(m.weight.numel() for m in reference.modules() if isinstance(m, nn.Linear))
    assert before - after == 2 * linear  # 4 -> 2 bytes per linear weight
    ids, mask = batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        assert torch.equal(rm(input_ids=ids, attention_mask=mask).logits,
                           reference(input_ids=ids, attention_mask=mask).logits)


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of the file ``path`` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path)):
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


def _tensors_in(ranges, model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in tensors)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="Linux memory maps")
def test_no_tensor_reads_from_the_checkpoint_file_after_conversion(tmp_path):
    llama(tied=True).save_pretrained(tmp_path / "model")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval().requires_grad_(False)
    file = (tmp_path / "model" / "model.safetensors").resolve()
    if not _tensors_in(_mapped_from(file), model):
        pytest.skip("this transformers version copies the checkpoint's tensors at load")
    store_in_compute_dtype(model, torch.bfloat16)
    assert _tensors_in(_mapped_from(file), model) == 0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied after the copy


def test_outside_autocast_runs_at_the_lower_precision():
    model = llama(tied=False)
    converted = copy.deepcopy(model)
    store_in_compute_dtype(converted, torch.bfloat16)
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = converted(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
    assert not torch.equal(got, expected)


def test_trained_or_non_float32_linears_are_left_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double().requires_grad_(False),
                          nn.Linear(4, 4).requires_grad_(False))
    model[0].requires_grad_(True)
    assert store_in_compute_dtype(model, torch.bfloat16) == 1
    assert [m.weight.dtype for m in model] == [torch.float32, torch.float64, torch.bfloat16]


def _preferences(tmp_path: Path) -> Path:
    foods = ["soup", "taco", "pizza", "curry"] * 2
    rows = [{"prompt": f"review : the {food} at the cafe", "chosen": " it was great" + " and fresh" * (i % 3),
             "rejected": " bland" + " and cold" * (i % 2)} for i, food in enumerate(foods)]
    path = tmp_path / "preferences.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _fit_dpo(tmp_path: Path, precision: str) -> tuple[AlignModule, list[float]]:
    L.seed_everything(0)
    module = AlignModule(algorithm=DPO(), optimizer=OptimizerConfig(lr=1e-2), policy=ModelConfig(
        name_or_path="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)))
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    data = PreferenceData(path=str(_preferences(tmp_path)), batch_size=4, max_length=32, val_fraction=0)
    L.Trainer(max_steps=2, accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=[Record()],
              default_root_dir=str(tmp_path)).fit(module, datamodule=data)
    return module, losses


def test_bf16_mixed_dpo_converts_the_reference_only_and_keeps_the_losses(tmp_path, monkeypatch):
    module, losses = _fit_dpo(tmp_path, "bf16-mixed")
    assert module.reference.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert module.policy.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    monkeypatch.setattr(module_mod, "store_in_compute_dtype", lambda model, dtype: 0)
    unconverted, expected = _fit_dpo(tmp_path, "bf16-mixed")
    assert unconverted.reference.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert losses == expected and len(losses) == 2


def test_float32_fit_leaves_the_reference_in_float32(tmp_path):
    module, _ = _fit_dpo(tmp_path, "32-true")
    assert all(p.dtype == torch.float32 for p in module.reference.parameters())
