"""Dropout is off in every model the host runs (``model.disable_dropout``, on by default): PPO's first ratio is
exactly 1 and its KL exactly 0 at initialisation, even for a model whose config has dropout (GPT-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import word_count_reward
from transformers import GPT2Config, GPT2LMHeadModel

from alignkit.models import LoraSettings, ModelConfig, disable_dropout
from alignkit.module import AlignModule
from alignkit.rollout import SamplingConfig, generate, left_pad, response_logprobs
from alignkit_plugins.ppo import PPO

PROMPTS = ["review : the pizza at the diner", "review : the soup", "review : the sushi on monday", "review : the taco"]


def tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 over the tiny tokenizer's vocabulary, with dropout 0.1 everywhere."""
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


@pytest.fixture
def gpt2_dir(tmp_path, tiny_tokenizer) -> Path:
    """The dropout GPT-2 and the tiny tokenizer, saved as a model directory."""
    path = tmp_path / "gpt2"
    tiny_gpt2(tiny_tokenizer).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_disable_dropout_makes_train_mode_forwards_identical(tiny_tokenizer):
    model = tiny_gpt2(tiny_tokenizer).train()
    ids = torch.tensor([tiny_tokenizer("review : the pizza was great", add_special_tokens=False)["input_ids"]])
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    # 2 layers × (attention weights, attention output, MLP output) + embeddings
    assert disable_dropout(model) == 7
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert model.config.attn_pdrop == 0.1  # the saved config keeps its dropout
    assert disable_dropout(model) == 0


def test_disable_dropout_zeroes_the_float_probabilities_attention_reads():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, attention_dropout=0.1))
    assert disable_dropout(model) == 2
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


def first_update_stats(path: Path, disable: bool) -> tuple[dict[str, float], torch.Tensor]:
    """PPO (two update epochs: the loss runs its own forward) on the GPT-2 at ``path``: the loss statistics of
    the first micro-batch of the first minibatch, before any optimiser step, and the experience's KL."""
    torch.manual_seed(0)
    algorithm = PPO(sampling=SamplingConfig(max_new_tokens=8), update_epochs=2)
    module = AlignModule(algorithm=algorithm, policy=ModelConfig(name_or_path=str(path)),
                         rewards=[word_count_reward()], disable_dropout=disable)
    tokenizer = module.tokenizer
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)
    rollout = generate(module.policy, tokenizer, ids, mask, PROMPTS, algorithm.sampling)
    scores, _ = module.score(rollout)
    experience = algorithm.alignkit_experience(module=module, rollout=rollout, scores=scores)
    micro = next(iter(algorithm.alignkit_minibatches(module=module, experience=experience)))[0]
    stats = algorithm.alignkit_loss(module=module, batch=micro).stats
    return {k: float(v) for k, v in stats.items()}, experience.kl


def test_ppo_ratio_is_one_and_kl_zero_at_initialisation_with_a_dropout_config(gpt2_dir):
    stats, kl = first_update_stats(gpt2_dir, disable=True)
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/clipfrac"] == 0.0 and stats["policy/approxkl"] == 0.0
    assert torch.equal(kl, torch.zeros_like(kl))
    # the check catches the bug: with dropout kept, π differs from π_old and from the reference
    stats, kl = first_update_stats(gpt2_dir, disable=False)
    assert abs(stats["policy/ratio_mean"] - 1.0) > 1e-4
    assert stats["policy/approxkl"] > 1e-6 and kl.abs().max() > 1e-4


def test_ppo_critic_copied_from_the_policy_has_no_dropout(gpt2_dir):
    module = AlignModule(algorithm=PPO(critic_kind="separate"), policy=ModelConfig(name_or_path=str(gpt2_dir)))
    assert module.disable_dropout
    for model in (module.policy, module.reference, module.algorithm.critic):
        assert disable_dropout(model) == 0  # nothing left to turn off


@pytest.mark.parametrize("disable", [True, False])
def test_lora_reference_is_deterministic_with_a_dropout_config(gpt2_dir, disable):
    lora = LoraSettings(r=4, alpha=8)
    module = AlignModule(algorithm=PPO(), policy=ModelConfig(name_or_path=str(gpt2_dir), lora=lora),
                         disable_dropout=disable)
    assert module.reference is None and module.policy.training  # the reference runs in train mode
    tokenizer = module.tokenizer
    ids, mask = left_pad([tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)
    with torch.no_grad(), module.reference_model() as reference:
        first, second = (response_logprobs(reference, ids, mask, ids.shape[1] - 3, 1.0) for _ in range(2))
    assert torch.equal(first, second) == disable
