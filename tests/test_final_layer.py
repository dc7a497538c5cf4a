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

from alignkit.models.final_layer import final_decoder_layer, final_layer_at
from alignkit.models.loading import sequence_scores


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
    full = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits
    full.square().sum().backward()
    expected = grads(model)
    with final_layer_at(model, 4) as only_read:
        part = model(input_ids=ids, attention_mask=mask, logits_to_keep=4).logits
    assert only_read and part.shape == full.shape == (3, 4, 50)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    part.square().sum().backward()
    for got, want in zip(grads(model), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_columns_per_row_read_from_the_backbone():
    model = llama()
    ids, mask = batch()
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (3, 9, 32)
    index = torch.tensor([[8, 3], [5, 0], [8, 2]])
    with final_layer_at(model, index):
        part = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert part.shape == (3, 2, 32)
    torch.testing.assert_close(part, hidden[torch.arange(3)[:, None], index], atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(model.model.layers[-1])  # the layer is itself again after the block


def test_qwen3_query_and_key_norms():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, intermediate_size=64)
    model = Qwen3ForCausalLM(config).eval()
    ids, mask = batch()
    full = model(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits
    with final_layer_at(model, 3) as only_read:
        part = model(input_ids=ids, attention_mask=mask, logits_to_keep=3).logits
    assert only_read
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


def test_bf16_autocast_within_rounding():
    model = llama(layers=3)
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids=ids, attention_mask=mask, logits_to_keep=5).logits
        with final_layer_at(model, 5):
            part = model(input_ids=ids, attention_mask=mask, logits_to_keep=5).logits
    assert part.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(part.float(), full.float(), atol=2e-2, rtol=2e-2)


def test_a_forward_with_a_kv_cache_runs_the_whole_layer():
    model = llama()
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask, use_cache=True)
    with final_layer_at(model, 1):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(out.logits, expected.logits[:, -1:], atol=1e-5, rtol=1e-5)
    for layer in range(2):  # the cache holds every column's keys and values, as without the block
        torch.testing.assert_close(out.past_key_values.layers[layer].keys, expected.past_key_values.layers[layer].keys)


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
