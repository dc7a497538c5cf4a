"""Process-wide settings a training run makes once, when its trainer is set up (``AlignModule.setup``)."""

from __future__ import annotations

import torch

from alignkit.cpu_memory import retain_freed_memory


def apply_process_settings(retain_cpu_memory: bool, device_type: str) -> None:
    """Set what this process keeps for the rest of its life:

    - under deterministic algorithms (``Trainer(deterministic=True)``, which reproducibility needs), torch also
      fills every new uninitialised tensor with NaN by default, a debugging aid for kernels that read memory they
      never wrote (none of ours do: bit-for-bit resume is tested). That fill touched every ``torch.empty`` and cost
      a measurable share of a CPU step (benchmarks/README.md#nan-fill-in-deterministic-runs). It is turned off;
    - ``retain_cpu_memory`` on CPU: glibc keeps freed memory for reuse
      (:func:`alignkit.cpu_memory.retain_freed_memory`).
    """
    if torch.are_deterministic_algorithms_enabled():
        # A property of the module's class (torch swaps the class of `torch.utils.deterministic`), which type
        # checkers do not see: set by name.
        setattr(torch.utils.deterministic, "fill_uninitialized_memory", False)
    if retain_cpu_memory and device_type == "cpu":
        retain_freed_memory()
