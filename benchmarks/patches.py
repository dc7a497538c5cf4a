"""Prototypes of the optimisations proposed for alignkit's core and plugins, applied by monkeypatching so
that ``alignkit bench --patches`` measures them side by side with the unpatched code (``alignkit+patches``)
before anyone edits the real files. Each patch mirrors one concrete code change described in
``benchmarks/README.md``; none changes what is computed beyond float rounding.

Use: ``apply(name)`` / ``revert(name)``, or the ``patched([...])`` context manager.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any

_ORIGINALS: dict[str, list[tuple[Any, str, Any]]] = {}


def _set(name: str, owner: Any, attribute: str, value: Any) -> None:
    _ORIGINALS.setdefault(name, []).append((owner, attribute, getattr(owner, attribute)))
    setattr(owner, attribute, value)


# ============================================================================================ fused_adamw

def fused_adamw() -> None:
    """``AlignModule.configure_optimizers``: ``torch.optim.AdamW(..., fused=True)`` (one kernel for the whole
    update instead of a Python loop of per-parameter ops; CPU and CUDA, fp32/bf16/fp16). TRL's default
    optimiser (``adamw_torch_fused``) is the same. Prototype: the method runs unchanged while ``AdamW``
    means the fused variant."""
    import torch

    from alignkit.module import AlignModule

    original, plain = AlignModule.configure_optimizers, torch.optim.AdamW

    class FusedAdamW(plain):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            devices = {p.device.type for group in params for p in (group["params"] if isinstance(group, dict) else [group])}
            super().__init__(params, *args, **{"fused": devices <= {"cpu", "cuda"} or None, **kwargs})

    @functools.wraps(original)
    def configure_optimizers(self):
        torch.optim.AdamW = FusedAdamW
        try:
            return original(self)
        finally:
            torch.optim.AdamW = plain

    _set("fused_adamw", AlignModule, "configure_optimizers", configure_optimizers)


# ============================================================================================ lean_logging

def should_log(module) -> bool:
    """Whether this step's ``on_step`` metrics reach a logger: Lightning writes them only every
    ``log_every_n_steps`` steps (and when stopping); the first and the last step are also logged so that
    ``metrics.json``'s ``first``/``final`` (read from ``callback_metrics``) stay exact."""
    trainer = module.trainer
    if trainer.global_step == 0 or trainer._logger_connector.should_update_logs:
        return True
    if 0 < trainer.max_steps <= trainer.global_step + 1:
        return True
    max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
    return trainer.is_last_batch and trainer.current_epoch + 1 >= max_epochs


def lean_logging() -> None:
    """``AlignModule``: skip the per-step ``self.log``/``self.log_dict`` calls (and the ``float(v)`` of each
    metric in ``log_stats``) on the training steps whose metrics Lightning will not write (:func:`should_log`):
    each ``self.log`` costs Lightning's result-collection bookkeeping (~0.1 ms per key on CPU), the DPO step
    logs 9 keys and the PPO step ~25. Epoch-level (validation) logging is untouched. Prototype: wrappers
    around ``log``, ``log_dict`` and ``log_stats``; the real change is one ``if should_log(self):`` around the
    logging in ``training_step`` and ``online_step`` (which also skips building the metric dicts)."""
    from alignkit.module import AlignModule

    def gate(original):
        @functools.wraps(original)
        def wrapper(self, *args, **kwargs):
            training = self._trainer is not None and self.trainer.training
            if training and not kwargs.get("on_epoch") and not should_log(self):
                return None
            return original(self, *args, **kwargs)

        return wrapper

    _set("lean_logging", AlignModule, "log", gate(AlignModule.log))
    _set("lean_logging", AlignModule, "log_dict", gate(AlignModule.log_dict))
    _set("lean_logging", AlignModule, "log_stats", gate(AlignModule.log_stats))


# ============================================================================================ fused_finite_check

def fused_finite_check() -> None:
    """``AlignModule.on_before_optimizer_step`` checks every gradient for NaN/inf with one
    ``torch.isfinite(p.grad).all()`` per parameter: a full-size bool temporary and two passes over each gradient,
    ~60 ms per step for 25M fp32 parameters on one CPU core. One fused ``torch._foreach_norm`` over all
    gradients (one pass, no temporary; a NaN/inf gradient gives a NaN/inf norm) answers the common all-finite
    case; only when it is not finite does the per-parameter search run to name the parameter (as now)."""
    import torch

    from alignkit.module import AlignModule

    original = AlignModule.on_before_optimizer_step

    @functools.wraps(original)
    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return None
        return original(self, optimizer)

    _set("fused_finite_check", AlignModule, "on_before_optimizer_step", on_before_optimizer_step)


# ============================================================================================ no_train_kv_cache

def no_train_kv_cache() -> None:
    """Pass ``use_cache=False`` in every training/scoring forward that does not decode: SFT's
    ``alignkit_loss``, DPO's ``concatenated_logps``, ``sequence_scores`` (reward model, RM training) and the
    reward plugin. transformers 5 fills ``use_cache`` from ``config.use_cache`` (True) when it is not given,
    so these forwards build a ``DynamicCache`` they never read. Prototype: ``config.use_cache = False`` on the
    host's models (alignkit's decoding loop passes ``use_cache=True`` explicitly, so sampling is unchanged)."""
    from alignkit.module import AlignModule

    original = AlignModule.__init__

    @functools.wraps(original)  # LightningCLI reads the signature and the docstring
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        models = [self.policy, self.reference, *(getattr(r, "model", None) for r in self.rewards)]
        for model in models:
            config = getattr(model, "config", None)
            if config is not None:
                config.use_cache = False

    _set("no_train_kv_cache", AlignModule, "__init__", __init__)


# ============================================================================================ free_grads

def free_grads() -> None:
    """Free the gradients right after each optimiser step (``zero_grad(set_to_none=True)``), not just before
    the next backward. Lightning's automatic loop zeroes them inside the closure, *after* the next
    ``training_step`` (forward), so one full copy of the gradients (4 bytes × parameters in fp32) stays
    allocated through data loading and the whole next forward, on top of the activations: the step's peak
    memory is weights + gradients + Adam states + activations instead of weights + Adam states + activations.
    Change: ``AlignModule.optimizer_step`` (automatic optimisation) and the end of ``AlignModule.update``
    (online algorithms) call ``optimizer.zero_grad(set_to_none=True)`` after stepping; gradient accumulation is
    unaffected (Lightning calls ``optimizer_step`` only at the accumulation boundary)."""
    import lightning as L

    from alignkit.module import AlignModule

    original_update = AlignModule.update

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        L.LightningModule.optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    @functools.wraps(original_update)
    def update(self, experience):
        stats = original_update(self, experience)
        self.optimizers().zero_grad(set_to_none=True)
        return stats

    _set("free_grads", AlignModule, "optimizer_step", optimizer_step)
    _set("free_grads", AlignModule, "update", update)


# ============================================================================================ fast_sampling

def sample_categorical(probs, generator=None):
    """One draw per row from ``probs (B, V)`` by inverse CDF: one uniform number per row and a binary search
    in the float64 cumulative sum (exact up to rounding; zero-probability ids are never drawn)."""
    import torch

    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def fast_sampling() -> None:
    """``alignkit.rollout._sample_next``: draw the next token by inverse CDF (:func:`sample_categorical`) instead
    of ``torch.multinomial(probs, 1)``, which draws one exponential random number per vocabulary entry and row
    (an "exponential race"): 16 × 32k random numbers per decoding step, ~10.8 ms on one CPU core against
    ~0.9 ms (softmax, cumsum, one uniform per row, searchsorted). Same distribution, explicit generator kept;
    the random stream differs, so a seed gives other (equally distributed) samples than before. Top-k / top-p
    filtering is unchanged (it runs before)."""
    import torch

    import alignkit.rollout as rollout_mod

    original = rollout_mod._sample_next

    @functools.wraps(original)
    def _sample_next(logits, config, generator):
        if not config.do_sample:
            return logits.argmax(-1)
        multinomial = torch.multinomial
        torch.multinomial = lambda probs, n, generator=None: sample_categorical(probs, generator)[:, None]
        try:
            return original(logits, config, generator)
        finally:
            torch.multinomial = multinomial

    _set("fast_sampling", rollout_mod, "_sample_next", _sample_next)


# ============================================================================================ rollout

def rollout_decode_logprobs() -> None:
    """``alignkit.rollout.generate``: take each sampled token's log-probability from the decoding step's own
    logits (``log_softmax(logits / T)`` at the sampled id, one ``(B, V)`` op per step) instead of a second,
    full forward pass over prompt + response after sampling. ``Rollout.logprobs`` keeps its meaning (the
    decoding forward with the KV cache equals the uncached forward up to float rounding, ~1e-7 in fp32);
    PPO never reads them (its experience forward computes log π_old together with the values), evaluation
    does."""
    import torch

    import alignkit.rollout as rollout_mod
    from alignkit import ops
    from alignkit.types import Rollout

    _accepts, _contains_stop = rollout_mod._accepts, rollout_mod._contains_stop
    position_ids_from_mask = rollout_mod.position_ids_from_mask

    @torch.no_grad()
    def generate(model, tokenizer, input_ids, attention_mask, prompts, config, generator=None) -> Rollout:
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
            mask = attention_mask.long()
            kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        use_cache=True, **kwargs)
            response = torch.full((batch, config.max_new_tokens), pad_id, dtype=torch.long, device=device)
            logprobs = torch.zeros((batch, config.max_new_tokens), dtype=torch.float32, device=device)
            lengths = torch.full((batch,), config.max_new_tokens, dtype=torch.long, device=device)
            ended = torch.zeros(batch, dtype=torch.bool, device=device)
            for step in range(config.max_new_tokens):
                logits = out.logits[:, -1]
                token = rollout_mod._sample_next(logits, config, generator)  # looked up now: fast_sampling
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
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
                out = model(input_ids=token[:, None], attention_mask=mask,
                            position_ids=position_ids_from_mask(mask)[:, -1:],
                            past_key_values=out.past_key_values, use_cache=True)
            response_length = int(lengths.max())
            response = response[:, :response_length]
            response_mask = (torch.arange(response_length, device=device)[None, :] < lengths[:, None]).long()
            response = response.masked_fill(response_mask == 0, pad_id)
            logprobs = logprobs[:, :response_length] * response_mask
            sequences = torch.cat([input_ids, response], dim=1)
            full_mask = torch.cat([attention_mask, response_mask.to(attention_mask.dtype)], dim=1)
        finally:
            model.train(was_training)
        responses = [tokenizer.decode(response[row, :int(lengths[row])].tolist(), skip_special_tokens=True)
                     for row in range(batch)]
        return Rollout(sequences=sequences, attention_mask=full_mask, response_mask=response_mask,
                       logprobs=logprobs, ended=ended, prompt_length=prompt_length, prompts=list(prompts),
                       responses=responses)

    _set("rollout_decode_logprobs", rollout_mod, "generate", generate)


# ============================================================================================ ppo

def ppo_lean_forward() -> None:
    """PPO's ``policy_forward``: ``logits_to_keep=R + 1`` (the LM head runs on the response positions only,
    not on the prompt: ``(B, R, V)`` instead of ``(B, P + R, V)`` logits, in the experience and in every
    update forward), and ``alignkit_loss`` computes the logged entropy under ``no_grad`` when
    ``entropy_coef == 0`` (no full-vocabulary log-softmax/exp/product kept for backward)."""
    import torch

    import alignkit_plugins.ppo.algorithm as ppo
    from alignkit.ops import token_logprobs
    from alignkit.rollout import _accepts, position_ids_from_mask

    def policy_forward(model, sequences, attention_mask, prompt_length, temperature, need_hidden):
        response_length = sequences.shape[1] - prompt_length
        kwargs = {"logits_to_keep": response_length + 1} if _accepts(model, "logits_to_keep") else {}
        out = model(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                    output_hidden_states=need_hidden, **kwargs)
        logits = out.logits[:, -(response_length + 1):-1]
        logprobs = token_logprobs(logits, sequences[:, prompt_length:], temperature)
        hidden = out.hidden_states[-1][:, prompt_length - 1:-1] if need_hidden else None
        return logprobs, logits, hidden

    original_loss, original_entropy = ppo.PPO.alignkit_loss, ppo.entropy_from_logits

    def detached_entropy(logits):
        with torch.no_grad():
            return original_entropy(logits.detach())

    @functools.wraps(original_loss)
    def alignkit_loss(self, module, batch):
        if self.entropy_coef:
            return original_loss(self, module, batch)
        ppo.entropy_from_logits = detached_entropy  # only logged: no graph through the full-vocab softmax
        try:
            return original_loss(self, module, batch)
        finally:
            ppo.entropy_from_logits = original_entropy

    # pluggy registers the bound method when the host builds its plugin manager, so the class attribute is
    # replaced (functools.wraps copies the hook marker): PPO instances built afterwards use the wrapper
    _set("ppo_lean_forward", ppo, "policy_forward", policy_forward)
    _set("ppo_lean_forward", ppo.PPO, "alignkit_loss", alignkit_loss)


# ============================================================================================ ppo_single_pass

def ppo_single_pass() -> None:
    """PPO with one update epoch, one minibatch and no accumulation (the RLOO/GRPO-style setting): the
    experience's policy forward (log π_old and the values) *is* the update's forward, since the policy has not
    changed in between. Run it once, with grad, in ``alignkit_experience``; use its detached outputs for the
    experience (advantages, returns, KL) and its graph for the loss (rows permuted as the minibatch order
    says). Saves one full policy forward per iteration; identical math (ratio = 1 on the single pass).
    Otherwise (several epochs or minibatches, a separate critic) nothing changes."""
    import torch

    import alignkit_plugins.ppo.algorithm as ppo

    inner = ppo.policy_forward
    original_experience, original_loss, original_select = (ppo.PPO.alignkit_experience, ppo.PPO.alignkit_loss,
                                                          ppo.PPOExperience.select)
    state: dict[str, Any] = {"capture": None, "stash": None, "rows": None}

    def policy_forward(model, sequences, attention_mask, prompt_length, temperature, need_hidden):
        if state["capture"] is model:  # the experience forward: keep the graph for the update
            state["capture"] = None
            with torch.enable_grad():
                out = inner(model, sequences, attention_mask, prompt_length, temperature, need_hidden)
            state["stash"] = (model, sequences.shape, out)
            return tuple(t.detach() if t is not None else None for t in out)
        stash, rows = state["stash"], state["rows"]
        if stash is not None and rows is not None and stash[0] is model and torch.is_grad_enabled():
            state["stash"] = None  # used once
            return tuple(t[rows] if t is not None else None for t in stash[2])
        return inner(model, sequences, attention_mask, prompt_length, temperature, need_hidden)

    def single(self) -> bool:
        return (self.update_epochs == 1 and self.num_minibatches == 1 and self.gradient_accumulation_steps == 1
                and self.critic is None)

    @functools.wraps(original_experience)
    def alignkit_experience(self, module, rollout, scores):
        state["stash"] = None
        state["capture"] = module.policy if single(self) and module.training else None
        try:
            return original_experience(self, module, rollout, scores)
        finally:
            state["capture"] = None

    @functools.wraps(original_loss)
    def alignkit_loss(self, module, batch):
        state["rows"] = getattr(batch, "_rows", None)
        try:
            return original_loss(self, module, batch)
        finally:
            state["rows"] = None

    def select(self, rows):
        chosen = original_select(self, rows)
        chosen._rows = rows
        return chosen

    _set("ppo_single_pass", ppo, "policy_forward", policy_forward)
    _set("ppo_single_pass", ppo.PPO, "alignkit_experience", alignkit_experience)
    _set("ppo_single_pass", ppo.PPO, "alignkit_loss", alignkit_loss)
    _set("ppo_single_pass", ppo.PPOExperience, "select", select)


# ============================================================================================ lm_head_on_responses

def first_target_column(mask) -> int:
    """The earliest column (>= 1) of a batch whose token is a target (its ``loss_mask``/label is set)."""
    if not bool(mask.any()):
        return 1
    return max(int(mask.float().argmax(-1)[mask.any(-1)].min()), 1)


def lm_head_on_responses() -> None:
    """SFT's ``alignkit_loss`` and DPO's ``concatenated_logps``: ``logits_to_keep`` covering the columns from
    the batch's earliest response token on, so the LM head (``H × V`` per position), the log-softmax and their
    backward skip the prompt columns every row shares (they carry no target). With a 512-token vocabulary this
    is ~1% of the FLOPs; with a 32k-150k vocabulary the LM head is a large share of a small model's work and
    its ``(B, T, V)`` logits (and their gradient) are the largest activations of the step."""
    import torch

    import alignkit_plugins.dpo.algorithm as dpo
    import alignkit_plugins.sft as sft
    from alignkit.ops import token_logprobs
    from alignkit.rollout import _accepts
    from alignkit.types import LossOutput
    from alignkit_plugins.dpo.losses import sequence_logps

    def concatenated_logps(model, batch, length_normalize: bool = False):
        T = batch.input_ids.shape[1]
        keep, kwargs = T, {}
        if _accepts(model, "logits_to_keep"):
            keep = T - first_target_column(batch.loss_mask) + 1  # logits at columns first-1 .. T-1
            kwargs["logits_to_keep"] = keep
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **kwargs).logits
        start = T - keep
        token_logps = token_logprobs(logits[:, :-1], batch.input_ids[:, start + 1:])
        logps = sequence_logps(token_logps, batch.loss_mask[:, start + 1:], length_normalize)
        pairs = batch.num_pairs
        return logps[:pairs], logps[pairs:]

    def sft_alignkit_loss(self, module, batch):
        T = batch.input_ids.shape[1]
        targets = batch.labels != sft.IGNORE
        keep, kwargs = T, {}
        if _accepts(module.policy, "logits_to_keep"):
            keep = T - first_target_column(targets) + 1
            kwargs["logits_to_keep"] = keep
        logits = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, use_cache=False, **kwargs).logits
        labels = batch.labels[:, T - keep:]
        reduce = getattr(module, "reduce_mean", None)
        tokens = reduce((batch.labels[:, 1:] != sft.IGNORE).sum()) if reduce is not None else None
        loss, count = (sft.sft_loss(logits, labels, self.label_smoothing, tokens) if tokens is not None
                       else sft.sft_loss(logits, labels, self.label_smoothing))
        return LossOutput(loss, {"tokens/trained": count.detach().float(),
                                 "ppl": torch.exp(loss.detach().clamp(max=20))})

    sft_alignkit_loss.alignkit_impl = sft.SFT.alignkit_loss.alignkit_impl
    _set("lm_head_on_responses", dpo, "concatenated_logps", concatenated_logps)
    _set("lm_head_on_responses", sft.SFT, "alignkit_loss", sft_alignkit_loss)


# ============================================================================================ length_grouped

class LengthGroupedBatches:
    """Batches of examples of similar length: shuffle, cut into mega-batches of ``group`` batches, sort
    each mega-batch by length, cut it into batches, shuffle the batches. Seeded; every example once per
    epoch; the random order across mega-batches is kept."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 32):
        self.lengths, self.batch_size, self.seed, self.group, self.epoch = lengths, batch_size, seed, group, 0

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}:{self.epoch}")
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start: start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)


def example_length(example: Any) -> int:
    """Padded length an example needs: SFT ``(prompt, response)`` pairs, packed SFT rows (lists of pairs),
    preference examples (prompt + the longer response) and prompt examples."""
    if hasattr(example, "chosen_ids"):
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
    if hasattr(example, "ids"):
        return len(example.ids)
    if isinstance(example, list):  # packed SFT row
        return sum(len(p) + len(r) for p, r in example)
    return len(example[0]) + len(example[1])


def length_grouped() -> None:
    """``AlignData.train_dataloader``: a length-grouped batch sampler (:class:`LengthGroupedBatches`) instead of
    uniform shuffling, so each batch pads to a similar length (a new data option, e.g. ``group_by_length``,
    implemented in the resumable sampler). Prototype: single-process runs only, not resumable mid-epoch."""
    from torch.utils.data import DataLoader

    from alignkit.data.modules import AlignData

    original = AlignData.train_dataloader

    @functools.wraps(original)
    def train_dataloader(self):
        trainer = self.trainer
        if not getattr(self, "shuffle", True):
            return original(self)
        if trainer is not None and trainer.world_size > 1:
            return original(self)
        sampler = LengthGroupedBatches([example_length(e) for e in self.train_set], self.batch_size, self.seed)
        return DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers)

    _set("length_grouped", AlignData, "train_dataloader", train_dataloader)


# ============================================================================================ registry

PATCHES: dict[str, Callable[[], None]] = {
    "fused_adamw": fused_adamw,
    "lean_logging": lean_logging,
    "free_grads": free_grads,
    "fused_finite_check": fused_finite_check,
    "no_train_kv_cache": no_train_kv_cache,
    "fast_sampling": fast_sampling,
    "rollout_decode_logprobs": rollout_decode_logprobs,
    "ppo_lean_forward": ppo_lean_forward,
    "ppo_single_pass": ppo_single_pass,
    "lm_head_on_responses": lm_head_on_responses,
    "length_grouped": length_grouped,
}


def apply(name: str) -> None:
    if name not in PATCHES:
        raise ValueError(f"unknown patch {name!r}; known: {', '.join(PATCHES)}")
    if name not in _ORIGINALS:
        PATCHES[name]()


def revert(name: str) -> None:
    for owner, attribute, original in reversed(_ORIGINALS.pop(name, [])):
        setattr(owner, attribute, original)


@contextlib.contextmanager
def patched(names: list[str]):
    for name in names:
        apply(name)
    try:
        yield
    finally:
        for name in reversed(names):
            revert(name)
