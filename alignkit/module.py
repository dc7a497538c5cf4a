"""The LightningModule that holds the models and delegates the math to the selected algorithm plugin.

Lightning owns the loop (devices, strategies, precision, checkpointing, logging); the algorithm owns the
math through the hooks of :mod:`alignkit.hookspecs`. Offline algorithms use automatic optimisation:
one ``alignkit_loss`` per batch. Online algorithms use manual optimisation: rollout → score →
experience → ``update_epochs`` × minibatches of updates, all inside one ``training_step``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from alignkit import ops
from alignkit.aggregation import StepMean
from alignkit.checkpoint import rng_states, set_rng_states
from alignkit.cpu_memory import retain_freed_memory
from alignkit.manager import PluginError, call_each, call_first, build_manager
from alignkit.models.dropout import disable_dropout as zero_dropout
from alignkit.models.frozen_precision import store_in_compute_dtype
from alignkit.models.loading import ModelConfig, load_model
from alignkit.ops import unwrap_peft
from alignkit.plugin import Algorithm, Reward, RewardOutput
from alignkit.rewards import RunningMoments, combine_rewards, normalize_rewards
from alignkit.types import LossOutput, Rollout
from alignkit.errors import NonFiniteError


def _loss_scaling(trainer: L.Trainer) -> bool:
    """Whether the trainer's precision scales the loss (``16-mixed``'s gradient scaler)."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over the trainer's total optimiser steps."""
    fused: bool | None = None
    """PyTorch's fused AdamW kernel (one kernel instead of ~10 ops per parameter); ``None``: fused when every
    trained parameter is on CPU or CUDA and the precision is not ``16-mixed`` (whose loss scaler a fused optimiser
    unscales internally, so Lightning cannot clip its gradients; ``bf16-mixed`` has no scaler)."""


@dataclass
class RewardCombination:
    """How the reward plugins' scores become one reward: weighted sum, then normalisation and clipping."""

    normalize: Literal["none", "batch", "running"] = "none"
    """``batch``: whiten within each batch; ``running``: divide by running statistics over all steps."""
    clip: float | None = None
    """Clip the combined reward to [-clip, clip] after normalisation."""


class AlignModule(L.LightningModule):
    """Policy, optional frozen reference, reward plugins and the algorithm plugin that trains them."""

    def __init__(
        self,
        algorithm: Algorithm,
        policy: ModelConfig = ModelConfig(),
        reference: ModelConfig | None = None,
        rewards: list[Reward] | None = None,
        reward_combination: RewardCombination = RewardCombination(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        plugins: list[Any] | None = None,
        skip_nonfinite: bool = False,
        completions_per_step: int = 4,
        retain_cpu_memory: bool = True,
        disable_dropout: bool = True,
    ):
        """
        Args:
            algorithm: the algorithm plugin (``class_path`` + ``init_args``) that owns the math.
            policy: the trained model: a causal LM, or the scorer of a reward-model stage.
            reference: the frozen reference policy when the algorithm needs one (default: a frozen copy of
                the initial policy; with LoRA, the policy with its adapters disabled).
            rewards: reward plugins scoring online samples; their weighted sum is the reward.
            reward_combination: normalisation and clipping of the combined reward.
            optimizer: optimiser and learning-rate schedule.
            plugins: extra plugin instances to register (e.g. a faster rollout engine).
            skip_nonfinite: skip a batch whose loss is NaN/inf instead of stopping the run.
            completions_per_step: sampled prompt/response/score rows recorded per online step, appended to
                ``completions.jsonl`` in the run directory and to a wandb table that keeps every step's rows.
            retain_cpu_memory: when training on CPU, make glibc keep freed memory for reuse instead of returning
                it to the OS after each step, where every new page costs a page fault (``alignkit.cpu_memory``;
                10-15 % of a 25M-parameter step). Process-wide; skipped when a ``MALLOC_*_`` variable is set.
            disable_dropout: set every dropout probability of the policy, reference, critic and reward models to 0
                (``alignkit.models.dropout``), as TRL does: with dropout, two forwards of the same weights differ, so
                PPO's ratio, π_old, values and KL are noisy. The saved config keeps its dropout values.
        """
        super().__init__()
        self.algorithm = algorithm
        # Copies: the defaults above are shared by every call, and a caller may change its module's settings.
        self.policy_config, self.optimizer_config = copy.deepcopy(policy), copy.deepcopy(optimizer)
        self.reward_combination, self.skip_nonfinite = copy.deepcopy(reward_combination), skip_nonfinite
        self.completions_per_step = completions_per_step
        self.retain_cpu_memory = retain_cpu_memory
        self.disable_dropout = disable_dropout
        self.completion_rows: list[list[Any]] = []
        self._logged_a_step = False  # by this process: see `should_log`
        self.policy, self.tokenizer = load_model(policy, algorithm.model_head)
        self.policy.train()  # `from_pretrained` returns eval mode; the trained model must run in train mode
        self.reference = self._build_reference(reference) if algorithm.needs_reference else None
        self.rewards = nn.ModuleList(rewards or [])
        names = [r.reward_name for r in self.rewards]
        if len(set(names)) < len(names):
            raise ValueError(f"model.rewards: two rewards share a name ({', '.join(names)}); give each a distinct `name`")
        self.rewards.requires_grad_(False)
        if disable_dropout:  # before `alignkit_configure`, so a critic copied from the policy has none either
            for model in (self.policy, self.reference, *self.rewards):
                if model is not None:
                    zero_dropout(model)
        self.reward_moments = RunningMoments()
        self.step_mean = StepMean()  # one mean over each optimiser step's micro-batches and ranks (LossOutput.units)
        self.pm = build_manager([algorithm, *self.rewards, *(plugins or [])])
        self.automatic_optimization = not algorithm.online
        call_each(self.pm, "alignkit_configure", object, module=self)

    def setup(self, stage: str) -> None:
        if self.algorithm.online and isinstance(self.trainer.strategy, FSDPStrategy):
            raise PluginError(f"algorithm {type(self.algorithm).__name__} updates the policy inside its training step, "
                              "which Lightning's FSDPStrategy does not support (backward during the FSDP forward); use "
                              "ModelParallelStrategy (FSDP2, recipes/gpu/ppo_fsdp2.yaml), ddp or deepspeed_stage_2")
        data = getattr(self.trainer, "datamodule", None)
        kind = getattr(data, "kind", None)
        if kind and kind != self.algorithm.data_kind:
            raise PluginError(f"algorithm {type(self.algorithm).__name__} trains on {self.algorithm.data_kind} data, but "
                              f"data is {type(data).__name__} ({kind}); choose a matching data class_path")
        if torch.are_deterministic_algorithms_enabled():
            # Reproducibility needs deterministic kernels, which Trainer(deterministic=True) selects; torch then
            # also fills every new uninitialised tensor with NaN by default, a debugging aid for kernels that read
            # memory they never wrote (none of ours do: bit-for-bit resume is tested). That fill touched every
            # torch.empty: 4x as many fills per step as without it, ~10 % of a 25M-parameter bf16 RM step on CPU.
            torch.utils.deterministic.fill_uninitialized_memory = False
        if self.retain_cpu_memory and self.trainer.strategy.root_device.type == "cpu":
            retain_freed_memory()
        precision = self.trainer.precision_plugin
        if isinstance(precision, MixedPrecision):
            # Autocast would cast the frozen models' weights at every forward; they never change, so cast once.
            dtype = precision.autocast_context_manager().fast_dtype
            for frozen in (self.reference, self.rewards):
                if frozen is not None:
                    store_in_compute_dtype(frozen, dtype)

    # ------------------------------------------------------------------------------------------ models
    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard what trains with FSDP2 (``fully_shard``) over the
        data-parallel mesh: each decoder layer of the policy (its ``_no_split_modules`` classes), then the policy
        itself, and each submodule of the algorithm that trains (e.g. a value head or a separate critic). The
        frozen reference and reward models stay whole on every rank. Other strategies: nothing to do."""
        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.policy, FSDPModule):
            return  # already sharded (configure_model runs again for a later fit/validate)
        # The strategy loads a resumed checkpoint into the sharded model itself, before `on_load_checkpoint` can
        # add the frozen models' weights that checkpoints leave out (they are rebuilt from their sources).
        self.strict_loading = not any(k.startswith(self.FROZEN_PREFIXES) for k in self.state_dict())
        mesh = self.device_mesh["data_parallel"]
        units = tuple(getattr(self.policy, "_no_split_modules", None) or ())
        for module in self.policy.modules():
            if type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        base = unwrap_peft(self.policy)
        head = getattr(base, "score", None)
        if isinstance(head, nn.Module):  # `sequence_scores` calls a classifier's backbone and head directly
            fully_shard(getattr(base, base.base_model_prefix), mesh=mesh)
            fully_shard(head, mesh=mesh)
        fully_shard(self.policy, mesh=mesh)
        for child in self.algorithm.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child, mesh=mesh)
        plain = [n for n, p in self.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if plain:
            raise PluginError(f"under ModelParallelStrategy every trained parameter must live in a submodule that "
                              f"can be sharded; not sharded: {', '.join(plain[:3])}")

    def _build_reference(self, config: ModelConfig | None) -> nn.Module | None:
        if config is None and self.policy_config.lora is not None:
            return None  # the policy with adapters disabled is the reference: no second copy
        reference = load_model(config, "causal_lm")[0] if config is not None else copy.deepcopy(self.policy)
        return reference.requires_grad_(False).eval()

    @contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The frozen reference policy, for use under ``torch.no_grad()``."""
        if self.reference is not None:
            yield self.reference
        elif hasattr(self.policy, "disable_adapter"):
            with self.policy.disable_adapter():
                yield self.policy
        else:
            raise PluginError(f"algorithm {self.algorithm.name} asked for a reference model but none was built")

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reference, self.rewards):
            if frozen is not None:
                frozen.eval()  # frozen models never run dropout
        return self

    def export(self, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the trained model and tokenizer with ``save_pretrained`` (LoRA adapters merged).

        ``state_dict``: the policy's full weights when a sharded strategy holds them spread over the ranks
        (:func:`alignkit.defaults.full_state_dict`, gathered before rank 0 calls this). A sharded LoRA policy is
        rebuilt unsharded on this rank from them, and its adapters merged there."""
        model = self.policy
        if hasattr(model, "merge_and_unload"):
            if state_dict is not None:
                model = load_model(self.policy_config, self.algorithm.model_head)[0]
                model.load_state_dict(state_dict)
                state_dict = None
            elif self.policy_config.quantization is not None:  # QLoRA: merge into the base loaded unquantized
                from peft import get_peft_model_state_dict, set_peft_model_state_dict

                adapters = get_peft_model_state_dict(model)
                model = load_model(replace(self.policy_config, quantization=None), self.algorithm.model_head)[0]
                set_peft_model_state_dict(model, adapters)
            else:
                model = copy.deepcopy(model)
            model = model.merge_and_unload()
        model.save_pretrained(path, state_dict=state_dict)
        self.tokenizer.save_pretrained(path)

    # ------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        cfg = self.optimizer_config
        params = [p for p in self.parameters() if p.requires_grad]
        fused = cfg.fused
        if fused is None:
            fused = not _loss_scaling(self.trainer) and all(p.device.type in ("cpu", "cuda") for p in params)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps,
                                      fused=fused or None)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        # Imported here: transformers.optimization imports its trainer utilities, and with them peft and
        # bitsandbytes (1.5 s, and a warning about optional kernels) in every process that imports alignkit.
        from transformers import get_scheduler

        scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and not _loss_scaling(self.trainer) and gradient_clip_val:
            # bf16 autocast scales no loss, so a fused optimiser has nothing to unscale and clipping is exact;
            # Lightning's MixedPrecision refuses to clip for any fused optimiser (a concern of 16-mixed only)
            algorithm = GradClipAlgorithmType((gradient_clip_algorithm or self.trainer.gradient_clip_algorithm
                                               or "norm").lower())
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after its forward: free them now, so one
        # copy of every trained weight is not held through data loading and the whole next forward.
        optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int):
        with ops.training_attention(self.device.type, self.compute_dtype()):
            return self._training_step(batch)

    def compute_dtype(self) -> torch.dtype:
        """The dtype the policy's matrix products run in: autocast's, else the weights'."""
        if torch.is_autocast_enabled(self.device.type):
            return torch.get_autocast_dtype(self.device.type)
        return next(self.policy.parameters()).dtype

    def _training_step(self, batch):
        if self.algorithm.online:
            return self.online_step(batch)
        out = self.loss(batch)
        if out is None:
            return None
        if self.should_log(stepped=False):
            self.log_stats(out.stats, prefix="", batch=batch, extra={"train/loss": out.loss.detach()})
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)
        return self.backward_loss(out, parts=self.trainer.accumulate_grad_batches)  # Lightning divides by parts

    def backward_loss(self, out: LossOutput, parts: int) -> Tensor:
        """What to differentiate (divided by ``parts``) for one of the ``parts`` micro-batches of an optimiser step,
        so that the step's gradient is one mean over the whole step (see :class:`alignkit.aggregation.StepMean`)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        reachable = self._trainer is None or not isinstance(self.trainer.strategy, DeepSpeedStrategy)
        return self.step_mean.backward_loss(out.loss, out.units, parts, self.world_size, reachable, self.reduce_mean)

    def mean_gradients(self) -> None:
        """Turn the summed gradients of the step's micro-batches into one mean over the step's units."""
        self.step_mean.rescale(self.parameters(), self.world_size, self.reduce_sum, self.device)

    def validation_step(self, batch, batch_idx: int):
        if self.algorithm.online:
            return None  # online algorithms are evaluated by `alignkit eval`
        out = self.loss(batch, stage="val")
        if out is not None:
            self.log_stats(out.stats, prefix="val/", batch=batch, extra={"val/loss": out.loss.detach()}, on_epoch=True)

    def loss(self, batch, stage: str = "train") -> LossOutput | None:
        """The algorithm's loss on ``batch``; None when it is not finite and ``skip_nonfinite`` skips the batch."""
        out = call_first(self.pm, "alignkit_loss", LossOutput, module=self, batch=batch)
        if not torch.isfinite(out.loss).all():
            return self.nonfinite(f"{stage} loss", out.loss)
        return out

    def nonfinite(self, quantity: str, value: Tensor) -> None:
        """Stop the run (``NonFiniteError``) or, with ``skip_nonfinite``, report the skipped batch (None)."""
        values = value.detach().float().flatten()
        bad = values[~torch.isfinite(values)]
        message = (f"step {self.global_step}: {quantity} is not finite ({bad.numel()} of {values.numel()} values, "
                   f"e.g. {bad[:4].tolist()})")
        if not self.skip_nonfinite:
            raise NonFiniteError(message + "; set model.skip_nonfinite=true to skip such batches")
        self.print(f"skipping batch: {message}")
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give NaN/inf gradients: stop, or (``skip_nonfinite``) drop every gradient so
        that the optimiser step leaves the weights and its moments unchanged. Skipped under a gradient scaler
        (fp16), which handles overflowing gradients itself by skipping the step."""
        self.mean_gradients()  # before Lightning clips the gradients
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        named = [(n, p) for n, p in self.named_parameters() if p.grad is not None]
        if not named:
            return
        # One fused pass: a NaN/inf gradient has a NaN/inf norm. (A huge finite norm that overflows falls
        # through to the exact per-parameter check below, which also names the culprit.)
        if bool(torch.isfinite(torch.nn.utils.get_total_norm([p.grad for _, p in named])).all()):
            return
        finite = torch.stack([torch.isfinite(p.grad).all() for _, p in named])
        if bool(finite.all()):
            return
        bad = (~finite).nonzero().flatten().tolist()
        name, parameter = named[bad[0]]
        others = f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
        self.nonfinite(f"gradient of {name}{others}", parameter.grad)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def online_step(self, batch) -> None:
        if self.algorithm.samples_per_prompt > 1:
            batch = batch.repeat_interleave(self.algorithm.samples_per_prompt)
        rollout = call_first(self.pm, "alignkit_rollout", Rollout, module=self, batch=batch)
        scored = self.score(rollout)
        if scored is None:
            return None  # a reward was not finite and the batch is skipped
        scores, reward_stats = scored
        if not torch.isfinite(scores).all():
            return self.nonfinite("reward", scores)
        experience = call_first(self.pm, "alignkit_experience", object, module=self, rollout=rollout, scores=scores)
        update_stats = self.update(experience)
        call_each(self.pm, "alignkit_after_update", object, module=self, experience=experience, stats=update_stats)
        if self.should_log(stepped=True):
            metrics = {**reward_stats, **update_stats}
            for extra in call_each(self.pm, "alignkit_metrics", dict, module=self, rollout=rollout, experience=experience):
                metrics.update(extra)
            metrics["train/lr"] = self.optimizers().param_groups[0]["lr"]
            self.log_dict(metrics, on_step=True, batch_size=len(rollout.prompts), sync_dist=self.world_size > 1)
        self.record_completions(rollout, scores)
        self.lr_schedulers().step()

    def record_completions(self, rollout: Rollout, scores: Tensor) -> None:
        """Append a few samples of this step to ``completions.jsonl`` and to the wandb completions table.
        The table is logged whole each time, so every step's rows stay visible (never overwritten)."""
        n = min(self.completions_per_step, len(rollout.prompts))
        if n == 0 or not self.trainer.is_global_zero:
            return
        rows = [[self.global_step, rollout.prompts[i], rollout.responses[i], float(scores[i])] for i in range(n)]
        self.completion_rows.extend(rows)
        path = Path(self.trainer.default_root_dir) / "completions.jsonl"
        with path.open("a") as f:
            for step, prompt, response, score in rows:
                f.write(json.dumps({"step": step, "prompt": prompt, "response": response, "score": score}) + "\n")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("completions", columns=["step", "prompt", "response", "score"],
                                 data=self.completion_rows[-2000:], step=self.global_step)

    def update(self, experience: Any) -> dict[str, float]:
        """``update_epochs`` passes over the experience; each minibatch (a list of micro-batches whose
        gradients accumulate) is one optimiser step. Returns the mean of the loss statistics."""
        algorithm, optimizer = self.algorithm, self.optimizers()
        totals: dict[str, float] = {}
        count = 0
        for _ in range(algorithm.update_epochs):
            epoch_kl, epoch_n = 0.0, 0
            minibatches = call_first(self.pm, "alignkit_minibatches", Iterable, module=self, experience=experience)
            for micro_batches in minibatches:
                for micro in micro_batches:
                    out = self.loss(micro)
                    if out is None:
                        continue
                    self.manual_backward(self.backward_loss(out, parts=len(micro_batches)) / len(micro_batches))
                    for key, value in out.stats.items():
                        totals[key] = totals.get(key, 0.0) + float(value)
                    count += 1
                    epoch_kl += float(out.stats.get("policy/approxkl", 0.0))
                    epoch_n += 1
                self.mean_gradients()
                if algorithm.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=algorithm.max_grad_norm, gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # not held through the next rollout and experience
            if algorithm.target_approx_kl is not None and epoch_n and epoch_kl / epoch_n > algorithm.target_approx_kl:
                break  # early stop: the policy moved too far from the sampling policy
        return {key: total / max(count, 1) for key, total in totals.items()}

    def score(self, rollout: Rollout) -> tuple[Tensor, dict[str, float]] | None:
        """Every reward plugin scores the rollout; the weighted sum is normalised and clipped. None when a
        reward is not finite and ``skip_nonfinite`` skips the batch."""
        outputs: list[RewardOutput] = call_each(self.pm, "alignkit_score", RewardOutput, prompts=rollout.prompts,
                                                responses=rollout.responses, rollout=rollout)
        if not outputs:
            raise PluginError("no reward plugin scored the rollout: list at least one under model.rewards")
        weights = {r.reward_name: r.weight for r in self.rewards}
        named = {o.name: o.scores.to(self.device).float() for o in outputs}
        for name, part in named.items():
            if not torch.isfinite(part).all():  # before normalisation: running statistics must stay finite
                return self.nonfinite(f"reward {name!r}", part)
        combined, parts = combine_rewards(named, {name: weights.get(name, 1.0) for name in named})
        stats = {f"objective/scores/{name}": float(part.mean()) for name, part in parts.items()} if len(parts) > 1 else {}
        for o in outputs:
            stats.update({f"rewards/{o.name}/{k}": float(v) for k, v in o.stats.items()})
        stats["objective/scores"] = float(combined.mean())
        cfg = self.reward_combination
        # Normalise with the statistics of the global batch, so every rank shapes rewards identically.
        everyone = self.gather_rows(combined.detach())  # (world, B)
        combined = normalize_rewards(everyone.flatten(), cfg.normalize, self.reward_moments, cfg.clip)
        return combined.view_as(everyone)[self.global_rank], stats

    # ------------------------------------------------------------------------------------------ distributed
    @property
    def world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over data-parallel ranks (identity on one process)."""
        return self.trainer.strategy.reduce(tensor, reduce_op="sum") if self.world_size > 1 else tensor

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean over data-parallel ranks (identity on one process)."""
        return self.trainer.strategy.reduce(tensor, reduce_op="mean") if self.world_size > 1 else tensor

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` stacked: ``(world, *shape)`` (same shape on every rank)."""
        return self.all_gather(tensor) if self.world_size > 1 else tensor.unsqueeze(0)

    # ------------------------------------------------------------------------------------------ logging
    def should_log(self, stepped: bool) -> bool:
        """Whether this training step's metrics reach the loggers. Lightning writes ``on_step`` metrics every
        ``trainer.log_every_n_steps`` batches, but every ``self.log`` pays its bookkeeping on every step, so
        the other steps skip logging (and building the metrics). The first and the last step always log, so
        ``metrics.json``'s ``first``/``final`` are exact. ``stepped``: the optimiser already stepped for this
        batch (online steps log after their update)."""
        trainer = self._trainer
        if trainer is None or not self._logged_a_step or trainer._logger_connector.should_update_logs:
            self._logged_a_step = True
            return True
        if 0 < trainer.max_steps <= trainer.global_step + (0 if stepped else 1):
            return True
        max_epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else float("inf")
        return trainer.is_last_batch and trainer.current_epoch + 1 >= max_epochs

    def log_stats(self, stats: dict[str, Any], prefix: str, batch: Any, extra: dict[str, Any], on_epoch: bool = False):
        size = getattr(batch, "num_pairs", None) or len(getattr(batch, "input_ids", [0]))
        values = {**extra, **{prefix + k: v for k, v in stats.items()}}
        self.log_dict(values, on_step=not on_epoch, on_epoch=on_epoch,
                      batch_size=size, prog_bar=False, sync_dist=on_epoch or self.world_size > 1)

    # ------------------------------------------------------------------------------------------ checkpoints
    FROZEN_PREFIXES = ("reference.", "rewards.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen models are rebuilt from their sources at start-up: checkpoints hold only what trains.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(self.FROZEN_PREFIXES)}
        checkpoint["alignkit"] = {"reward_moments": self.reward_moments.state_dict(),
                                  "algorithm": getattr(self.algorithm, "extra_state", dict)(),
                                  "rng": rng_states(self.owned_generators())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # (a model-parallel strategy has already loaded the weights itself)
            frozen = {k: v for k, v in self.state_dict().items() if k.startswith(self.FROZEN_PREFIXES)}
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **frozen}
        state = checkpoint.get("alignkit", {})
        if "reward_moments" in state:
            self.reward_moments.load_state_dict(state["reward_moments"])
        if state.get("algorithm") and hasattr(self.algorithm, "load_extra_state"):
            self.algorithm.load_extra_state(state["algorithm"])
        if "rng" in state and self._trainer is not None:  # resuming a fit, not just reading weights
            set_rng_states(state["rng"], self.owned_generators())

    def owned_generators(self) -> dict[str, torch.Generator]:
        """The ``torch.Generator`` attributes of the algorithm and the reward plugins, by dotted name."""
        owners = [("algorithm", self.algorithm), *((f"rewards.{i}", r) for i, r in enumerate(self.rewards))]
        return {f"{prefix}.{attr}": value for prefix, owner in owners for attr, value in vars(owner).items()
                if isinstance(value, torch.Generator)}
