"""Test-only: Lightning's ``FSDPStrategy`` on CPU processes (gloo), so CI runs sharded training without a GPU.

Lightning refuses ``FSDPStrategy`` on CPU and passes FSDP no device there, which torch's FSDP then refuses; this
subclass passes Lightning's check (it tests the exact type) and gives FSDP the CPU as its device. Everything
else (auto-wrapping, FULL_SHARD, the optimiser, gradient reduce-scatter, the final weight gathering) is
Lightning's and torch's code as on GPUs. Checkpoints are off in these runs: FSDP's CPU-offloaded full state
dict crashes when the parameters already live on the CPU.
"""

import torch
from lightning.pytorch.strategies import FSDPStrategy


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                        sharding_strategy=self.sharding_strategy,
                                        mixed_precision=self.mixed_precision_config, device_id=torch.device("cpu"),
                                        **self.kwargs)
