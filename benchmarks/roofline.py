"""Rooflines: the best FLOP/s of a dense matmul, timed with torch in the same run, on both clocks.

MFU = model FLOPs per second / roofline, where the roofline is the best FLOP/s of a dense
``(tokens × H) @ (H × I)`` matmul of the same size as the step's largest product (``mfu``), and of a large
square matmul (``mfu_peak``, the device's practical peak).
"""

from __future__ import annotations

import time
from typing import Any


def time_matmul(m: int, k: int, n: int, device: str, dtype: str, budget_s: float = 0.3) -> tuple[float, float]:
    """Best FLOP/s of ``(m × k) @ (k × n)`` over repeated trials of about ``budget_s`` in total, on the wall
    clock and on the process CPU clock (on GPU the two are the same wall-clock figure)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(m, k, device=device, dtype=dt)
    b = torch.randn(k, n, device=device, dtype=dt)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(0.02 / once))
    best_wall = best_cpu = float("inf")
    deadline = time.perf_counter() + budget_s
    trials = 0
    while trials < 3 or (time.perf_counter() < deadline and trials < 200):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            a @ b
        sync()
        best_wall = min(best_wall, (time.perf_counter() - wall) / inner)
        best_cpu = min(best_cpu, max(time.process_time() - cpu, 1e-9) / inner)
        trials += 1
    flops = 2.0 * m * k * n
    return flops / best_wall, flops / (best_wall if cuda else best_cpu)


def peak_roofline(device: str, dtype: str, budget_s: float = 1.0, side: int | None = None) -> dict[str, Any]:
    """The device's practical peak: a large square matmul."""
    side = side or (4096 if device.startswith("cuda") else 1024)
    wall, cpu = time_matmul(side, side, side, device, dtype, budget_s)
    return {"shape": [side, side, side], "flops_per_s": wall, "flops_per_s_cpu": cpu}


def compute_dtype(precision: str | None, dtype: str) -> str:
    """The dtype the matrix products run in (what the rooflines time): bfloat16 under ``bf16-mixed``, else ``dtype``."""
    return "bfloat16" if precision == "bf16-mixed" else dtype
