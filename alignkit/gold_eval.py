"""Gold-reward evaluation during training: each run's trajectory in gold-vs-KL space.

:class:`GoldEval` is a Lightning callback. At step 0 (before any update), whenever the optimiser step count
reaches a multiple of ``every`` and at the final step, the policy samples one response to each of a fixed set
of the task's evaluation prompts, and the run records

- ``eval/gold_reward``: mean gold reward (the task's simulated human judgement);
- ``eval/proxy_reward``: mean score under a proxy reward plugin (what the optimiser sees), when there is one;
- ``eval/kl``: mean per-sequence estimate of KL(π‖π_ref) (:func:`alignkit.evaluation.sequence_kl`);
- ``eval/win_rate``: gold win rate against the reference policy's responses to the same prompts (ties ½);
- ``eval/response_len``: mean response length in tokens;

through the trainer's loggers and as one JSON line per evaluation in ``<run dir>/gold_eval.jsonl``, which
:func:`read_trajectory` reads back. Sampling uses its own seeded ``torch.Generator`` and every random state
is restored afterwards, so a run trains exactly the same with or without the callback.

Recipe use::

    trainer:
      callbacks:
        - class_path: alignkit.gold_eval.GoldEval
          init_args:
            task: alignkit_plugins.tasks.SentimentTask
            every: 20
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
from torch import nn

from alignkit.checkpoint import rng_states, set_rng_states
from alignkit.evaluation import sample_responses, score_samples, win_rate, with_task_stop
from alignkit.io import append_jsonl, atomic_write_text, parse_jsonl_line, read_user_text
from alignkit.plugin import Reward
from alignkit.rollout import SamplingConfig
from alignkit.task import Task

if TYPE_CHECKING:
    from alignkit.module import AlignModule

#: The trajectory file in the run directory (``trainer.default_root_dir``).
GOLD_EVAL_FILE = "gold_eval.jsonl"


class GoldEval(L.Callback):
    """Evaluate the policy against the task's gold reward during training (a gold-vs-KL trajectory per run).

    Evaluations happen at step 0 (``on_train_start``, before any update), after every optimiser step at which
    ``trainer.global_step`` reaches or passes a multiple of ``every`` (an online algorithm's batch makes
    several optimiser steps: the first step past each multiple counts), and at the last step if that was
    not evaluated already. Each one samples one response per prompt from the policy with a fresh generator
    seeded with ``seed`` (so identical policies give identical samples), scores it, logs ``eval/*`` metrics
    at ``step=trainer.global_step`` on every logger and appends ``{"step", "eval/...", "time_s"}`` (the
    evaluation's seconds; the first row also counts sampling the reference's responses) to
    ``<trainer.default_root_dir>/gold_eval.jsonl`` (global rank 0). Every rank samples (sharded models need
    all ranks); the global, numpy, python and plugin-owned random states are restored afterwards, the
    policy's train/eval modes too, and nothing is differentiated, so training is unchanged bit for bit.

    The reference π_ref of KL and win rate is the algorithm's frozen reference (``model.reference``, or the
    policy with its LoRA adapters disabled); an algorithm without one (e.g. SFT) is measured against a frozen
    copy of the initial policy, taken before a resumed run loads its checkpoint (so it is the initial policy
    there too; it costs one policy's memory). The reference's responses and their gold rewards are sampled
    once per process, at the start of training, with the same seed. A reference that the algorithm frees
    during training (DPO's ``reference_logps=precompute``) stays alive while this callback holds it.

    A run resumed from step K keeps the evaluations up to K in ``gold_eval.jsonl``, drops the later ones
    (which the resumed run makes again) and does not repeat the evaluation at K, whose ``metrics.csv`` row the
    resumed file keeps (it was logged before K's checkpoint: :class:`alignkit.run.RunDirectory`). One
    ``GoldEval`` per run.

    Cost per evaluation: sampling ``num_prompts`` × ``sampling.max_new_tokens`` tokens and one reference
    forward over them.
    """

    def __init__(self, task: Task, every: int = 20, num_prompts: int = 64,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=24, temperature=1.0),
                 reward: Reward | None = None, batch_size: int = 64, seed: int = 0):
        """
        Args:
            task: the task (``class_path`` + ``init_args``) whose first ``num_prompts`` evaluation prompts are
                the fixed yardstick and whose gold reward judges the responses; its stop string is added to
                ``sampling``.
            every: evaluate at the first optimiser step at or past each multiple of this (plus step 0 and the
                final step).
            num_prompts: number of evaluation prompts (the task's first ones), one response each.
            sampling: sampling settings of the evaluation. ``eval/kl`` is an unbiased estimate only when sampling
                from the policy itself: temperature 1, no top-k / top-p, do_sample true.
            reward: proxy reward plugin (``class_path`` + ``init_args``) for ``eval/proxy_reward``; default: the
                module's reward plugin when it has exactly one (none: no proxy metric). It is moved to the
                module's device and put in eval mode, and never registered with the plugin manager, so it
                has no effect on training.
            batch_size: prompts per generation batch.
            seed: seed of the evaluation's sampling generator (the same at every evaluation).
        """
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.task, self.every, self.num_prompts = task, every, num_prompts
        self.sampling = with_task_stop(copy.deepcopy(sampling), task)
        self.reward, self.batch_size, self.seed = reward, batch_size, seed
        self.prompts: list[str] = []
        self.last_step: int | None = None
        """The step of the latest evaluation (None: none yet); saved in checkpoints."""
        self.resumed_step: int | None = None
        self._reference: nn.Module | None = None  # the module's frozen reference, or our copy of the initial policy
        self._reference_gold: list[float] | None = None
        self._unbooked_s = 0.0  # time spent sampling the reference's responses, not yet in a row's time_s

    # ------------------------------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # (Lightning's callback connector sets Trainer.callbacks without declaring it on the class)
        if sum(isinstance(c, GoldEval) for c in trainer.callbacks) > 1:  # type: ignore[attr-defined]
            raise ValueError(f"trainer.callbacks holds more than one GoldEval; they would share {GOLD_EVAL_FILE}")
        prompts = self.task.eval_prompts()
        if self.num_prompts > len(prompts):
            raise ValueError(f"GoldEval: num_prompts={self.num_prompts}, but task {self.task.name!r} has "
                             f"{len(prompts)} evaluation prompts (raise its num_eval_prompts)")
        self.prompts = prompts[:self.num_prompts]
        # Setup runs before a resumed run loads its checkpoint: the policy still holds its initial weights.
        module = cast("AlignModule", pl_module)  # the policy (and reference) GoldEval evaluates
        if module.reference is not None:
            self._reference = module.reference
        elif not hasattr(module.policy, "disable_adapter"):  # LoRA: reference_model() disables the adapters
            self._reference = copy.deepcopy(module.policy).requires_grad_(False).eval()

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = state_dict.get("last_step")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.resumed_step = int(checkpoint["global_step"])

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.resumed_step is not None and trainer.is_global_zero:
            keep_trajectory(self.path(trainer), self.resumed_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reward is not None:
            self.reward.to(pl_module.device).eval().requires_grad_(False)
        if self._reference is not None and self._reference is not pl_module.reference:
            self._reference.to(pl_module.device)
        started = time.perf_counter()
        with self._isolated(trainer, pl_module), self.reference_model(pl_module) as reference:
            rollouts = sample_responses(reference, pl_module.tokenizer, self.prompts, self.sampling, self.batch_size,
                                        self.seed)
            responses = [r for ro in rollouts for r in ro.responses]
            self._reference_gold = self.task.gold_rewards(self.prompts, responses)
        self._unbooked_s = time.perf_counter() - started  # counted in the next row's time_s
        if self._due(trainer.global_step):
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._due(trainer.global_step):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self.last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------------------------------ evaluation
    def path(self, trainer: L.Trainer) -> Path:
        """``<trainer.default_root_dir>/gold_eval.jsonl``."""
        return Path(trainer.default_root_dir) / GOLD_EVAL_FILE

    def _due(self, step: int) -> bool:
        """Whether ``step`` needs an evaluation: none yet, or a multiple of ``every`` reached since the last."""
        return self.last_step is None or step // self.every > self.last_step // self.every

    def proxy(self, pl_module: L.LightningModule) -> Reward | None:
        """The proxy reward: ``reward``, else the module's only reward plugin, else None."""
        if self.reward is not None:
            return self.reward
        rewards = list(getattr(pl_module, "rewards", []))
        return rewards[0] if len(rewards) == 1 else None

    @contextmanager
    def reference_model(self, pl_module: L.LightningModule) -> Iterator[nn.Module]:
        """π_ref: the reference held since setup, else the module's (the policy with its adapters disabled)."""
        module = cast("AlignModule", pl_module)
        with nullcontext(self._reference) if self._reference is not None else module.reference_model() as ref:
            yield ref

    @contextmanager
    def _isolated(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
        """No gradients, the training precision, and afterwards every random state and the policy's modes as
        they were."""
        align_module = cast("AlignModule", pl_module)
        generators = align_module.owned_generators() if hasattr(align_module, "owned_generators") else {}
        if self.reward is not None:
            generators.update({f"gold_eval.reward.{k}": v for k, v in vars(self.reward).items()
                               if isinstance(v, torch.Generator)})
        states = rng_states(generators)
        modes = [(m, m.training) for m in align_module.policy.modules()]
        try:
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                yield
        finally:
            for module, training in modes:
                module.training = training
            set_rng_states(states, generators)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluate the policy now (every rank), log and record the metrics (rank 0); returns them."""
        step, started = trainer.global_step, time.perf_counter()
        with self._isolated(trainer, pl_module):
            rollouts = sample_responses(pl_module.policy, pl_module.tokenizer, self.prompts, self.sampling,
                                        self.batch_size, self.seed)
            with self.reference_model(pl_module) as reference:
                samples = score_samples(rollouts, reference, self.task, self.proxy(pl_module),
                                        self.sampling.temperature)
        assert self._reference_gold is not None, "the reference's responses are sampled in on_train_start"
        assert samples.gold is not None  # scored with the task's gold reward
        metrics = {"eval/gold_reward": _mean(samples.gold)}
        if samples.proxy is not None:
            metrics["eval/proxy_reward"] = _mean(samples.proxy)
        metrics.update({"eval/kl": _mean(samples.kl), "eval/win_rate": win_rate(samples.gold, self._reference_gold),
                        "eval/response_len": _mean([float(n) for n in samples.lengths])})
        self.last_step = step
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
                logger.save()
            elapsed = time.perf_counter() - started + self._unbooked_s
            append_jsonl(self.path(trainer), {"step": step, **metrics, "time_s": round(elapsed, 4)})
        self._unbooked_s = 0.0
        return metrics


# ------------------------------------------------------------------------------------------ the file


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _parse(path: Path, number: int, line: str) -> dict[str, Any]:
    row = parse_jsonl_line(path, number, line)  # a DataError (a ValueError) when it is not JSON
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        raise ValueError(f"{path}, line {number}: not a gold evaluation record (a JSON object with an integer "
                         f"\"step\")")
    return row


def read_trajectory(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluations recorded by :class:`GoldEval` in ``<run_dir>/gold_eval.jsonl``, in file (step) order:
    dicts with ``step``, the ``eval/*`` metrics and ``time_s``. Blank lines are skipped; any other line that is
    not a JSON object with an integer ``step`` raises a one-line ValueError naming the file and line number."""
    path = Path(run_dir) / GOLD_EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (was the run trained with alignkit.gold_eval.GoldEval?)")
    return [_parse(path, number, line) for number, line in enumerate(read_user_text(path).splitlines(), 1)
            if line.strip()]


def keep_trajectory(path: Path, step: int) -> None:
    """Drop the evaluations after optimiser step ``step`` from ``gold_eval.jsonl`` (an atomic rewrite), and a
    last line cut short by a killed process."""
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        try:
            _parse(path, len(lines), lines[-1])
            lines[-1] += "\n"
        except ValueError:
            lines.pop()  # a partial write by a killed process (after its last checkpoint)
    kept = [line for number, line in enumerate(lines, 1) if line.strip() and _parse(path, number, line)["step"] <= step]
    if "".join(kept) == text:
        return
    atomic_write_text(path, "".join(kept))


__all__ = ["GOLD_EVAL_FILE", "GoldEval", "keep_trajectory", "read_trajectory"]
