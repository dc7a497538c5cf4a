"""The host's optimiser: AdamW (fused when it can be) with its learning-rate schedule, gradient clipping under
``bf16-mixed`` with a fused optimiser, one gradient mean over each optimiser step's micro-batches and ranks, and
the check for NaN/inf gradients before each optimiser step. :class:`OptimizerHooks` is a mixin of
:class:`alignkit.module.AlignModule`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from torch import Tensor

if TYPE_CHECKING:
    # The mixin is combined with `LightningModule` in `AlignModule`: type checkers see that base, run time does not.
    from lightning import LightningModule as _LightningModule

    from alignkit.aggregation import StepMean
    from alignkit.types import LossOutput
else:
    _LightningModule = object


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate (reached after ``warmup_steps``)."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's decay rates of the first and second moment estimates."""
    eps: float = 1e-8
    """AdamW's term added to the denominator for numerical stability."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up from 0 to ``lr``."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, over the trainer's total optimiser steps."""
    fused: bool | None = None
    """PyTorch's fused AdamW kernel (one kernel instead of ~10 ops per parameter); ``None``: fused when every
    trained parameter is on CPU or CUDA and the precision is not ``16-mixed`` (whose loss scaler a fused optimiser
    unscales internally, so Lightning cannot clip its gradients; ``bf16-mixed`` has no scaler)."""


def loss_scaling(trainer: L.Trainer) -> bool:
    """Whether the trainer's precision scales the loss (``16-mixed``'s gradient scaler)."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def build_optimizer(module: L.LightningModule, cfg: OptimizerConfig) -> dict[str, Any]:
    """AdamW over ``module``'s trained parameters and its per-step schedule over the trainer's total steps
    (what ``LightningModule.configure_optimizers`` returns)."""
    params = [p for p in module.parameters() if p.requires_grad]
    fused = cfg.fused
    if fused is None:
        fused = not loss_scaling(module.trainer) and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps,
                                  fused=fused or None)
    total = max(int(module.trainer.estimated_stepping_batches), 1)
    # Imported here: transformers.optimization imports its trainer utilities, and with them peft and
    # bitsandbytes (and a warning about optional kernels) in every process that imports alignkit
    # (benchmarks/README.md#import-time).
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def clip_without_scaler(trainer: L.Trainer, optimizer, gradient_clip_val, gradient_clip_algorithm) -> bool:
    """Clip the gradients under ``bf16-mixed`` (any optimiser, fused included) and return True; False: not
    ``bf16-mixed`` or nothing to clip, and Lightning's own clipping applies.

    bf16 autocast scales no loss, so a fused optimiser has nothing to unscale and clipping is exact; Lightning's
    ``MixedPrecision`` refuses to clip for any fused optimiser (a concern of ``16-mixed`` only)."""
    from lightning.pytorch.plugins.precision import MixedPrecision, Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    plugin = trainer.precision_plugin
    if not (isinstance(plugin, MixedPrecision) and not loss_scaling(trainer) and gradient_clip_val):
        return False
    algorithm = GradClipAlgorithmType((gradient_clip_algorithm or trainer.gradient_clip_algorithm or "norm").lower())
    Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
    return True


def nonfinite_gradients(named: Sequence[tuple[str, Tensor]]) -> list[int]:
    """The positions in ``named`` (``(name, parameter)`` pairs with a gradient) of the parameters whose gradient
    holds a NaN or inf; empty when every gradient is finite."""
    if not named:
        return []
    # One fused pass: a NaN/inf gradient has a NaN/inf norm. (A huge finite norm that overflows falls
    # through to the exact per-parameter check below, which also names the culprit.)
    grads = cast("list[Tensor]", [p.grad for _, p in named])  # each of `named` has a gradient
    if bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).all()):
        return []
    finite = torch.stack([torch.isfinite(g).all() for g in grads])
    return (~finite).nonzero().flatten().tolist()


class OptimizerHooks(_LightningModule):
    """The optimisation hooks of a ``LightningModule`` with an ``optimizer_config`` (:class:`OptimizerConfig`), a
    ``step_mean`` (:class:`alignkit.aggregation.StepMean`), the reductions of :class:`alignkit.distributed.DataParallel`
    and a ``nonfinite(quantity, value)`` method that stops the run or reports a skipped batch."""

    # Provided by the host (`AlignModule`) and its other mixins: declared here for type checkers only.
    optimizer_config: OptimizerConfig
    step_mean: StepMean
    if TYPE_CHECKING:
        @property
        def world_size(self) -> int: ...
        def reduce_sum(self, tensor: Tensor) -> Tensor: ...
        def reduce_mean(self, tensor: Tensor) -> Tensor: ...
        def nonfinite(self, quantity: str, value: Tensor) -> None: ...

    def configure_optimizers(self):
        return build_optimizer(self, self.optimizer_config)

    def clip_gradients(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not clip_without_scaler(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            super().clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes gradients inside the next step's closure, after its forward: free them now, so one
        # copy of every trained weight is not held through data loading and the whole next forward.
        optimizer.zero_grad(set_to_none=True)

    def backward_loss(self, out: LossOutput, parts: int) -> Tensor:
        """What to differentiate (divided by ``parts``) for one of the ``parts`` micro-batches of an optimiser step,
        so that the step's gradient is one mean over the whole step (see :class:`alignkit.aggregation.StepMean`).
        ``out``: the micro-batch's :class:`~alignkit.types.LossOutput`."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        reachable = self._trainer is None or not isinstance(self.trainer.strategy, DeepSpeedStrategy)
        return self.step_mean.backward_loss(out.loss, out.units, parts, self.world_size, reachable, self.reduce_mean)

    def mean_gradients(self) -> None:
        """Turn the summed gradients of the step's micro-batches into one mean over the step's units."""
        self.step_mean.rescale(self.parameters(), self.world_size, self.reduce_sum, self.device)

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give NaN/inf gradients: stop, or (``skip_nonfinite``) drop every gradient so
        that the optimiser step leaves the weights and its moments unchanged. Skipped under a gradient scaler
        (fp16), which handles overflowing gradients itself by skipping the step."""
        self.mean_gradients()  # before Lightning clips the gradients
        if loss_scaling(self.trainer):
            return
        named = [(n, p) for n, p in self.named_parameters() if p.grad is not None]
        bad = nonfinite_gradients(named)
        if not bad:
            return
        name, parameter = named[bad[0]]
        assert parameter.grad is not None  # `named` holds the parameters with a gradient
        others = f" (and {len(bad) - 1} more parameters)" if len(bad) > 1 else ""
        self.nonfinite(f"gradient of {name}{others}", parameter.grad)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
