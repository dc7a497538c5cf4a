"""Test-only: Lightning's ``DeepSpeedStrategy`` on CPU processes, so DeepSpeed's ZeRO paths run without a GPU.

Lightning refuses DeepSpeed on anything but CUDA; DeepSpeed itself runs on the CPU through its CPU accelerator
(``DS_ACCELERATOR=cpu``, gloo collectives). This subclass only skips Lightning's CUDA checks and passes the local
rank where Lightning passes the GPU index; the ZeRO optimiser, partitioning, gradient reduction, checkpoints and
the final weight gathering are DeepSpeed's and Lightning's code as on GPUs.

One thing is left out: the shared-memory all-reduce kernel that DeepSpeed's CPU accelerator compiles with the host's
C++ compiler when it sets up its communication backend (~1 min on a fresh 2-core machine, the cache then shared by
every process). Only DeepSpeed's tensor-parallel inference layers call it (``inference_all_reduce``); ZeRO training
reduces through ``torch.distributed`` (gloo) either way, and on GPUs there is no such kernel.
"""

import argparse
import importlib
from unittest import mock

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own check accepts only CUDAAccelerator

    def setup_distributed(self) -> None:  # as DeepSpeedStrategy's, without its GPU-index check (CPU devices have none)
        backend = importlib.import_module("deepspeed.comm.torch")  # (the attribute `deepspeed.comm.torch` is torch)

        reset_seed()
        self.set_world_ranks()
        with mock.patch.object(backend, "build_shm_op", return_value=None):  # see the module docstring
            self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed  # as DeepSpeedStrategy's, with the local rank as device rank (a CPU device has no index)

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad], optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False)
        return engine, deepspeed_optimizer
