"""The DPO-family algorithm plugin (RLHF without a reward model): the policy learns directly from preference
pairs, with the losses of :mod:`alignkit_plugins.dpo.losses` applied to policy and reference log-probs."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit import (
    CHOSEN,
    REJECTED,
    Algorithm,
    LossOutput,
    PluginError,
    PreferenceBatch,
    atomic_write_bytes,
    check_shared_prompt,
    first_target_column,
    hookimpl,
    last_columns,
    share_prompts,
    token_logprobs,
)
from alignkit_plugins.dpo.losses import DPOVariant, dpo_loss, sequence_logps

REFERENCE_CACHE_FILE = "reference_logps.pt"
CACHE_VERSION = 1


def concatenated_logps(
    model: nn.Module, batch: PreferenceBatch, length_normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sequence log-probabilities of the chosen and the rejected responses from ONE forward pass over all
    ``2B`` rows of the batch.

    The logits at position ``t`` predict token ``t + 1``, so the logits drop their last position and the
    targets and ``loss_mask`` drop their first; only response tokens (``loss_mask``) count.

    Args:
        model: a causal LM (``model(input_ids=..., attention_mask=...).logits`` is ``(2B, T, V)``).
        batch: the preference batch, rows ``[0, B)`` chosen and ``[B, 2B)`` rejected, right padded.
        length_normalize: average the token log-probs over the response instead of summing them.

    Returns:
        ``(chosen, rejected)``, each ``(B,)`` float32: log π(y_c|x) and log π(y_r|x).
    """
    # Logits only from the column before the batch's first response token (``logits_to_keep``): the prompt
    # columns every row shares carry no target, and at a real vocabulary the LM head dominates the step.
    T = batch.input_ids.shape[1]
    keep = T - first_target_column(batch.loss_mask) + 1
    with last_columns(model, keep) as extra:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                       **extra).logits  # (2B, T - start, V): columns start .. T-1
    start = T - logits.shape[1]
    token_logps = token_logprobs(logits[:, :-1], batch.input_ids[:, start + 1:])  # (2B, T - start - 1)
    logps = sequence_logps(token_logps, batch.loss_mask[:, start + 1:], length_normalize)  # (2B,)
    pairs = batch.num_pairs
    return logps[:pairs], logps[pairs:]


def shared_prompt_logps(
    model: nn.Module, batch: PreferenceBatch, length_normalize: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`concatenated_logps` over the shared-prompt layout (:mod:`alignkit.pairs`): each pair's prompt runs
    once, its chosen and rejected responses follow in the same row (``P + 2R`` tokens instead of ``2(P + R)``).

    Column ``t`` predicts column ``t + 1`` except at the seam: the first rejected token is predicted by the last
    prompt column (which also predicts the first chosen token), not by the last chosen one. Logits are kept from
    the column before the earliest response on (``logits_to_keep``).

    Returns:
        ``(chosen, rejected)``, each ``(B,)`` float32: log π(y_c|x) and log π(y_r|x).
    """
    packed = share_prompts(batch)
    S = packed.input_ids.shape[1]
    start = max(int(packed.prompt_length.min()) - 1, 0)  # first column whose logits predict a response token
    with last_columns(model, S - start) as extra:
        logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask_for(model),
                       position_ids=packed.position_ids, use_cache=False, **extra).logits  # (B, S - start, V)
    start = S - logits.shape[1]
    token_logps = token_logprobs(logits[:, :-1], packed.input_ids[:, start + 1:])  # (B, S - start - 1)
    segment = packed.segment[:, start + 1:]
    rows = torch.arange(batch.num_pairs, device=logits.device)
    seam = packed.chosen_end + 1  # column of the first rejected token
    has_rejected = seam <= packed.rejected_end
    # The seam's token read from the right column: the last prompt token's logits.
    seam_logps = token_logprobs(logits[rows, packed.prompt_length - 1 - start][:, None],
                                packed.input_ids[rows, seam.clamp(max=S - 1)][:, None])[:, 0]  # (B,)
    at_seam = (torch.arange(start + 1, S, device=logits.device)[None] == seam[:, None]) & has_rejected[:, None]
    token_logps = torch.where(at_seam, seam_logps[:, None], token_logps)
    chosen = sequence_logps(token_logps, segment == CHOSEN, length_normalize)
    rejected = sequence_logps(token_logps, segment == REJECTED, length_normalize)
    return chosen, rejected


def reference_logps_table(model: nn.Module, loaders: Iterable[Iterable[PreferenceBatch]], device: torch.device | str,
                          length_normalize: bool = False, shared_prompt: bool = False) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair the loaders yield, as two tables indexed by ``batch.index``.

    Returns ``(chosen, rejected)``: float32 CPU tensors of length ``max(index) + 1``, NaN at indices no
    loader yielded (e.g. rows dropped by the truncation policy).
    """
    pair_logps = shared_prompt_logps if shared_prompt else concatenated_logps
    indices, chosen, rejected = [], [], []
    with torch.no_grad():
        for loader in loaders:
            for batch in loader:
                c, r = pair_logps(model, batch.to(device), length_normalize)
                indices.append(batch.index.cpu())
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
    if not indices:
        raise PluginError("dpo: reference_logps=precompute found no preference pairs in the data loaders")
    index = torch.cat(indices)
    with torch.inference_mode(False):  # the first batch may arrive in validation, under inference mode
        tables = torch.full((2, int(index.max()) + 1), float("nan"))
        tables[0, index] = torch.cat(chosen).clone()
        tables[1, index] = torch.cat(rejected).clone()
    return tables[0], tables[1]


def data_fingerprint(loaders: Iterable[Iterable[PreferenceBatch]]) -> str:
    """A digest of the tokens and response masks of every pair, keyed by its index (independent of batch order
    and shuffling): a cached reference table is reused only for exactly the same tokenised pairs."""
    rows: dict[int, str] = {}
    for loader in loaders:
        for batch in loader:
            pairs = batch.num_pairs
            for i, index in enumerate(batch.index.tolist()):
                digest = hashlib.sha256()
                for row in (i, pairs + i):
                    real = batch.attention_mask[row].bool()
                    tokens = (batch.input_ids[row][real].tolist(), batch.loss_mask[row][real].tolist())
                    digest.update(repr(tokens).encode())
                rows[index] = digest.hexdigest()
    return hashlib.sha256(repr(sorted(rows.items())).encode()).hexdigest()


class DPO(Algorithm):
    """Direct preference optimisation and its variants (IPO, conservative DPO, robust DPO, hinge/SLiC).

    Each step scores the chosen and rejected responses with the policy in one concatenated forward pass,
    takes the same log-probs under the frozen reference policy and applies the loss named by ``loss_type``.
    Logged: ``rewards/{chosen,rejected,margins,accuracies}`` (implicit rewards β·log π/π_ref) and
    ``logps/{chosen,rejected}`` (policy log-probs). The data's ``margin`` column is not used.

    Reference log-probs are computed either live (a no-grad reference forward on every batch) or, with
    ``reference_logps="precompute"``, once over the whole train and validation sets at the first batch
    (before training proper, over the loaders of ``module.dataloaders_to_precompute()``). Every pair's
    ``batch.index`` is its row in the data file, numbered before the train/validation hold-out, so the two
    sets never share an index and one table serves both. The table is written to
    ``<cache_dir>/reference_logps.pt`` and stored in checkpoints; a resumed run (or any run on exactly the
    same tokenised pairs and policy config) reuses it, a mismatching file is recomputed.

    Memory: after precomputing on a single device, the host's frozen reference copy is dropped
    (``module.release_reference()``), so its weights really are freed (the host never stores frozen models in
    checkpoints, so a resumed run builds it, finds the table and drops it again). Under multi-device strategies
    (DDP, FSDP, DeepSpeed) the copy is kept — those strategies hold references to the wrapped modules — so
    precompute saves the per-step reference forward but not its memory; every rank computes the whole
    table and rank 0 writes the file. With LoRA there is no copy (the reference is the policy with adapters
    disabled), so there is nothing to free.
    """

    needs_reference = True
    data_kind = "preference"

    def __init__(self, beta: float = 0.1, loss_type: DPOVariant = "sigmoid", label_smoothing: float = 0.0,
                 length_normalize: bool | None = None, reference_logps: Literal["live", "precompute"] = "live",
                 cache_dir: str | None = None, shared_prompt: bool = False):
        """
        Args:
            beta: β, strength of the implicit KL penalty towards the reference (IPO: τ; hinge: 1/margin).
            loss_type: sigmoid (DPO), ipo, cdpo (conservative DPO), robust (robust DPO) or hinge (SLiC-style).
            label_smoothing: assumed label-flip probability ε in [0, 0.5); only for cdpo and robust.
            length_normalize: average token log-probs over the response instead of summing them. None: the
                loss's own setting, True for ``ipo`` (Azar et al. 2023 state IPO on length-averaged log-ratios,
                as TRL does) and False for the others.
            reference_logps: ``live``: a reference forward on every batch; ``precompute``: compute them once
                over the train and validation sets before training, cache them and free the reference copy.
            cache_dir: folder of the precomputed ``reference_logps.pt`` (default: the trainer's
                ``default_root_dir``, i.e. the run directory). Only with ``reference_logps=precompute``.
            shared_prompt: run each pair's prompt once, with both responses after it in one row
                (:func:`shared_prompt_logps`): ``P + 2R`` tokens per pair instead of ``2(P + R)``, the same log-probs
                up to float rounding. Needs a model with sdpa or eager attention.
        """
        super().__init__()
        if reference_logps not in ("live", "precompute"):
            raise ValueError(f"algorithm.reference_logps must be 'live' or 'precompute', got {reference_logps!r}")
        if cache_dir is not None and reference_logps != "precompute":
            raise ValueError("algorithm.cache_dir is only used with algorithm.reference_logps=precompute")
        try:  # the loss functions own the argument checks: run them once on a dummy pair
            zero = torch.zeros(1)
            dpo_loss(loss_type, zero, zero, zero, zero, beta=beta, label_smoothing=label_smoothing)
        except ValueError as exc:
            raise ValueError(f"algorithm: {exc}") from None
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.length_normalize = loss_type == "ipo" if length_normalize is None else length_normalize
        self.reference_logps, self.cache_dir = reference_logps, cache_dir
        self.shared_prompt = shared_prompt
        # Precompute state (plain attributes, not buffers: the table is not part of the state_dict).
        self._cache: dict[str, Any] | None = None  # {"chosen", "rejected", "meta"}
        self._cache_checked = False
        self._freed_reference = False

    @hookimpl
    def alignkit_configure(self, module) -> None:
        if self.shared_prompt:
            check_shared_prompt(module.policy, "dpo")

    # ------------------------------------------------------------------------------------------ loss
    @hookimpl
    def alignkit_loss(self, module, batch: PreferenceBatch) -> LossOutput:
        policy_chosen, policy_rejected = self.pair_logps(module.policy, batch)
        reference_chosen, reference_rejected = self.reference_for(module, batch)
        terms = dpo_loss(self.loss_type, policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                         beta=self.beta, label_smoothing=self.label_smoothing)
        chosen, rejected = terms.chosen_rewards, terms.rejected_rewards
        return LossOutput(terms.losses.mean(), units=batch.num_pairs, stats={
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean(),
        })

    def pair_logps(self, model: nn.Module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """``(B,)`` log-probs of the chosen and the rejected responses under ``model``."""
        pair_logps = shared_prompt_logps if self.shared_prompt else concatenated_logps
        return pair_logps(model, batch, self.length_normalize)

    def reference_for(self, module, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
        """``(B,)`` reference log-probs of the chosen and rejected responses of ``batch``."""
        if self.reference_logps == "live":
            with torch.no_grad(), module.reference_model() as reference:
                chosen, rejected = self.pair_logps(reference, batch)
            return chosen.detach(), rejected.detach()
        self.ensure_reference_cache(module)
        index = batch.index.cpu()
        chosen, rejected = self._cache["chosen"][index], self._cache["rejected"][index]
        if torch.isnan(chosen).any() or torch.isnan(rejected).any():
            missing = index[torch.isnan(chosen) | torch.isnan(rejected)].tolist()
            raise PluginError(f"dpo: no precomputed reference log-probs for pair index {missing[:8]}")
        return chosen.to(module.device), rejected.to(module.device)

    # ------------------------------------------------------------------------------------------ precompute
    def cache_path(self, module) -> Path:
        folder = self.cache_dir if self.cache_dir is not None else module.trainer.default_root_dir
        return Path(folder) / REFERENCE_CACHE_FILE

    def cache_meta(self, module, loaders: list) -> dict[str, Any]:
        """What a cached table must match to be reused: the tokenised pairs, the summing mode and the
        policy config (from which the reference is built)."""
        return {"version": CACHE_VERSION, "data": data_fingerprint(loaders),
                "length_normalize": self.length_normalize, "policy": repr(module.policy_config)}

    def ensure_reference_cache(self, module) -> None:
        """Make the reference table available: from the checkpoint, else from the cache file, else computed
        with the reference model (then saved and the reference copy freed). Checked once per run."""
        if self._cache_checked:
            return
        loaders = module.dataloaders_to_precompute()
        if loaders is None:
            raise PluginError("dpo: reference_logps=precompute needs a Lightning data module "
                              "(trainer.fit(datamodule=...))")
        meta = self.cache_meta(module, loaders)
        path = self.cache_path(module)
        if self._cache is None or self._cache["meta"] != meta:  # nothing (or a stale table) from a checkpoint
            self._cache = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
            if self._cache is not None and self._cache.get("meta") != meta:
                module.print(f"dpo: {path} was computed for other data or another policy; recomputing it")
                self._cache = None
        if self._cache is None:
            if self._freed_reference:
                raise PluginError(f"dpo: the reference model was freed after precomputing, but the cached reference "
                                  f"log-probs in {path} and in the checkpoint do not match this run's data")
            with module.reference_model() as reference:
                chosen, rejected = reference_logps_table(reference, loaders, module.device, self.length_normalize,
                                                         self.shared_prompt)
            self._cache = {"chosen": chosen, "rejected": rejected, "meta": meta}
            if module.trainer.is_global_zero:
                save_atomic(self._cache, path)
        self._cache_checked = True
        self.free_reference(module)

    def free_reference(self, module) -> None:
        """Have the host release its frozen reference copy (single-device strategies only; see the class docstring)."""
        if module.release_reference():
            self._freed_reference = True

    # ------------------------------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict[str, Any]:
        """Saved in checkpoints by the host (:meth:`alignkit.plugin.Algorithm.extra_state`): the precomputed table."""
        if self._cache is None:
            return {}
        return {"reference_logps": self._cache}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the precomputed table (checked against this run's data at the first batch)."""
        self._cache = state.get("reference_logps")
        self._cache_checked = False


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` into memory, then written atomically (temporary file, fsync, rename; usual permissions)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
