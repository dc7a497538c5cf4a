"""The shared rollout engine: batched sampling of completions with a KV cache, stop handling, the sampled
tokens' log-probabilities taken from the decoding logits, and :func:`response_logprobs`, which computes the
same log-probabilities with one (differentiable) forward pass, as the training forward does.

Shapes: ``B`` batch, ``P`` prompt length, ``R`` response length, ``T = P + R``, ``V`` vocabulary size.
Prompts are left padded so that every response starts at column ``P``.

Positions are always derived from the attention mask (``cumsum - 1``, clamped at 0), during generation
and in :func:`response_logprobs`, so left padding never shifts a prompt's positions. This matches what
``transformers`` 5 ``generate`` does when given an attention mask; note that a plain model forward in
``transformers`` 5 does *not* do it (it falls back to ``arange``), so callers must pass ``position_ids``.

Sampling is a small loop over the model's KV cache rather than ``model.generate``: ``generate`` draws
with ``torch.multinomial`` on the global RNG and takes no ``torch.Generator``, while this loop threads
an explicit generator through every draw, so a rollout is reproducible without touching global state.
Each draw is an inverse-CDF lookup (:func:`sample_categorical`, one uniform number per row) rather than
``torch.multinomial``, which draws one random number per vocabulary entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alignkit import ops
from alignkit.models.final_layer import last_columns
from alignkit.types import Rollout


@dataclass
class SamplingConfig:
    """How completions are sampled."""

    max_new_tokens: int = 32
    """Maximum number of response tokens per prompt."""
    temperature: float = 1.0
    """Logits are divided by this before sampling; ``Rollout.logprobs`` use the same scaling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the top_k most likely tokens before sampling (0 = off)."""
    do_sample: bool = True
    """Sample from the distribution; False decodes greedily (argmax of the raw logits)."""
    stop_strings: list[str] = field(default_factory=list)
    """A response ends at the first token whose decoded prefix contains any of these strings."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a response, in addition to the tokenizer's EOS token."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain empty strings")
        if any(i < 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left pad token id lists into ``input_ids (B, L)`` and ``attention_mask (B, L)`` (both int64),
    ``L`` being the longest sequence."""
    length = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, length - len(seq):] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that ignore left padding: ``cumsum(mask) - 1`` clamped at 0. ``(B, T) -> (B, T)``."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model: torch.nn.Module, sequences: Tensor, attention_mask: Tensor,
                      prompt_length: int, temperature: float) -> Tensor:
    """log softmax(logits / temperature) of every response token, from one forward pass.

    sequences, attention_mask: ``(B, P + R)``, left-padded prompts then right-padded responses;
    ``attention_mask[:, P:]`` is the response mask. Returns ``(B, R)`` float32, 0 where the response
    mask is 0. Differentiable (no ``no_grad`` here): the PPO training forward calls it too.
    """
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
    response_length = sequences.shape[1] - prompt_length
    keep = response_length + 1  # only the logits that predict response tokens (and the final layer only there)
    with last_columns(model, keep) as extra:
        logits = model(input_ids=sequences, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask), use_cache=False, **extra).logits
    logits = logits[:, -(response_length + 1):-1]  # (B, R, V): position t predicts token t + 1
    logprobs = ops.token_logprobs(logits, sequences[:, prompt_length:], temperature)
    return logprobs * attention_mask[:, prompt_length:].to(logprobs.dtype)


def sample_categorical(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per row from ``probs (B, V)`` (non-negative, any positive row sum) -> ``(B,)`` int64.

    Inverse CDF: with ``c = cumsum(probs)`` (float64) and one uniform ``u ~ U[0, c_V)`` per row, the draw
    is the first ``i`` with ``c_i > u``, so ``P(i) = (c_i - c_{i-1}) / c_V = p_i / sum(p)``; an id with
    ``p_i = 0`` has ``c_i = c_{i-1}`` and is never drawn. ``u`` comes from ``generator`` (the global RNG
    when ``None``): one random number per row, where ``torch.multinomial`` draws one per entry.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    if not bool((total.isfinite() & (total > 0)).all()):
        raise ValueError("probabilities must be finite with a positive sum in every row")
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # rounding may give u = total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def _sample_next(logits: Tensor, config: SamplingConfig, generator: torch.Generator | None) -> Tensor:
    """Next token per row from the last-position logits ``(B, V)`` -> ``(B,)``."""
    if not config.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / config.temperature
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        logits = top_p_filter(logits, config.top_p)
    return sample_categorical(logits.softmax(-1), generator)


def _nucleus(sorted_logits: Tensor, probs: Tensor, top_p: float) -> Tensor:
    """Logits sorted in descending order with those outside the nucleus set to -inf: a token is dropped when
    the tokens ranked above it already reach ``top_p``; the top token always stays. ``probs``: their softmax
    over the whole vocabulary (same shape)."""
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    return sorted_logits.masked_fill(drop, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float, candidates: int = 256) -> Tensor:
    """Nucleus filtering of ``logits (B, V)``: -inf outside the smallest set of top tokens whose probability
    reaches ``top_p``.

    Rows whose ``candidates`` most likely tokens already reach ``top_p`` (a peaked distribution, the usual case)
    are filtered from a ``topk`` of those tokens instead of a sort of the whole vocabulary (much faster per decoding
    step); only the other rows are sorted whole (when every row is flat, somewhat slower than sorting alone;
    measured: see benchmarks/README.md#top-p-filtering). Both paths keep the same tokens up to float rounding of the
    cumulative sum at the nucleus boundary.
    """
    k = min(candidates, logits.shape[-1])
    top, order = logits.topk(k, dim=-1)  # (B, k), descending
    probs = (top - logits.logsumexp(-1, keepdim=True)).exp()
    covered = probs.sum(-1) >= top_p  # (B,) the nucleus lies inside the top k
    filtered = torch.full_like(logits, float("-inf"))
    filtered.scatter_(-1, order, _nucleus(top, probs, top_p))
    if not bool(covered.all()):
        rest = logits[~covered]
        sorted_logits, full_order = rest.sort(dim=-1, descending=True)
        kept = _nucleus(sorted_logits, sorted_logits.softmax(-1), top_p)
        filtered[~covered] = torch.full_like(rest, float("-inf")).scatter(-1, full_order, kept)
    return filtered


def _contains_stop(tokenizer, tokens: Tensor, stop_strings: list[str]) -> bool:
    text = tokenizer.decode(tokens.tolist(), skip_special_tokens=True)
    return any(s in text for s in stop_strings)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, input_ids: Tensor, attention_mask: Tensor,
             prompts: list[str], config: SamplingConfig,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample one completion per prompt and return it as a :class:`Rollout`.

    input_ids, attention_mask: ``(B, P)`` left-padded prompts on the model's device. ``generator``
    (on that device too) drives every random draw; with ``None`` the global RNG is used, so seed it
    with ``torch.manual_seed`` for reproducibility. The model runs in eval mode without gradients and
    gets its previous mode back afterwards.

    A response stops at the first EOS / ``stop_token_ids`` token or at the first token whose decoded
    prefix contains a stop string; that token is kept, everything after it is ``pad_token_id`` and
    masked out. ``R`` is the longest kept response.

    ``logprobs (B, R)`` float32 come from each decoding step's own logits ``z (B, V)``:
    ``log softmax(z / temperature)[token]``, before top-k / top-p filtering (no renormalisation) and for
    greedy decoding too, 0 where ``response_mask`` is 0. That is what :func:`response_logprobs` (the
    training forward) computes, up to float rounding between the cached and the uncached forward; no
    second forward pass runs. Stop strings are checked by decoding each unfinished response after every
    step, which costs ``O(R²)`` decoding per row.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer needs a pad_token_id or an eos_token_id")
    stop_ids = list(config.stop_token_ids)
    if tokenizer.eos_token_id is not None:
        stop_ids.append(tokenizer.eos_token_id)
    batch, prompt_length = input_ids.shape
    device = input_ids.device
    stop_ids_t = torch.tensor(stop_ids, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        with ops.cached_autocast(device.type):  # mixed precision: one cast of the weights per rollout
            mask = attention_mask.long()
            kwargs = ops.last_logits(model, 1)
            cache_keyword = ops.cache_keyword(model)  # `cache` from transformers 5.24 on, `past_key_values` before
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=True, **kwargs)
            response = torch.full((batch, config.max_new_tokens), pad_id, dtype=torch.long, device=device)
            logprobs = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
            lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
            ended = torch.zeros(batch, dtype=torch.bool, device=device)
            for step in range(config.max_new_tokens):
                logits = out.logits[:, -1]  # (B, V)
                token = _sample_next(logits, config, generator)
                token = torch.where(ended, torch.full_like(token, pad_id), token)
                response[:, step] = token
                logprobs[:, step] = ops.token_logprobs(logits[:, None], token[:, None], config.temperature)[:, 0]
                stopped = ~ended & torch.isin(token, stop_ids_t)
                if config.stop_strings:
                    for row in (~ended & ~stopped).nonzero().flatten().tolist():
                        if _contains_stop(tokenizer, response[row, :step + 1], config.stop_strings):
                            stopped[row] = True
                lengths = torch.where(stopped, step + 1, lengths)
                ended |= stopped
                if bool(ended.all()) or step + 1 == config.max_new_tokens:
                    break
                # finished rows keep feeding pad tokens (unmasked, so positions stay contiguous); their
                # outputs are discarded
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                out = model(input_ids=token[:, None], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)[:, -1:],
                            use_cache=True, **{cache_keyword: ops.returned_cache(out)})

        response_length = int(lengths.max())
        response = response[:, :response_length]
        response_mask = (torch.arange(response_length, device=device)[None, :] < lengths[:, None]).long()
        response = response.masked_fill(response_mask == 0, pad_id)
        logprobs = logprobs[:, :response_length].masked_fill(response_mask == 0, 0.0)
        sequences = torch.cat([input_ids, response], dim=1)
        full_mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
    finally:
        model.train(was_training)

    responses = [tokenizer.decode(response[row, :int(lengths[row])].tolist(), skip_special_tokens=True)
                 for row in range(batch)]
    return Rollout(sequences=sequences, attention_mask=full_mask, response_mask=response_mask,
                   logprobs=logprobs, ended=ended, prompt_length=prompt_length, prompts=list(prompts),
                   responses=responses)


def sample_texts(model: torch.nn.Module, tokenizer, prompts: list[str], config: SamplingConfig,
                 batch_size: int = 64, generator: torch.Generator | None = None,
                 chat_template: bool = False) -> list[Rollout]:
    """Sample one completion per prompt in batches of ``batch_size``, prompts encoded exactly as
    :class:`alignkit.data.PromptData` encodes them. Returns one :class:`Rollout` per batch."""
    from alignkit.data.tokenize import encode_prompt

    device = next(model.parameters()).device
    rollouts = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        ids, mask = left_pad([encode_prompt(tokenizer, p, chat_template) for p in chunk],
                             tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        rollouts.append(generate(model, tokenizer, ids.to(device), mask.to(device), chunk, config, generator))
    return rollouts
