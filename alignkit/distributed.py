"""What the host needs to run on several processes: reductions over the data-parallel ranks, FSDP2 sharding under
Lightning's ``ModelParallelStrategy`` and gathering the policy's full weights (for generation and for export).

:class:`DataParallel` is a mixin of :class:`alignkit.module.AlignModule`: plugins call ``module.world_size``,
``module.reduce_sum``, ``module.reduce_mean`` and ``module.gather_rows``, identities on one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar, cast

from torch import Tensor, nn

if TYPE_CHECKING:
    # The mixin is combined with `LightningModule` in `AlignModule`; type checkers see that base, run time does not
    # (importing Lightning here would slow down `import alignkit.distributed`, which `alignkit.defaults` does).
    from lightning import LightningModule as _LightningModule
    from peft import PeftModel
    from transformers import PreTrainedModel

    from alignkit.plugin import Algorithm
else:
    _LightningModule = object


class DataParallel(_LightningModule):
    """Reductions over data-parallel ranks and FSDP2 sharding, for a ``LightningModule`` with a ``policy``, an
    ``algorithm`` and ``FROZEN_PREFIXES`` (the state-dict prefixes of the frozen models)."""

    # Set by the host (`AlignModule`): declared here for type checkers only.
    policy: PreTrainedModel | PeftModel
    algorithm: Algorithm
    FROZEN_PREFIXES: ClassVar[tuple[str, ...]]

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
        # (`all_gather` also takes collections of tensors, hence its loose return type)
        return cast(Tensor, self.all_gather(tensor)) if self.world_size > 1 else tensor.unsqueeze(0)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy``, shard what trains with FSDP2 (``fully_shard``) over the
        data-parallel mesh: each decoder layer of the policy (its ``_no_split_modules`` classes), then the policy
        itself, and each submodule of the algorithm that trains (e.g. a value head or a separate critic). The
        frozen reference and reward models stay whole on every rank. Other strategies: nothing to do."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard
        from torch.distributed.tensor import DTensor

        from alignkit.errors import PluginError
        from alignkit.ops import unwrap_peft

        if isinstance(self.policy, FSDPModule):
            return  # already sharded (configure_model runs again for a later fit/validate)
        # The strategy loads a resumed checkpoint into the sharded model itself, before `on_load_checkpoint` can
        # add the frozen models' weights that checkpoints leave out (they are rebuilt from their sources).
        self.strict_loading = not any(k.startswith(self.FROZEN_PREFIXES) for k in self.state_dict())
        assert self.device_mesh is not None  # ModelParallelStrategy sets it up before `configure_model`
        mesh = self.device_mesh["data_parallel"]
        units = tuple(getattr(self.policy, "_no_split_modules", None) or ())
        for module in self.policy.modules():
            if type(module).__name__ in units:
                fully_shard(module, mesh=mesh)
        base = cast("PreTrainedModel", unwrap_peft(self.policy))
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


def zero3(module) -> bool:
    """Whether ``module`` trains under DeepSpeed ZeRO stage 3 (parameters sharded over the ranks)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = module.trainer.strategy if module._trainer is not None else None
    if not isinstance(strategy, DeepSpeedStrategy):
        return False
    assert strategy.config is not None  # DeepSpeedStrategy.__init__ always builds its config
    return strategy.config.get("zero_optimization", {}).get("stage") == 3


@contextmanager
def full_parameters(module) -> Iterator[None]:
    """Make the policy's full weights available on every rank for generation.

    Under FSDP2 (``ModelParallelStrategy``) every shard unit is gathered once and kept whole for the whole
    decoding loop (not re-gathered at each decoding step); under DeepSpeed ZeRO-3 the parameters are gathered
    with ``GatheredParameters`` (read only; tested on CPU processes). DDP, ZeRO-1/2 and single-device runs
    hold full weights already; online algorithms refuse FSDP1's ``FSDPStrategy`` (see ``AlignModule.setup``).
    """
    from torch.distributed.fsdp import FSDPModule

    policy: nn.Module = module.policy
    if isinstance(policy, FSDPModule):  # FSDP2: gather every unit once, keep it whole while decoding
        units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:
                unit.set_reshard_after_forward(True, recurse=False)
                unit.reshard()
    elif zero3(module):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.policy.parameters()), modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(module) -> dict | None:
    """The policy's full weights for export, gathered from every rank when the strategy shards them (FSDP,
    FSDP2, DeepSpeed ZeRO-3): a collective, so every rank calls it; rank 0 receives the weights (on the CPU off
    a GPU) and the other ranks ``{}``. ``None`` when the policy already holds its full weights (single device,
    DDP, ZeRO-1/2).
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module.policy, FSDPModule):  # FSDP2: the policy is its own root
        return _gather_full(module, module.policy, prefix="")
    if module._trainer is not None and isinstance(module.trainer.strategy, FSDPStrategy):  # FSDP1 wraps the host
        return _gather_full(module, module.trainer.strategy.model, prefix="policy.")
    if zero3(module):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.policy.parameters()), modifier_rank=None):
            if not module.trainer.is_global_zero:
                return {}
            return {k: v.detach().cpu().clone() for k, v in module.policy.state_dict().items()}
    return None


def _gather_full(module, root, prefix: str) -> dict:
    """``root``'s full state dict from ``torch.distributed.checkpoint``, its ``prefix`` keys without the prefix."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    offload = module.device.type != "cpu"  # with offloading, only rank 0 receives the full copy
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    if offload and not module.trainer.is_global_zero:
        return {}
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
