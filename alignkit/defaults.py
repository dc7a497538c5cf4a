"""Built-in default hook implementations, registered ``trylast`` in every run so that any plugin can
replace them (e.g. a vLLM rollout engine answering ``alignkit_rollout`` first)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from alignkit.plugin import hookimpl
from alignkit.types import PromptBatch, Rollout


@contextmanager
def full_parameters(module) -> Iterator[None]:
    """Make the policy's full weights available on every rank for generation.

    Under FSDP the parameters are sharded, so they are gathered with ``summon_full_params`` (no
    write-back: generation only reads them); under DeepSpeed ZeRO-3 with ``GatheredParameters``. DDP and
    single-device runs hold full weights already. The sharded paths need a GPU and were not exercised on
    the CPU-only machines this was written on.
    """
    strategy = type(module.trainer.strategy).__name__ if module._trainer is not None else ""
    if strategy == "FSDPStrategy":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(module.trainer.strategy.model, writeback=False, recurse=True):
            yield
    elif strategy == "DeepSpeedStrategy" and module.trainer.strategy.config.get("zero_optimization", {}).get("stage") == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.policy.parameters()), modifier_rank=None):
            yield
    else:
        yield


class DefaultRollout:
    """Samples with the policy through :func:`alignkit.rollout.generate`, using the algorithm's
    ``sampling`` settings (a :class:`~alignkit.rollout.SamplingConfig`)."""

    @hookimpl(trylast=True)
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout:
        from alignkit.rollout import SamplingConfig, generate

        sampling = getattr(module.algorithm, "sampling", None) or SamplingConfig()
        batch = batch.to(module.device)
        with full_parameters(module):
            return generate(module.policy, module.tokenizer, batch.input_ids, batch.attention_mask, batch.prompts,
                            sampling)


DEFAULTS = [DefaultRollout()]
