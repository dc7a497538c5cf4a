"""Gradient checkpointing (``model.policy.gradient_checkpointing``) recomputes activations in the backward pass
instead of storing them: the loss and every gradient equal the run without it, with full weights and with LoRA
adapters (where the frozen embeddings give the checkpointed blocks inputs that need no gradient)."""

from __future__ import annotations

import pytest
import torch

from alignkit.models import LoraSettings, ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.types import SFTBatch
from alignkit_plugins.sft import SFT

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_checkpointed_loss_and_gradients_equal_the_plain_ones(lora):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 200, (3, 12), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = ModelConfig(tiny=TINY, lora=lora, gradient_checkpointing=checkpointing)
        module = AlignModule(algorithm=SFT(), policy=policy)
        module.policy.train()
        assert module.policy.is_activation_checkpointing == checkpointing
        if lora is not None:  # LoRA's B starts at zero: make the adapters matter for the comparison
            with torch.no_grad():
                for name, p in module.policy.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        loss = module.algorithm.alignkit_loss(module=module, batch=batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
        assert grads and all(g is not None for g in grads.values())
        results.append((loss.detach(), grads))
    (plain_loss, plain), (ckpt_loss, ckpt) = results
    torch.testing.assert_close(ckpt_loss, plain_loss)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)
