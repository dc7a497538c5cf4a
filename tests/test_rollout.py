"""Tests for the rollout engine on a tiny randomly initialised Llama and a local word-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignkit.rollout import (
    SamplingConfig,
    _sample_next,
    generate,
    left_pad,
    response_logprobs,
    sample_categorical,
    top_p_filter,
)

PAD, EOS = 0, 1
PROMPT_IDS = [[4, 5, 6], [13], [23, 24, 25, 26, 27]]  # different lengths -> left padding
N = 12  # max_new_tokens


def make_tokenizer(eos_id: int = EOS) -> PreTrainedTokenizerFast:
    """64 words ``<pad> <eos> <unk> x00 .. x60``; with ``eos_id`` the ``<eos>`` word swaps ids with
    the word at ``eos_id``, so any id can be made the EOS token."""
    words = ["<pad>", "<eos>", "<unk>"] + [f"x{i:02d}" for i in range(61)]
    words[EOS], words[eos_id] = words[eos_id], words[EOS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def run(model, tokenizer, config: SamplingConfig, prompt_ids=PROMPT_IDS, generator=None):
    ids, mask = left_pad(prompt_ids, PAD)
    texts = [tokenizer.decode(p) for p in prompt_ids]
    return generate(model, tokenizer, ids, mask, texts, config, generator)


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: full forward over the growing sequence at every step, no KV cache, no stops."""
    seq = torch.tensor([prompt])
    for _ in range(steps):
        next_token = model(input_ids=seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, next_token.view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [greedy_without_cache(model, p, N) for p in PROMPT_IDS]


def expected_lengths(reference, is_stop) -> list[int]:
    """Response length per row: up to and including the first token where ``is_stop(row, k)``."""
    return [next((k + 1 for k in range(N) if is_stop(row, k)), N) for row in reference]


def check_truncation(rollout, reference, lengths, tokenizer):
    R = max(lengths)
    assert rollout.response_ids.shape == (len(PROMPT_IDS), R)
    for b, (row, n) in enumerate(zip(reference, lengths)):
        assert rollout.response_ids[b].tolist() == row[:n] + [PAD] * (R - n)
        assert rollout.response_mask[b].tolist() == [1] * n + [0] * (R - n)
        assert rollout.responses[b] == tokenizer.decode(row[:n], skip_special_tokens=True)
        assert bool(rollout.ended[b]) == (n < N)
        assert (rollout.logprobs[b, n:] == 0).all() and (rollout.logprobs[b, :n] < 0).all()
    prompt_mask = left_pad(PROMPT_IDS, PAD)[1]
    assert torch.equal(rollout.attention_mask, torch.cat([prompt_mask, rollout.response_mask], dim=1))


def test_left_pad():
    ids, mask = left_pad([[7, 8, 9], [5], []], pad_id=0)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"), ({"stop_strings": [""]}, "stop_strings"),
    ({"stop_token_ids": [-2]}, "stop_token_ids"),
])
def test_sampling_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**kwargs)


def test_greedy_matches_uncached_loop_and_unpadded_prompts(model, tokenizer, reference):
    rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=N, do_sample=False))
    # the tiny model never picks EOS greedily here, so every row runs the full N tokens
    assert rollout.response_ids.tolist() == reference
    assert rollout.prompt_length == 5 and rollout.sequences.shape == (3, 5 + N)
    assert rollout.prompts == ["x01 x02 x03", "x10", "x20 x21 x22 x23 x24"]
    assert not rollout.ended.any() and rollout.response_mask.all()
    for b, prompt in enumerate(PROMPT_IDS):  # each prompt alone (no padding) gives the same response
        alone = run(model, tokenizer, SamplingConfig(max_new_tokens=N, do_sample=False), prompt_ids=[prompt])
        assert alone.response_ids[0].tolist() == reference[b]


def test_sampling_is_deterministic_for_a_seed(model, tokenizer):
    config = SamplingConfig(max_new_tokens=8, temperature=1.5)
    first = run(model, tokenizer, config, generator=torch.Generator().manual_seed(123))
    second = run(model, tokenizer, config, generator=torch.Generator().manual_seed(123))
    other = run(model, tokenizer, config, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first.sequences, second.sequences) and torch.equal(first.logprobs, second.logprobs)
    assert not torch.equal(first.sequences, other.sequences)
    torch.manual_seed(7)
    global_a = run(model, tokenizer, config)
    torch.manual_seed(7)
    global_b = run(model, tokenizer, config)
    assert torch.equal(global_a.sequences, global_b.sequences)


def test_top_k_one_and_tiny_top_p_equal_greedy(model, tokenizer, reference):
    for config in (SamplingConfig(max_new_tokens=N, top_k=1), SamplingConfig(max_new_tokens=N, top_p=1e-6)):
        rollout = run(model, tokenizer, config, generator=torch.Generator().manual_seed(0))
        assert rollout.response_ids.tolist() == reference


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(400, 4)

    def draw(**kw):
        return set(_sample_next(logits, SamplingConfig(**kw), torch.Generator().manual_seed(1)).tolist())

    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.6) == {0, 1}  # 0.5 < 0.6, so the second token is needed
    assert draw(top_p=0.45) == {0}  # the first token alone reaches 0.45
    assert draw() == {0, 1, 2, 3}


def full_sort_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering by sorting the whole vocabulary (the reference implementation)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@pytest.mark.parametrize("candidates", [256, 4])
def test_top_p_from_the_top_candidates_equals_a_full_sort(candidates):
    """Peaked rows (nucleus inside the top candidates) take the topk path, flat rows the full sort; with 4
    candidates most rows fall back. The kept tokens and their logits are the same as sorting everything."""
    generator = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, 2001, dtype=torch.float32)
    peaked = torch.stack([(-1.5 * ranks.log())[torch.randperm(2000, generator=generator)] for _ in range(6)])
    flat = torch.randn(4, 2000, generator=generator) * 0.3
    logits = torch.cat([peaked, flat])
    logits[0, :1000] = float("-inf")  # rows already cut by top_k
    for top_p in (0.3, 0.9, 0.95):
        expected, filtered = full_sort_top_p(logits, top_p), top_p_filter(logits, top_p, candidates)
        assert torch.equal(filtered.isfinite(), expected.isfinite())
        assert torch.equal(filtered[filtered.isfinite()], expected[expected.isfinite()])
        assert 1 <= int(filtered.isfinite().sum(-1).min())


def test_stop_token_ids(model, tokenizer, reference):
    # a token greedy picks in row 0 (not first) that row 1 never picks -> rows end differently
    stop = next(t for t in reference[0][1:] if t not in reference[1])
    lengths = expected_lengths(reference, lambda row, k: row[k] == stop)
    assert lengths[0] < N and lengths[1] == N
    rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=N, do_sample=False, stop_token_ids=[stop]))
    check_truncation(rollout, reference, lengths, tokenizer)


def test_eos_token(model, reference):
    eos = reference[0][3]  # make the token greedy picks at step 3 of row 0 the tokenizer's EOS
    tokenizer = make_tokenizer(eos_id=eos)
    assert tokenizer.eos_token_id == eos
    lengths = expected_lengths(reference, lambda row, k: row[k] == eos)
    assert lengths[0] == 4
    rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=N, do_sample=False))
    check_truncation(rollout, reference, lengths, tokenizer)
    assert not rollout.responses[0].endswith("<eos>")  # special tokens are skipped in the text


def test_stop_strings(model, tokenizer, reference):
    words = [tokenizer.convert_ids_to_tokens(row) for row in reference]
    # a stop string ending in the middle of row 0's 4th word: that word's token completes it and is kept
    stop = f"{words[0][2]} {words[0][3][:2]}"
    lengths = expected_lengths(reference, lambda row, k: stop in tokenizer.decode(row[:k + 1]))
    assert lengths[0] == 4
    rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=N, do_sample=False, stop_strings=[stop, "zzz"]))
    check_truncation(rollout, reference, lengths, tokenizer)
    assert rollout.responses[0] == " ".join(words[0][:4])


def test_logprobs_match_sampling_distribution(model, tokenizer):
    config = SamplingConfig(max_new_tokens=N, temperature=0.7)
    rollout = run(model, tokenizer, config, generator=torch.Generator().manual_seed(3))
    P = rollout.prompt_length
    with torch.no_grad():
        for b, prompt in enumerate(PROMPT_IDS):  # unpadded, uncached forward of each row alone
            n = int(rollout.response_mask[b].sum())
            response = rollout.response_ids[b, :n]
            seq = torch.cat([torch.tensor(prompt), response])[None]
            logits = model(input_ids=seq, use_cache=False).logits[0, len(prompt) - 1:-1]
            expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, response[:, None]).squeeze(-1)
            torch.testing.assert_close(rollout.logprobs[b, :n], expected, atol=1e-5, rtol=0)
            assert (rollout.logprobs[b, n:] == 0).all()
    assert rollout.logprobs.shape == rollout.response_mask.shape == (3, rollout.sequences.shape[1] - P)


def test_logprobs_ignore_top_k_and_top_p(model, tokenizer):
    # Rollout.logprobs are log softmax(logits / T) of the unfiltered distribution, as the training forward
    # (response_logprobs) computes them, not of the top-k / top-p renormalised one that was sampled from
    config = SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=5, top_p=0.8)
    rollout = run(model, tokenizer, config, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7)
    torch.testing.assert_close(rollout.logprobs, expected, atol=1e-5, rtol=0)


def test_sample_categorical_matches_probs():
    # two distributions (rows need not sum to 1), each drawn n times; ids with probability 0 never come up
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.25, 0.0, 0.05], [0.0, 3.0, 1.0, 0.0, 0.0, 0.0]])
    n = 40_000
    draws = sample_categorical(probs.repeat_interleave(n, dim=0), torch.Generator().manual_seed(0))
    assert draws.shape == (2 * n,) and draws.dtype == torch.long
    for row, p in enumerate(probs):
        counts = torch.bincount(draws[row * n:(row + 1) * n], minlength=6).double()
        expected = n * p.double() / p.sum()
        support = p > 0
        assert (counts[~support] == 0).all()
        chi2 = ((counts - expected)[support] ** 2 / expected[support]).sum()
        # dof = support - 1 (3 and 1); 16.3 and 10.8 are the 0.999 quantiles of chi-square(3) and (1)
        assert chi2 < (16.3 if int(support.sum()) == 4 else 10.8), (row, counts)


def test_sample_categorical_edges_and_seed():
    # all the mass on the first or on the last id: always that id (no rounding past either end)
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]).repeat(1000, 1)
    assert sample_categorical(one_hot, torch.Generator().manual_seed(0)).tolist() == [0, 2] * 1000
    probs = torch.rand(64, 50, generator=torch.Generator().manual_seed(1))
    first = sample_categorical(probs, torch.Generator().manual_seed(9))
    assert torch.equal(first, sample_categorical(probs, torch.Generator().manual_seed(9)))
    assert not torch.equal(first, sample_categorical(probs, torch.Generator().manual_seed(10)))
    torch.manual_seed(3)
    global_a = sample_categorical(probs)
    torch.manual_seed(3)
    assert torch.equal(global_a, sample_categorical(probs))
    for bad in (float("nan"), float("inf"), 0.0):  # like torch.multinomial, invalid rows raise
        with pytest.raises(ValueError, match="probabilities"):
            sample_categorical(torch.tensor([[0.5, 0.5], [bad, 0.0]]))


def test_generate_uses_eval_mode_and_restores_it(model, tokenizer):
    modes = []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    try:
        rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=3))
    finally:
        hook.remove()
        was_training = model.training
        model.eval()
    assert was_training and modes and not any(modes)
    assert not rollout.logprobs.requires_grad


def test_response_logprobs_is_differentiable(model, tokenizer):
    rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=4, do_sample=False))
    logprobs = response_logprobs(model, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0)
    assert logprobs.requires_grad
    torch.testing.assert_close(logprobs.detach(), run(model, tokenizer, SamplingConfig(
        max_new_tokens=4, do_sample=False, temperature=1.0)).logprobs, atol=1e-6, rtol=0)
    logprobs.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_positions_ignore_left_padding(model, tokenizer):
    # RoPE is shift invariant, so outputs alone cannot reveal shifted positions: inspect what the model gets
    calls = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["position_ids"].tolist()), with_kwargs=True)
    try:
        rollout = run(model, tokenizer, SamplingConfig(max_new_tokens=3, do_sample=False))
    finally:
        hook.remove()
    prefill, step1, step2 = calls  # log-probs come from the decoding logits: no scoring forward
    assert prefill == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0], [0, 1, 2, 3, 4]]
    assert step1 == [[3], [1], [5]] and step2 == [[4], [2], [6]]
    assert rollout.response_mask.all()


class CastCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bfloat16 casts of the LM head weight (each autocast cast is one ``aten._to_copy``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.pointer, self.casts = weight.data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() == self.pointer \
                and kwargs.get("dtype") == torch.bfloat16:
            self.casts += 1
        return func(*args, **kwargs)


def test_mixed_precision_rollout_casts_the_weights_once(model, tokenizer, monkeypatch):
    """Under Lightning's autocast (``cache_enabled=False``) a rollout casts each trained weight once, not once per
    decoding step; the samples are the same, and a weight changed between rollouts is cast afresh."""
    import contextlib

    from alignkit import ops

    config = SamplingConfig(max_new_tokens=6)
    sample = lambda: run(model, tokenizer, config, generator=torch.Generator().manual_seed(3))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with CastCounter(model.lm_head.weight) as counter:
            cached = sample()
        assert counter.casts == 1 and not torch.is_autocast_cache_enabled()
        with monkeypatch.context() as m:
            m.setattr(ops, "cached_autocast", lambda device_type: contextlib.nullcontext())
            with CastCounter(model.lm_head.weight) as counter:
                per_call = sample()
            assert counter.casts == 6  # the prefill and five decoding steps
        assert torch.equal(cached.sequences, per_call.sequences) and torch.equal(cached.logprobs, per_call.logprobs)
        original = model.lm_head.weight.detach().clone()
        try:
            with torch.no_grad():
                model.lm_head.weight.mul_(-3.0)  # as an optimiser step would, in the same autocast region
            changed = sample()
        finally:
            with torch.no_grad():
                model.lm_head.weight.copy_(original)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        with torch.no_grad():
            model.lm_head.weight.mul_(-3.0)
        try:
            fresh = sample()
        finally:
            with torch.no_grad():
                model.lm_head.weight.copy_(original)
    assert torch.equal(changed.logprobs, fresh.logprobs) and not torch.equal(changed.logprobs, cached.logprobs)
