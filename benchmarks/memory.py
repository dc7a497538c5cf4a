"""Resident-set-size probes (CPU peak memory)."""

from __future__ import annotations

import os
import resource
import sys


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil is a dependency of lightning's extras, not guaranteed
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's maximum resident set size so far, in bytes (a high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory(device: str, rss0: int) -> dict:
    """The measurement's peak memory: CUDA's allocator peak, or the RSS growth above ``rss0``."""
    if device.startswith("cuda"):
        import torch

        return {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "memory_kind": "cuda max_memory_allocated"}
    return {"peak_mem_mb": max(peak_rss() - rss0, 0) / 2**20, "peak_rss_mb": peak_rss() / 2**20,
            "memory_kind": "max RSS growth above the post-import RSS"}
