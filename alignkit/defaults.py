"""Built-in default hook implementations, registered ``trylast`` in every run so that any plugin can
replace them (e.g. a vLLM rollout engine answering ``alignkit_rollout`` first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alignkit.plugin import hookimpl
from alignkit.types import PromptBatch, Rollout


def zero3(module) -> bool:
    """Whether ``module`` trains under DeepSpeed ZeRO stage 3 (parameters sharded over the ranks)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = module.trainer.strategy if module._trainer is not None else None
    return isinstance(strategy, DeepSpeedStrategy) and strategy.config.get("zero_optimization", {}).get("stage") == 3


@contextmanager
def full_parameters(module) -> Iterator[None]:
    """Make the policy's full weights available on every rank for generation.

    Under FSDP2 (``ModelParallelStrategy``) every shard unit is gathered once and kept whole for the whole
    decoding loop (not re-gathered at each decoding step); under DeepSpeed ZeRO-3 the parameters are gathered
    with ``GatheredParameters`` (read only; tested on CPU processes). DDP, ZeRO-1/2 and single-device runs
    hold full weights already; online algorithms refuse FSDP1's ``FSDPStrategy`` (see ``AlignModule.setup``).
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(module.policy, FSDPModule):  # FSDP2: gather every unit once, keep it whole while decoding
        units = [m for m in module.policy.modules() if isinstance(m, FSDPModule)]
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


def rank_sampling_seed(seed: int, rank: int, step: int) -> int:
    """The seed of data-parallel rank ``rank``'s sampling generator at optimiser step ``step`` of a run seeded with
    ``seed``: a 63-bit hash of the three (numpy's ``SeedSequence``), so no two ranks or steps share a stream."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


class DefaultRollout:
    """Samples with the policy through :func:`alignkit.rollout.generate`, using the algorithm's
    ``sampling`` settings (a :class:`~alignkit.rollout.SamplingConfig`).

    Every data-parallel rank must draw its own samples: ``seed_everything`` gives each rank the same global random
    stream, so the same prompt on two ranks would get the same response. Rank 0 samples from the global stream (a
    single-process run is what it always was, and its resume restores that stream); rank ``r > 0`` from a generator
    seeded at each step by :func:`rank_sampling_seed` ``(seed, r, step)``, so it has no state to checkpoint and a
    resumed run draws what an uninterrupted one would."""

    @hookimpl(trylast=True)
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout:
        import os

        import torch

        from alignkit.rollout import SamplingConfig, generate

        sampling = getattr(module.algorithm, "sampling", None) or SamplingConfig()
        batch = batch.to(module.device)
        generator = None
        if module.global_rank > 0:
            seed = rank_sampling_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), module.global_rank, module.global_step)
            generator = torch.Generator(device=module.device).manual_seed(seed)
        with full_parameters(module):
            return generate(module.policy, module.tokenizer, batch.input_ids, batch.attention_mask, batch.prompts,
                            sampling, generator)


DEFAULTS = [DefaultRollout()]
