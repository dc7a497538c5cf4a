"""The LightningModule that holds the models and delegates the math to the selected algorithm plugin.

Lightning owns the loop (devices, strategies, precision, checkpointing, logging); the algorithm owns the
math through the hooks of :mod:`alignkit.hookspecs`. Offline algorithms use automatic optimisation:
one ``alignkit_loss`` per batch. Online algorithms use manual optimisation: rollout → score →
experience → ``update_epochs`` × minibatches of updates, all inside one ``training_step``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from alignkit import ops, process
from alignkit.aggregation import StepMean
from alignkit.distributed import DataParallel
from alignkit.errors import NonFiniteError, PluginError
from alignkit.export import export_model
from alignkit.host_checkpoint import CheckpointState
from alignkit.manager import build_manager, call_each, call_first
from alignkit.models.dropout import disable_dropout as zero_dropout
from alignkit.models.frozen_precision import store_in_compute_dtype
from alignkit.models.loading import ModelConfig, load_model
from alignkit.optim import OptimizerConfig, OptimizerHooks
from alignkit.plugin import Algorithm, OnlineAlgorithm, Reward
from alignkit.rewards import RunningMoments
from alignkit.scoring import RewardCombination, Scoring
from alignkit.step_logging import StepLogging
from alignkit.types import LossOutput, Rollout

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["AlignModule", "NonFiniteError", "OptimizerConfig", "PluginError", "RewardCombination"]


class AlignModule(DataParallel, OptimizerHooks, Scoring, StepLogging, CheckpointState, L.LightningModule):
    """Policy, optional frozen reference, reward plugins and the algorithm plugin that trains them.

    This module keeps the models, the loop and the steps. Elsewhere: reductions over ranks and FSDP2 sharding
    (:class:`alignkit.distributed.DataParallel`), the optimiser and its hooks (:class:`alignkit.optim.OptimizerHooks`),
    the combined reward of online samples (:class:`alignkit.scoring.Scoring`), which steps log
    (:class:`alignkit.step_logging.StepLogging`), checkpoint contents
    (:class:`alignkit.host_checkpoint.CheckpointState`), export (:mod:`alignkit.export`), process-wide settings
    (:mod:`alignkit.process`) and the completions of online steps (the :class:`alignkit.completions.Completions`
    callback, added by :meth:`configure_callbacks`)."""

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
                measured in benchmarks/README.md#cpu-memory). Process-wide; skipped when a ``MALLOC_*_`` variable is
                set.
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
        self.sampled: tuple[Rollout, Tensor] | None = None  # this online batch's samples, for `Completions`
        self._logged_a_step = False  # by this process: see `should_log`
        self.policy, self.tokenizer = load_model(policy, algorithm.model_head)
        self.policy.train()  # `from_pretrained` returns eval mode; the trained model must run in train mode
        self.reference = self._build_reference(reference) if algorithm.needs_reference else None
        self.rewards = nn.ModuleList(rewards or [])
        names = [r.name for r in rewards or []]
        if len(set(names)) < len(names):
            raise ValueError(f"model.rewards: two rewards share a name ({', '.join(names)}); "
                             "give each a distinct `name`")
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
            raise PluginError(f"algorithm {type(self.algorithm).__name__} trains on {self.algorithm.data_kind} data, "
                              f"but data is {type(data).__name__} ({kind}); choose a matching data class_path")
        process.apply_process_settings(self.retain_cpu_memory, self.trainer.strategy.root_device.type)
        precision = self.trainer.precision_plugin
        if isinstance(precision, MixedPrecision):
            # Autocast would cast the frozen models' weights at every forward; they never change, so cast once.
            dtype = precision.autocast_context_manager().fast_dtype
            for frozen in (self.reference, self.rewards):
                if frozen is not None:
                    store_in_compute_dtype(frozen, dtype)

    def configure_callbacks(self) -> list[L.Callback]:
        from alignkit.completions import Completions

        return [Completions(self.completions_per_step)] if self.algorithm.online else []

    # ------------------------------------------------------------------------------------------ models
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
        elif hasattr(self.policy, "disable_adapter"):  # a peft wrapper
            with cast("PeftModel", self.policy).disable_adapter():
                yield self.policy
        else:
            raise PluginError(f"algorithm {self.algorithm.name} asked for a reference model but none was built")

    def release_reference(self) -> bool:
        """Free the frozen reference copy once an algorithm needs it no more (e.g. DPO after precomputing its
        log-probs); True when a copy was dropped. Only on a single device: multi-device strategies hold references
        to the wrapped modules, so the copy stays (and with LoRA there is no copy). Checkpoints never hold it."""
        from lightning.pytorch.strategies import SingleDeviceStrategy

        if self.reference is None or not isinstance(self.trainer.strategy, SingleDeviceStrategy):
            return False
        self.reference = None
        return True

    def dataloaders_to_precompute(self) -> list[Iterable] | None:
        """The training and validation loaders of the data module, for an algorithm that precomputes over the
        whole data before training (e.g. DPO's reference log-probs); None without a Lightning data module."""
        data = getattr(self.trainer, "datamodule", None)
        return None if data is None else [data.train_dataloader(), data.val_dataloader()]

    def train(self, mode: bool = True):
        super().train(mode)
        for frozen in (self.reference, self.rewards):
            if frozen is not None:
                frozen.eval()  # frozen models never run dropout
        return self

    def export(self, path: str, state_dict: dict[str, Tensor] | None = None) -> None:
        """Write the trained model and tokenizer with ``save_pretrained`` (:func:`alignkit.export.export_model`)."""
        export_model(self, path, state_dict)

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
            self.nonfinite(f"{stage} loss", out.loss)
            return None
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

    def online_step(self, batch) -> None:
        self.sampled = None
        algorithm = cast(OnlineAlgorithm, self.algorithm)  # online algorithms derive from OnlineAlgorithm
        if algorithm.samples_per_prompt > 1:
            batch = batch.repeat_interleave(algorithm.samples_per_prompt)
        rollout = call_first(self.pm, "alignkit_rollout", Rollout, module=self, batch=batch)
        scored = self.score(rollout)
        if scored is None:
            return None  # a reward was not finite and the batch is skipped
        scores, reward_stats = scored
        if not torch.isfinite(scores).all():
            self.nonfinite("reward", scores)
            return None
        experience = call_first(self.pm, "alignkit_experience", object, module=self, rollout=rollout, scores=scores)
        update_stats = self.update(experience)
        call_each(self.pm, "alignkit_after_update", object, module=self, experience=experience, stats=update_stats)
        if self.should_log(stepped=True):
            metrics = {**reward_stats, **update_stats}
            for extra in call_each(self.pm, "alignkit_metrics", dict, module=self, rollout=rollout,
                                   experience=experience):
                metrics.update(extra)
            metrics["train/lr"] = cast(LightningOptimizer, self.optimizers()).param_groups[0]["lr"]  # one optimiser
            self.log_dict(metrics, on_step=True, batch_size=len(rollout.prompts), sync_dist=self.world_size > 1)
        self.sampled = (rollout, scores)  # recorded by the `Completions` callback at the end of the batch
        cast(LRScheduler, self.lr_schedulers()).step()  # the one per-step schedule of `configure_optimizers`

    def update(self, experience: Any) -> dict[str, float]:
        """``update_epochs`` passes over the experience; each minibatch (a list of micro-batches whose
        gradients accumulate) is one optimiser step. Returns the mean of the loss statistics."""
        # Online algorithms derive from OnlineAlgorithm; `configure_optimizers` returns one optimiser.
        algorithm, optimizer = cast(OnlineAlgorithm, self.algorithm), cast(LightningOptimizer, self.optimizers())
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
                    if algorithm.target_approx_kl is not None:
                        epoch_kl += approx_kl(out)
                    epoch_n += 1
                self.mean_gradients()
                if algorithm.max_grad_norm is not None:
                    self.clip_gradients(optimizer, gradient_clip_val=algorithm.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # not held through the next rollout and experience
            if algorithm.target_approx_kl is not None and epoch_n and epoch_kl / epoch_n > algorithm.target_approx_kl:
                break  # early stop: the policy moved too far from the sampling policy
        return {key: total / max(count, 1) for key, total in totals.items()}


def approx_kl(out: LossOutput) -> float:
    """``out.approx_kl`` (0 when not measured). A loss that only logs the stat ``policy/approxkl``, as alignkit's
    losses did before ``LossOutput.approx_kl``, still counts, with a DeprecationWarning."""
    if out.approx_kl is not None:
        return float(out.approx_kl)
    if "policy/approxkl" in out.stats:
        warnings.warn("the host reads the approximate KL for target_approx_kl from LossOutput.approx_kl; set it "
                      "instead of relying on the stat 'policy/approxkl'", DeprecationWarning, stacklevel=2)
        return float(out.stats["policy/approxkl"])
    return 0.0
