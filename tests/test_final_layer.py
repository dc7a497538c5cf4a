"""The final decoder layer at the read columns only (``alignkit.models.final_layer``): the same logits, hidden states,
scores and gradients as the full forward, for the supported layers, masks and attention implementations; a plain
full forward everywhere it does not apply."""

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import alignkit.models.final_layer as final_layer
from alignkit.models.final_layer import final_decoder_layer, final_layer_at
from alignkit.models.loading import sequence_scores
from alignkit.ops import returned_cache
from alignkit.pairs import share_prompts
from alignkit.types import PreferenceBatch


def llama(attention: str = "sdpa", kv_heads: int = 4, head: type = LlamaForCausalLM, layers: int = 2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=64, pad_token_id=0, num_labels=1,
                         attn_implementation=attention)
    return head(config).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 50, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask  # 0 is the pad id


def mlp_shapes(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """The output shapes of the last layer's MLP in the forwards that follow: ``(B, K, H)`` on the fast path."""
    shapes = []
    model.model.layers[-1].mlp.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    return shapes


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("padded", [True, False])
def test_last_columns_match_the_full_forward(attention, kv_heads, padded):
    model = llama(attention, kv_heads).train()
    ids, mask = batch()
    mask = mask if padded else torch.ones_like(mask)  # unpadded: transformers passes no mask to the layers
    full = model(input_ids=ids, attention_mask=mask, logits_to_keep=4, use_cache=False).logits
    full.square().sum().backward()
    expected = grads(model)
    shapes = mlp_shapes(model)
    with final_layer_at(model, 4) as only_read:
        part = model(input_ids=ids, attention_mask=mask, logits_to_keep=4, use_cache=False).logits
    assert only_read and part.shape == full.shape == (3, 4, 50)
    assert shapes == [(3, 4, 32)]  # the last layer's MLP ran at the 4 kept columns only
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    part.square().sum().backward()
    for got, want in zip(grads(model), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_columns_per_row_read_from_the_backbone():
    model = llama()
    ids, mask = batch()
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (3, 9, 32)
    index = torch.tensor([[8, 3], [5, 0], [8, 2]])
    shapes = mlp_shapes(model)
    with final_layer_at(model, index):
        part = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert part.shape == (3, 2, 32) and shapes == [(3, 2, 32)]
    torch.testing.assert_close(part, hidden[torch.arange(3)[:, None], index], atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(model.model.layers[-1])  # the layer is itself again after the block


def test_qwen3_query_and_key_norms():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64)
    model = Qwen3ForCausalLM(config).eval()
    ids, mask = batch()
    full = model(input_ids=ids, attention_mask=mask, logits_to_keep=3, use_cache=False).logits
    shapes = mlp_shapes(model)
    with final_layer_at(model, 3) as only_read:
        part = model(input_ids=ids, attention_mask=mask, logits_to_keep=3, use_cache=False).logits
    assert only_read and shapes == [(3, 3, 32)]
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)


def test_reward_scores_and_gradients_unchanged():
    model = llama(head=LlamaForSequenceClassification).train()
    ids, mask = batch()
    scores = sequence_scores(model, ids, mask)
    with torch.no_grad():  # the classifier's own pooling, with the whole last layer
        reference = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    scores.sum().backward()
    fast = grads(model)
    layer = model.model.layers[-1]
    layer.forward = layer.forward  # an already patched forward: final_layer_at leaves such a layer alone
    assert final_decoder_layer(model) is None
    sequence_scores(model, ids, mask).sum().backward()
    del layer.forward
    for got, want in zip(fast, grads(model)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_scores_with_the_block_mask(attention, monkeypatch):
    model = llama(attention, head=LlamaForSequenceClassification).train()
    ids = torch.randint(1, 50, (4, 8), generator=torch.Generator().manual_seed(2))
    lengths, prompts = [8, 6, 7, 5], [3, 2, 3, 2]  # rows 0-1 chosen, 2-3 rejected, after the same prompts
    ids[2, :3], ids[3, :2] = ids[0, :3], ids[1, :2]
    mask = (torch.arange(8)[None] < torch.tensor(lengths)[:, None]).long()
    loss_mask = mask * (torch.arange(8)[None] >= torch.tensor(prompts)[:, None])
    packed = share_prompts(PreferenceBatch(input_ids=ids * mask, attention_mask=mask, loss_mask=loss_mask,
                                           margin=torch.zeros(2), index=torch.arange(2)))
    at = torch.stack([packed.chosen_end, packed.rejected_end], 1)  # (2, 2)

    def scores() -> torch.Tensor:
        return sequence_scores(model, packed.input_ids, packed.attention_mask_for(model), packed.position_ids, at)

    shapes = mlp_shapes(model)
    fast = scores()
    assert packed.input_ids.shape == (2, 12) and shapes == [(2, 2, 32)]  # the MLP ran at 2 of the 12 columns
    fast.square().sum().backward()
    fast_grads = grads(model)
    monkeypatch.setattr(final_layer, "final_decoder_layer", lambda model: None)  # the whole last layer
    full = scores()
    full.square().sum().backward()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    for got, want in zip(fast_grads, grads(model)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_within_rounding():
    model = llama(layers=3)
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids, attention_mask=mask, logits_to_keep=5, use_cache=False).logits
        shapes = mlp_shapes(model)
        with final_layer_at(model, 5):
            part = model(input_ids=ids, attention_mask=mask, logits_to_keep=5, use_cache=False).logits
    assert shapes == [(3, 5, 32)] and part.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(part.float(), full.float(), atol=2e-2, rtol=2e-2)


def test_a_forward_with_a_kv_cache_runs_the_whole_layer():
    model = llama()
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask, use_cache=True)
    with final_layer_at(model, 1):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, expected.logits[:, -1:], atol=1e-5, rtol=1e-5)
    cache, expected_cache = returned_cache(out), returned_cache(expected)  # `cache` or `past_key_values`
    for layer in range(2):  # the cache holds every column's keys and values, as without the block
        torch.testing.assert_close(cache.layers[layer].keys, expected_cache.layers[layer].keys)
        torch.testing.assert_close(cache.layers[layer].values, expected_cache.layers[layer].values)


def test_unsupported_models_are_left_alone():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2)).eval()
    ids, _ = batch()
    with final_layer_at(model, 2) as only_read:
        logits = model(input_ids=ids).logits
    assert not only_read and logits.shape == (3, 9, 50)


def test_the_layer_is_restored_after_an_error():
    model = llama()
    with pytest.raises(RuntimeError, match="boom"):
        with final_layer_at(model, 2):
            raise RuntimeError("boom")
    assert "forward" not in vars(model.model.layers[-1])


def test_ppo_policy_pass_and_value_hidden_states(monkeypatch):
    from alignkit_plugins.ppo.algorithm import policy_forward

    model = llama()
    sequences, mask = batch()  # prompts: the first 4 columns
    shapes = mlp_shapes(model)
    fast = policy_forward(model, sequences, mask, 4, 0.7, need_hidden=True)  # (log-probs, logits, hidden)
    assert shapes == [(3, 6, 32)]  # the R + 1 = 6 kept columns
    monkeypatch.setattr(final_layer, "final_decoder_layer", lambda model: None)
    for got, want in zip(fast, policy_forward(model, sequences, mask, 4, 0.7, need_hidden=True)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
