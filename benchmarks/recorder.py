"""Per-step end times, token counts and phase times of one measurement, on two clocks."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any


class StepRecorder:
    """End time, token counts and phase times of every training step of one measurement, on two clocks:
    wall time (``time/*``) and the process's CPU time (``cpu/*``). With one thread on a shared CPU the CPU
    time counts only this process's own work, while the wall time also counts the neighbours' load."""

    def __init__(self, device: str):
        self.device = device
        self.ends: list[tuple[float, float]] = []
        self.start = (0.0, 0.0)
        self.steps: list[dict[str, float]] = []  # per step: tokens, padded, phase times, ...
        self.current: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()

    def begin(self) -> None:
        self.start = self.now()

    def add(self, key: str, value: float) -> None:
        self.current[key] = self.current.get(key, 0.0) + float(value)

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = self.now()
        try:
            yield
        finally:
            wall_end, cpu_end = self.now()
            self.add(f"time/{name}", wall_end - wall)
            self.add(f"cpu/{name}", cpu_end - cpu)

    def end_step(self) -> None:
        self.ends.append(self.now())
        self.steps.append(self.current)
        self.current = {}

    def summary(self, warmup: int) -> dict[str, Any]:
        """Per-step times (end to end, data loading included) and token counts after ``warmup`` steps."""
        bounds = list(zip([self.start, *self.ends[:-1]], self.ends))
        kept = list(range(min(warmup, max(len(bounds) - 1, 0)), len(bounds)))
        steps = [{**self.steps[i], "time/step": bounds[i][1][0] - bounds[i][0][0],
                  "cpu/step": bounds[i][1][1] - bounds[i][0][1]} for i in kept]
        keys = sorted({k for s in steps for k in s})
        return {"steps_measured": len(steps), "per_step": steps,
                "median": {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys} if steps else {},
                "total": {k: sum(s.get(k, 0.0) for s in steps) for k in keys}}


def batch_tokens(batch) -> tuple[float, float, float]:
    """(real tokens, padded tokens, padded length) of a collated batch."""
    mask = batch.attention_mask
    return float(mask.sum()), float(mask.numel()), float(mask.shape[1])


def shared_prompt_tokens(batch) -> tuple[float, float]:
    """(real tokens, padded length) of a preference batch in the shared-prompt layout (``alignkit.pairs``)."""
    from alignkit.pairs import PAD, share_prompts

    segment = share_prompts(batch).segment
    return float((segment != PAD).sum()), float(segment.shape[1])
