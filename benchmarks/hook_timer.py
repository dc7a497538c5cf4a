"""Hook timing as a pluggy wrapper plugin.

The host dispatches every hook through ``pm.hook.<name>(**kwargs)`` (:mod:`alignkit.manager`), so a plugin whose
methods are ``@hookimpl(wrapper=True)`` generators sees every call of every hook, around all of its
implementations. :class:`HookTimer` times each call on the wall clock and on the process CPU clock; give it to a
run like any other plugin (``AlignModule(plugins=[timer])``, or ``model.plugins`` in a recipe)::

    timer = HookTimer()
    module = AlignModule(algorithm=..., plugins=[timer])
    trainer.fit(module, datamodule=data)
    timer.calls["alignkit_loss"]   # [(wall_s, cpu_s), ...], one per call
    timer.totals()                 # {"alignkit_loss": {"calls": n, "wall_s": ..., "cpu_s": ...}, ...}

:class:`PhaseTimer` is the benchmark's: it adds the phases of an online step (rollout, score, experience, update)
and the rollout's token counts to a :class:`~alignkit_benchmarks.recorder.StepRecorder`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from alignkit import hookimpl, hookspecs

#: Every hook of :mod:`alignkit.hookspecs`.
HOOKS = tuple(sorted(name for name, value in vars(hookspecs).items()
                     if name.startswith("alignkit_") and hasattr(value, "alignkit_spec")))

Clock = tuple[float, float]  # (wall, cpu) seconds


class HookTimer:
    """Wall and CPU time of every hook call, per hook name (a pluggy wrapper plugin).

    ``sync`` runs before each clock reading (e.g. ``torch.cuda.synchronize``, so queued GPU work is counted in the
    hook that queued it). Subclasses react to calls through :meth:`started` and :meth:`finished`."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync or (lambda: None)
        self.calls: dict[str, list[Clock]] = {}
        """Per hook name, the (wall, cpu) seconds of each call, in order."""

    def now(self) -> Clock:
        self.sync()
        return time.perf_counter(), time.process_time()

    def totals(self) -> dict[str, dict[str, float]]:
        """Per hook name: the number of calls and their summed wall and CPU seconds."""
        return {hook: {"calls": len(times), "wall_s": sum(t[0] for t in times), "cpu_s": sum(t[1] for t in times)}
                for hook, times in self.calls.items()}

    def started(self, hook: str, start: Clock) -> None:
        """Called when a call of ``hook`` starts, before its implementations run."""

    def finished(self, hook: str, start: Clock, end: Clock, result: Any) -> None:
        """Called when a call of ``hook`` has returned ``result`` (not when it raised)."""

    def _timed(self, hook: str) -> Generator[None, Any, Any]:
        start = self.now()
        self.started(hook, start)
        try:
            result = yield
        finally:
            end = self.now()
            self.calls.setdefault(hook, []).append((end[0] - start[0], end[1] - start[1]))
        self.finished(hook, start, end, result)
        return result


def _wrapper(hook: str):
    def timed(self):
        return (yield from self._timed(hook))

    timed.__name__ = timed.__qualname__ = hook
    return hookimpl(wrapper=True)(timed)


for _hook in HOOKS:  # one wrapper per hook: a hook added to the specs is timed with no edit here
    setattr(HookTimer, _hook, _wrapper(_hook))


class PhaseTimer(HookTimer):
    """The phases of an online step for a :class:`~alignkit_benchmarks.recorder.StepRecorder`: ``rollout``,
    ``score`` and ``experience`` are the calls of those hooks; ``update`` (the update epochs: minibatches, losses,
    backward passes, optimiser steps, which no single hook spans) runs from the end of ``alignkit_experience``
    to the start of ``alignkit_after_update``. The rollout's token counts are added too."""

    PHASES = {"alignkit_rollout": "rollout", "alignkit_score": "score", "alignkit_experience": "experience"}

    def __init__(self, recorder):
        super().__init__(sync=recorder.sync)
        self.recorder = recorder
        self._experienced: Clock | None = None

    def started(self, hook: str, start: Clock) -> None:
        if hook == "alignkit_after_update" and self._experienced is not None:
            self._add("update", self._experienced, start)
            self._experienced = None

    def finished(self, hook: str, start: Clock, end: Clock, result: Any) -> None:
        if hook in self.PHASES:
            self._add(self.PHASES[hook], start, end)
        if hook == "alignkit_experience":
            self._experienced = end
        if hook == "alignkit_rollout":
            count_rollout(self.recorder, result)

    def _add(self, phase: str, start: Clock, end: Clock) -> None:
        self.recorder.add(f"time/{phase}", end[0] - start[0])
        self.recorder.add(f"cpu/{phase}", end[1] - start[1])


def count_rollout(recorder, rollout) -> None:
    """Token counts of a rollout: generated, prompt, real and padded tokens, lengths and rows."""
    mask = rollout.attention_mask
    response = rollout.response_mask
    prompt = mask[:, :rollout.prompt_length]
    recorder.add("tokens/generated", float(response.sum()))
    recorder.add("tokens/prompt", float(prompt.sum()))
    recorder.add("tokens/real", float(mask.sum()))
    recorder.add("tokens/padded", float(mask.numel()))
    recorder.add("tokens/length", float(mask.shape[1]))
    recorder.add("tokens/prompt_length", float(rollout.prompt_length))
    recorder.add("rows", float(mask.shape[0]))
