"""Keep freed host memory in the process, so that a training step on CPU does not page-fault on fresh memory.

PyTorch's CPU allocator asks glibc's ``malloc`` for every tensor and frees it straight back. glibc returns large
blocks to the operating system: blocks above its mmap threshold are unmapped on ``free``, and free memory at the
top of the heap beyond its trim threshold is released. The next step's tensors of the same sizes (activations,
bf16 weight casts, gradients) then land on new pages, and the kernel faults in and zeroes each 4 KiB page again,
a sizeable part of a CPU step's time (measured: see benchmarks/README.md#cpu-memory).

Setting both thresholds high, and letting no block be mapped on its own (blocks above the 32 MiB cap of the mmap
threshold, such as a 32k-vocabulary logits tensor or a dense embedding gradient, would be mapped and unmapped at
every step otherwise), makes glibc reuse the freed blocks instead. The process's resident size then stays
at its high-water mark rather than shrinking between steps; the high-water mark itself is what the peak-memory
benchmark measures. Set any ``MALLOC_*_`` environment variable (e.g. ``MALLOC_TRIM_THRESHOLD_``) to keep
control of glibc's allocator yourself; nothing is changed then, nor on other C libraries.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: Blocks up to this size come from the heap and are reused (glibc's upper limit for the threshold on 64-bit).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of the heap is kept up to this size (the largest value ``mallopt`` takes).
TRIM_THRESHOLD = 2**31 - 1
#: No block gets a mapping of its own: larger ones come from the heap too (glibc still maps memory when the heap
#: cannot grow).
MMAP_MAX = 0

_applied = False


def glibc() -> ctypes.CDLL | None:
    """The process's glibc, or ``None`` on another C library or platform."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError on musl and others
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS.

    Returns whether the settings are in effect: false on a non-glibc platform, and when the user set a
    ``MALLOC_*_`` environment variable (their settings win). Process-wide and idempotent."""
    global _applied
    if _applied:
        return True
    if any(name.startswith("MALLOC_") and name.endswith("_") for name in os.environ):
        return False
    libc = glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_MMAP_MAX, MMAP_MAX))
    _applied = all([libc.mallopt(param, value) == 1 for param, value in settings])  # a list: every one is tried
    return _applied
