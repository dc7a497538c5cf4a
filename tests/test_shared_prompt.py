"""Shared-prompt pairs (``alignkit.pairs``): the layout and mask by hand, and reward-model scores and DPO log-probs
(values and gradients) equal to the concatenated layout's, with sdpa and eager attention."""

import pytest
import torch

from alignkit.models.loading import ModelConfig, load_model
from alignkit.models.tiny import TinyModelConfig
from alignkit.pairs import share_prompts
from alignkit.types import PreferenceBatch
from alignkit_plugins.dpo import DPO
from alignkit_plugins.reward_model import RewardModel

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def preference_batch(pairs: list[tuple[list[int], list[int], list[int]]], pad: int = 0) -> PreferenceBatch:
    """(prompt, chosen, rejected) token lists -> a right-padded concatenated batch, as PreferenceData collates."""
    rows = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), pad)
    mask, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, a) in enumerate(rows):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        loss_mask[i, len(p): len(p) + len(a)] = 1
    return PreferenceBatch(input_ids=ids, attention_mask=mask, loss_mask=loss_mask,
                           margin=torch.zeros(len(pairs)), index=torch.arange(len(pairs)))


def test_layout_by_hand():
    batch = preference_batch([([5, 6, 7], [8, 9], [10]), ([5, 6], [11], [12, 13, 14, 15])], pad=3)
    packed = share_prompts(batch)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 0], [5, 6, 11, 12, 13, 14, 15]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0], [0, 1, 2, 2, 3, 4, 5]]
    assert packed.segment.tolist() == [[0, 0, 0, 1, 1, 2, -1], [0, 0, 1, 2, 2, 2, 2]]
    assert packed.prompt_length.tolist() == [3, 2]
    assert packed.chosen_end.tolist() == [4, 2] and packed.rejected_end.tolist() == [5, 6]
    mask = packed.attention_mask("sdpa")
    assert mask.shape == (2, 1, 7, 7) and mask.dtype == torch.bool
    assert mask[0, 0, 5].nonzero().flatten().tolist() == [0, 1, 2, 5]  # rejected: prompt and itself
    assert mask[0, 0, 4].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # chosen: causal
    assert mask[0, 0, 6].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]  # padding never attended ...
    assert not mask[0, 0, :6, 6].any()  # ... by a real token
    assert mask[1, 0, 6].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 6]
    additive = packed.attention_mask("eager", torch.float32)
    assert torch.equal(additive == 0, mask)
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed.attention_mask("flash_attention_2")


def test_empty_response_scores_at_the_prompt_end():
    packed = share_prompts(preference_batch([([5, 6, 7], [8, 9], []), ([5, 6], [], [12])]))
    assert packed.chosen_end.tolist() == [4, 1] and packed.rejected_end.tolist() == [2, 2]


def random_pairs(vocab: int, count: int = 6, seed: int = 0) -> PreferenceBatch:
    generator = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return torch.randint(4, vocab, (length,), generator=generator).tolist()

    return preference_batch([(tokens(2, 9), tokens(1, 7), tokens(1, 7)) for _ in range(count)])


def with_attention(model, implementation: str):
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_reward_scores_and_gradients_match_the_concatenated_layout(implementation):
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(tiny=TINY), "sequence_classification")
    model = with_attention(model, implementation)
    batch = random_pairs(len(tokenizer))
    results = []
    for shared in (False, True):
        model.zero_grad()
        chosen, rejected = RewardModel(shared_prompt=shared).pair_scores(model, batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation,length_normalize", [("sdpa", False), ("eager", False), ("sdpa", True)])
def test_dpo_logps_and_gradients_match_the_concatenated_layout(implementation, length_normalize):
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(tiny=TINY), "causal_lm")
    model = with_attention(model, implementation)
    batch = random_pairs(len(tokenizer), seed=1)
    results = []
    for shared in (False, True):
        model.zero_grad()
        chosen, rejected = DPO(shared_prompt=shared, length_normalize=length_normalize).pair_logps(model, batch)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(), [p.grad.clone() for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = results
    assert (c0 < 0).all() and (r0 < 0).all()
    torch.testing.assert_close(c1, c0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r1, r0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_models_that_cannot_run_it_are_refused_at_set_up():
    from types import SimpleNamespace

    from alignkit.manager import PluginError

    causal, _ = load_model(ModelConfig(tiny=TINY), "causal_lm")
    with pytest.raises(PluginError, match="LlamaForCausalLM has none; set shared_prompt=false"):
        RewardModel(shared_prompt=True).alignkit_configure(module=SimpleNamespace(policy=causal))
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    with pytest.raises(PluginError, match="'flash_attention_2'; set shared_prompt=false"):
        DPO(shared_prompt=True).alignkit_configure(module=SimpleNamespace(policy=flash))
    DPO(shared_prompt=True).alignkit_configure(module=SimpleNamespace(policy=causal))  # sdpa: accepted
