"""``alignkit study``: methods × seeds on a task's gold reward, with confidence intervals.

A study is a grid of *cells*. For every seed, the shared upstream stages (e.g. SFT → collect → reward model)
run once as a pipeline seeded with that seed; then every method runs once against that seed's upstream
outputs, so the methods of one seed share their SFT model, labelled pairs and reward model and can be
compared *paired*. A method is one of

- a fit recipe plus overrides (PPO, DPO, ...): trained with the :class:`~alignkit.gold_eval.GoldEval`
  callback, which evaluates the policy every ``evaluation.every`` optimiser steps, so the cell yields a
  trajectory of (step, KL, gold, proxy, win rate) points;
- a policy that is only evaluated (e.g. the SFT model itself): one point;
- best-of-n on a policy under the proxy reward: one point per n, at the analytic KL ``log n − (n−1)/n``.

Cells run on an executor: ``local`` (a process pool, one worker per ``threads_per_worker`` cores; a worker
runs its cells in-process, so it pays the imports once), ``ray`` (Ray tasks on a cluster or a local Ray
instance) or ``inline`` (in this process, one after the other). A finished cell (its ``cell.json``) is
skipped when the study runs again, a stage stopped part-way continues from its checkpoint, and a failed
cell is reported without stopping the others. SIGTERM/SIGUSR1 stop the running cells at a checkpoint and the study
with exit code 75, writing no report (the same command continues). :mod:`alignkit.study_report` turns the cells into
``study.json``, ``report.md`` and the plots.

Layout of ``<run_dir>``: ``seed-<s>/upstream/<stage>/`` and ``seed-<s>/<method>/`` (each with ``cell.json``
and ``log.txt``, the cell's output), then ``study.json``, ``report.md`` and the PNGs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import platform
import shlex
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from alignkit.commands import Stage, substitute
from alignkit.errors import DataError
from alignkit.io import atomic_write_json

CELL_FILE = "cell.json"
LOG_FILE = "log.txt"
STUDY_FILE = "study.json"


@dataclass
class Method:
    """One method of a study: what runs in each seed's cell."""

    name: str
    """Its name in the tables (letters, digits, ``_.-``; may be an upstream stage's, e.g. ``sft``)."""
    recipe: str | None = None
    """Fit recipe, relative to the study file; None for a method that is only evaluated (``policy``)."""
    args: list[str] = field(default_factory=list)
    """Overrides of the recipe; ``${stage}`` is that seed's upstream stage directory, e.g. ``${sft}/model``."""
    policy: str | None = None
    """For a method without a recipe: the policy to evaluate, e.g. ``${sft}/model``."""
    best_of_n: list[int] = field(default_factory=list)
    """With ``policy``: evaluate best-of-n under the proxy reward for each n instead of the policy's own samples."""
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    """A recipe option (dotted key) → values: one method per value (per combination of several keys), named
    ``<name>.<last part of the key><value>``, e.g. ``{model.algorithm.init_args.beta: [0.05, 0.1]}`` gives
    ``dpo.beta0.05`` and ``dpo.beta0.1``."""


def expand_sweeps(methods: list[Method]) -> list[Method]:
    """Each method with a ``sweep`` replaced by one method per combination of its values (the override is
    appended to its ``args``, so it wins over the recipe and the other args)."""
    out = []
    for method in methods:
        if not method.sweep:
            out.append(method)
            continue
        if method.recipe is None:
            raise DataError(f"study: method {method.name!r}: sweep needs a recipe (it overrides recipe options)")
        keys = list(method.sweep)
        for values in itertools.product(*(method.sweep[k] for k in keys)):
            suffix = ".".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in zip(keys, values))
            args = [*method.args, *(f"--{k.removeprefix('--')}={v}" for k, v in zip(keys, values))]
            out.append(replace(method, name=f"{method.name}.{suffix}", args=args, sweep={}))
    return out


@dataclass
class StudyEvaluation:
    """The common yardstick: the same prompts, sampling seed, reference and proxy in every cell."""

    task: dict[str, Any] = field(default_factory=lambda: {"class_path": "alignkit_plugins.tasks.SentimentTask"})
    """The task (``class_path`` + ``init_args``) whose evaluation prompts and gold reward judge every policy."""
    reference: str = "${sft}/model"
    """The policy KL and win rates are measured against (trained methods: the run's own reference)."""
    reward: dict[str, Any] | None = field(default_factory=lambda: {
        "class_path": "alignkit_plugins.rewards.RewardModelReward", "init_args": {"path": "${rm}/model"}})
    """The proxy reward (``class_path`` + ``init_args``; ``${stage}`` substituted); None: no proxy, no best-of-n."""
    every: int = 20
    """Evaluate a training run every this many optimiser steps (and at step 0 and at the end)."""
    num_prompts: int = 64
    """The first this many evaluation prompts of the task."""
    max_new_tokens: int = 24
    temperature: float = 1.0
    """Sampling temperature of the evaluation (1: the KL estimate is unbiased)."""
    batch_size: int = 64
    seed: int = 0
    """Sampling seed of every evaluation, the same in every cell."""


@dataclass
class Claim:
    """A statement the study tests, reported with its CI and whether the CI supports it."""

    name: str
    """What is claimed, in words (shown in the report)."""
    kind: Literal["greater", "overoptimisation", "best_of_n_fit"]
    """``greater``: method ``a``'s final gold exceeds ``b``'s (paired difference, CI above 0);
    ``overoptimisation``: along ``a``'s trajectories gold falls after its peak while the proxy rises (both
    changes from the step where the mean gold over seeds peaks to the end, CIs above 0);
    ``best_of_n_fit``: ``a``'s gold gain follows d(α − βd) (R² ≥ 0.9 and β > 0)."""
    a: str
    """The method the claim is about."""
    b: str | None = None
    """The method it is compared with (``greater``)."""


@dataclass
class CellSpec:
    """Everything a worker needs to run one cell (plain data: it travels to other processes)."""

    kind: Literal["upstream", "method"]
    seed: int
    name: str
    """The method's name, or ``upstream``."""
    run_dir: str
    base_dir: str
    upstream: dict[str, str]
    """Upstream stage name → its directory for this seed."""
    stages: list[dict[str, Any]] = field(default_factory=list)
    method: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    fit_args: list[str] = field(default_factory=list)
    """Appended to every fit (the study's ``set``, its wandb settings)."""
    threads: int = 1


# ------------------------------------------------------------------------------------------ cells


def _substitute_tree(value: Any, outputs: dict[str, Path]) -> Any:
    """``${stage}`` substituted in every string of a nested dict/list."""
    if isinstance(value, str):
        return substitute(value, outputs)
    if isinstance(value, dict):
        return {k: _substitute_tree(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_tree(v, outputs) for v in value]
    return value


def _instantiate(config: dict[str, Any]) -> Any:
    """Build an object from ``{class_path, init_args}`` the way a recipe would (its class imported first, so the
    parser checks the arguments against that class: jsonargparse no longer instantiates a spec given for ``object``)."""
    import importlib

    from jsonargparse import ArgumentParser

    class_path = config.get("class_path") if isinstance(config, dict) else None
    if not isinstance(class_path, str) or "." not in class_path:
        raise DataError(f"study: expected {{class_path: package.Class, init_args: ...}}, got {config!r}")
    module, name = class_path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise DataError(f"study: cannot import {class_path} ({exc})") from None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--obj", type=cls)
    return parser.instantiate(parser.parse_object({"obj": config})).obj


def _gold_eval_override(spec: CellSpec, outputs: dict[str, Path]) -> dict[str, Any]:
    """The recipe override that adds the study's :class:`GoldEval` callback to a method's fit."""
    ev = _substitute_tree(spec.evaluation, outputs)
    init = {"task": ev["task"], "every": ev["every"], "num_prompts": ev["num_prompts"],
            "sampling": {"max_new_tokens": ev["max_new_tokens"], "temperature": ev["temperature"]},
            "batch_size": ev["batch_size"], "seed": ev["seed"]}
    if ev.get("reward"):
        init["reward"] = ev["reward"]
    return {"trainer": {"callbacks": [{"class_path": "alignkit.gold_eval.GoldEval", "init_args": init}]}}


def _point(step: int, kl: float, gold: float, proxy: float | None, win_rate: float | None, **extra: Any) -> dict:
    return {"step": step, "kl": kl, "gold": gold, "proxy": proxy, "win_rate": win_rate, **extra}


def _fit_method(spec: CellSpec, outputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from alignkit.fitting import fit
    from alignkit.gold_eval import read_trajectory
    from alignkit.run import METRICS_FILE

    method = spec.method
    if not (out / METRICS_FILE).is_file():
        override = out / "gold_eval.yaml"
        out.mkdir(parents=True, exist_ok=True)
        override.write_text(yaml.safe_dump(_gold_eval_override(spec, outputs), sort_keys=False))
        recipe = Path(spec.base_dir) / method["recipe"]
        resume = ["--resume", "true"] if (out / "checkpoints" / "last.ckpt").is_file() else []
        fit(["--config", str(recipe), "--config", str(override),
             *(substitute(a, outputs) for a in method["args"]), *spec.fit_args,
             f"--seed_everything={spec.seed}", "--run_dir", str(out), *resume])
    summary = json.loads((out / METRICS_FILE).read_text())
    rows = read_trajectory(out)
    if not rows:
        raise DataError(f"{out}: the run finished without a gold evaluation (gold_eval.jsonl is empty)")
    trajectory = [_point(r["step"], r["eval/kl"], r["eval/gold_reward"], r.get("eval/proxy_reward"),
                         r.get("eval/win_rate")) for r in rows]
    return {"trajectory": trajectory, "eval_time_s": sum(r.get("time_s", 0.0) for r in rows),
            "training": {"algorithm": summary.get("algorithm"), "global_step": summary.get("global_step"),
                         "wall_time_s": summary.get("wall_time_s")}}


def _evaluate_method(spec: CellSpec, outputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """A method without training: the policy's own samples, or best-of-n under the proxy."""
    import torch

    from alignkit.evaluation import best_of_n_curve, best_of_n_kl, evaluate
    from alignkit.models.loading import ModelConfig, load_model
    from alignkit.rollout import SamplingConfig

    ev = _substitute_tree(spec.evaluation, outputs)
    policy = substitute(spec.method["policy"], outputs)
    task = _instantiate(ev["task"])
    reward = _instantiate(ev["reward"]) if ev.get("reward") else None
    sampling = SamplingConfig(max_new_tokens=ev["max_new_tokens"], temperature=ev["temperature"])
    started = time.perf_counter()
    if spec.method["best_of_n"]:
        assert reward is not None  # _check: best-of-n needs the evaluation's proxy reward
        model, tokenizer = load_model(ModelConfig(name_or_path=policy), "causal_lm")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reward.to(device).eval()
        prompts = task.eval_prompts()[:ev["num_prompts"]]
        ns = sorted(set(spec.method["best_of_n"]))
        # (transformers' @wraps(nn.Module.to) hides the method from mypy)
        curve = best_of_n_curve(cast(torch.nn.Module, model).to(device).eval(), tokenizer, prompts, task, reward,
                                ns, sampling, ev["batch_size"], ev["seed"])
        trajectory = [_point(0, best_of_n_kl(n), curve[n], None, None, n=n) for n in ns]
    else:
        results = evaluate({spec.name: policy}, task, reference=ev["reference"], reward=reward, sampling=sampling,
                           num_prompts=ev["num_prompts"], batch_size=ev["batch_size"], seed=ev["seed"],
                           run_dir=str(out / "eval"), wandb=False)
        r = results[spec.name]
        assert r.gold_mean is not None  # evaluated with the task's gold reward
        trajectory = [_point(0, r.kl_mean, r.gold_mean, r.proxy_mean, 0.5 if r.win_rate is None else r.win_rate)]
    return {"trajectory": trajectory, "eval_time_s": time.perf_counter() - started}


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's stdout and stderr (Python's and the C libraries') to ``path`` meanwhile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with path.open("a") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_cell(spec: CellSpec) -> dict[str, Any]:
    """Run one cell in this process and return its record (also written to ``<cell>/cell.json`` on success).

    Never raises: a failure is returned as ``{"status": "failed", "error": ...}`` (the traceback goes to the
    cell's ``log.txt``), so one crashing cell does not stop the study."""
    out = Path(spec.run_dir)
    record: dict[str, Any] = {"kind": spec.kind, "method": spec.name, "seed": spec.seed, "run_dir": str(out),
                              "config": cell_config(spec)}
    started = time.perf_counter()
    from alignkit.signals import Preempted, note_stop, stop_noted

    if stop_noted():  # this process was asked to stop before the cell began (a worker's queued cell)
        return {**record, "status": "stopped", "signal": stop_noted(), "began": False}
    try:
        import torch

        torch.set_num_threads(spec.threads)
        outputs = {name: Path(path) for name, path in spec.upstream.items()}
        with _output_to(out / LOG_FILE):
            if spec.kind == "upstream":
                from alignkit.commands import pipeline

                pipeline([Stage(**s) for s in spec.stages], run_dir=str(out), set=spec.fit_args,
                         base_dir=spec.base_dir, seed=spec.seed)
                record["stages"] = {name: str(path) for name, path in outputs.items()}
            elif spec.method.get("recipe"):
                record.update(_fit_method(spec, outputs, out))
            else:
                record.update(_evaluate_method(spec, outputs, out))
        record["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - a cell's failure is data, not a crash of the study
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, Preempted):  # stopped at a checkpoint by SIGTERM/SIGUSR1: a re-run continues it
            note_stop(exc.signal_name)
            return {**record, "status": "stopped", "signal": exc.signal_name, "began": True,
                    "wall_time_s": round(time.perf_counter() - started, 2)}
        out.mkdir(parents=True, exist_ok=True)
        with (out / LOG_FILE).open("a") as log:
            log.write(traceback.format_exc())
        record.update(status="failed", error=" ".join(f"{type(exc).__name__}: {exc}".split())[:500])
    record["wall_time_s"] = round(time.perf_counter() - started, 2)
    if record.get("trajectory"):
        last = record["trajectory"][-1]
        record["final"] = {k: last[k] for k in ("kl", "gold", "proxy", "win_rate")}
    if record["status"] == "ok":
        atomic_write_json(out / CELL_FILE, record)
    return record


def cell_config(spec: CellSpec) -> dict[str, Any]:
    """What decides a cell's result besides its seed: recorded in ``cell.json`` and compared on a re-run."""
    return {"method": spec.method, "evaluation": spec.evaluation, "upstream": spec.upstream,
            "fit_args": [a for a in spec.fit_args if not a.startswith(("--wandb=", "--experiment="))]}


def changed_cells(specs: list[CellSpec]) -> list[str]:
    """The finished cells among ``specs`` whose recorded configuration differs from theirs, each as
    ``<method> seed <s> (<changed keys>)``."""
    changed = []
    for spec in specs:
        done = read_cell(Path(spec.run_dir))
        if done is None or "config" not in done:
            continue
        old, new = done["config"], json.loads(json.dumps(cell_config(spec)))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if keys:
            changed.append(f"{spec.name} seed {spec.seed} ({', '.join(keys)})")
    return changed


def read_cell(run_dir: Path) -> dict[str, Any] | None:
    """The record of a finished cell, or None."""
    path = run_dir / CELL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# ------------------------------------------------------------------------------------------ executors


class InlineExecutor:
    """Runs each cell in this process when it is submitted (debugging, tiny studies)."""

    def submit(self, spec: CellSpec) -> Future:
        future: Future = Future()
        future.set_result(run_cell(spec))
        return future

    def stop(self) -> None:
        """Stop the running cells (here: the cell in this process already saw the signal)."""

    def shutdown(self) -> None:
        pass


#: In a local worker: ``[True]`` while it runs a cell.
_WORKER_BUSY: list[bool] = []
#: In a local worker: the study's process id.
_STUDY_PID: list[int] = []


def _init_worker(threads: int, parent: int) -> None:
    """A local worker: ``threads`` torch threads. SIGUSR1 (which the study forwards when it is asked to stop) stops
    its runs at a checkpoint. So does SIGTERM during a cell (the study's process ``parent`` died: Linux sends it
    then); an idle worker ends on SIGTERM, as ``ProcessPoolExecutor`` expects of the workers of a broken pool."""
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _STUDY_PID[:] = [parent]
    import signal

    from alignkit.signals import note_stop, remember_stop_signals

    remember_stop_signals(forward=_end_idle_worker)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != parent:  # the study died before the line above took effect
        note_stop("SIGTERM")


def _end_idle_worker(signum: int) -> None:
    """After the stop is noted: SIGTERM ends a worker that is not running a cell."""
    import signal

    if signum == signal.SIGTERM and not any(_WORKER_BUSY):
        raise SystemExit(128 + signum)


def _run_cell_in_worker(spec: CellSpec) -> dict[str, Any]:
    _WORKER_BUSY[:] = [True]
    try:
        return run_cell(spec)
    finally:
        _WORKER_BUSY[:] = [False]
        if os.getppid() not in _STUDY_PID:  # the study is gone: nobody reads the result or sends another cell
            from alignkit.signals import PREEMPTED_EXIT_CODE

            os._exit(PREEMPTED_EXIT_CODE)


def _forward_to_workers(signum: int) -> None:
    """Ask the local executor's worker processes (the children of this process) to stop: SIGUSR1, whatever the
    study received (SIGTERM ends an idle worker)."""
    import multiprocessing
    import signal

    for child in multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(cast(int, child.pid), signal.SIGUSR1)


class LocalExecutor:
    """A process pool on this machine (``spawn``: no state of this process leaks into a worker)."""

    def __init__(self, workers: int, threads: int):
        import multiprocessing

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads, os.getpid()))

    def submit(self, spec: CellSpec) -> Future:
        return self.pool.submit(_run_cell_in_worker, spec)

    def stop(self) -> None:
        """Stop the running cells (the workers got the signal from :func:`_forward_to_workers`)."""

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """Ray tasks, each reserving ``threads`` CPUs: on the cluster at ``address``, or on a local Ray instance
    limited to ``workers × threads`` CPUs when no address is given. Ray reuses its worker processes, so a
    worker pays the imports once."""

    def __init__(self, workers: int, threads: int, address: str | None):
        try:
            import ray
        except ImportError:
            raise DataError("executor 'ray' needs Ray: pip install 'alignkit[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            # a local instance: workers × threads CPUs, no dashboard (None: Ray's defaults, for a cluster)
            ray.init(address=address, log_to_driver=False, num_cpus=None if address else workers * threads,
                     include_dashboard=None if address else False)
        self.task = ray.remote(num_cpus=threads)(run_cell)
        self.refs: list[Any] = []

    def submit(self, spec: CellSpec) -> Future:
        ref = self.task.remote(spec)
        self.refs.append(ref)
        return ref.future()

    def stop(self) -> None:
        """Cancel the tasks: a queued one never starts, a running one is interrupted (its run keeps the checkpoints
        written so far, from which a re-run continues)."""
        for ref in self.refs:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)

    def shutdown(self) -> None:
        self.ray.shutdown()


def make_executor(kind: str, workers: int, threads: int, address: str | None):
    if kind == "inline":
        return InlineExecutor()
    if kind == "ray":
        return RayExecutor(workers, threads, address)
    return LocalExecutor(workers, threads)


# ------------------------------------------------------------------------------------------ checks


def _check(methods: list[Method], seeds: list[int], upstream: list[Stage], evaluation: StudyEvaluation,
           base_dir: Path, only: list[str] | None) -> None:
    """One-line errors for a study that cannot run, before anything runs."""
    if not seeds:
        raise DataError("study: seeds is empty; give at least one seed")
    duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicates:
        raise DataError(f"study: seeds {duplicates} are listed more than once")
    names = [m.name for m in methods]
    if not methods:
        raise DataError("study: methods is empty")
    if len(set(names)) < len(names):
        raise DataError(f"study: two methods share a name ({', '.join(n for n in names if names.count(n) > 1)})")
    for m in methods:
        if not m.name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise DataError(f"study: method name {m.name!r} must be letters, digits, '_', '-' or '.'")
        if m.name == "upstream":
            raise DataError("study: 'upstream' is the folder of the shared stages; give the method another name")
        if (m.recipe is None) == (m.policy is None):
            raise DataError(f"study: method {m.name!r} needs exactly one of recipe (a fit) or policy (evaluated only)")
        if m.best_of_n and (m.policy is None or evaluation.reward is None):
            raise DataError(f"study: method {m.name!r}: best_of_n needs a policy and evaluation.reward (the proxy)")
        if any(n < 1 for n in m.best_of_n):
            raise DataError(f"study: method {m.name!r}: best_of_n values must be >= 1, got {m.best_of_n}")
    for recipe in [*(m.recipe for m in methods if m.recipe), *(s.recipe for s in upstream if s.recipe)]:
        path = base_dir / recipe
        if not path.is_file():
            raise FileNotFoundError(f"study: recipe {path} does not exist")
        try:
            parsed = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise DataError(f"study: recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from None
        if not isinstance(parsed, dict) or "model" not in parsed:
            raise DataError(f"study: recipe {path} is not a fit recipe (no 'model' section)")
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise DataError(f"study: --only names unknown methods {unknown}; the study has {names}")
    if evaluation.every < 1 or evaluation.num_prompts < 1:
        raise DataError("study: evaluation.every and evaluation.num_prompts must be >= 1")
    _instantiate(evaluation.task)  # a misspelt task fails here, not in every cell


# ------------------------------------------------------------------------------------------ command


def study(methods: list[Method], seeds: list[int], upstream: list[Stage] | None = None,
          evaluation: StudyEvaluation = StudyEvaluation(), kl_budgets: list[float] | None = None,
          executor: Literal["local", "ray", "inline"] = "local", workers: int | None = None,
          threads_per_worker: int = 1, ray_address: str | None = None, run_dir: str | None = None,
          set: list[str] | None = None, only: list[str] | None = None, wandb: bool = True,
          name: str | None = None, claims: list[Claim] | None = None, base_dir: str = ".") -> dict[str, Any]:
    """Run every method on every seed against a task's gold reward and report means with 95 % CIs,
    paired differences, gold at matched KL and the Gao et al. (2022) fits.

    Per seed the ``upstream`` stages run once (as ``alignkit pipeline --seed <seed>``) and every method of
    that seed reads their outputs (``${stage}`` in its args), so methods are compared paired. Trained methods
    carry the ``GoldEval`` callback (a gold-vs-KL trajectory per run); the others are evaluated once. Finished
    cells are skipped on a re-run (which refuses, before anything runs, a run directory whose finished cells
    were run with another configuration); a failed cell is reported and the others go on. Writes ``study.json``,
    ``report.md`` and the PNGs to ``run_dir`` (and one wandb run of job type ``study`` with ``wandb``).

    Args:
        methods: the methods (a fit recipe plus overrides, or a policy evaluated as it is, or best-of-n); a
            method's ``sweep`` expands it into one method per value.
        seeds: one cell per seed and method; each seed drives all randomness of its cells.
        upstream: the stages shared by the methods of one seed (SFT, collect, reward model, ...).
        evaluation: the yardstick: task, prompts, sampling seed, reference and proxy reward.
        kl_budgets: KL values (nats) at which methods are compared (default: a range from the cells' KLs).
        executor: ``local`` (process pool), ``ray`` (Ray tasks; ``pip install 'alignkit[ray]'``) or ``inline``.
        workers: cells at a time (default: the cores divided by ``threads_per_worker``).
        threads_per_worker: torch threads of each cell.
        ray_address: a Ray cluster's address (``auto``, ``ray://host:10001``); default: a local Ray instance.
        run_dir: the study's folder (default: runs/study/<timestamp>); run it again to resume.
        set: extra arguments appended to every fit, e.g. ``--trainer.max_steps=5``.
        only: run only these methods (the report covers the cells found in ``run_dir``).
        wandb: log every fit and the study summary to offline wandb runs grouped by the study's name.
        name: the study's name (wandb group; default: the study file's name, else ``study``).
        claims: statements to test on the results (``report.md``'s "Claims" table says which the CIs support).
        base_dir: folder recipe paths are relative to (the study file's folder by default).
    """
    from alignkit.study_report import write_report

    upstream = list(upstream or [])
    methods = expand_sweeps(methods)
    base = Path(base_dir)
    _check(methods, seeds, upstream, evaluation, base, only)
    names = [m.name for m in methods]
    for claim in claims or []:
        unknown = [x for x in (claim.a, claim.b) if x is not None and x not in names]
        if unknown or (claim.kind == "greater" and claim.b is None):
            raise DataError(f"study: claim {claim.name!r} names unknown methods {unknown} (known: {names})" if unknown
                            else f"study: claim {claim.name!r} of kind 'greater' needs b")
    from alignkit.run import METRICS_FILE, default_run_dir  # Lightning: not for ``alignkit study --help``

    root = Path(run_dir) if run_dir else default_run_dir("study")
    root.mkdir(parents=True, exist_ok=True)
    name = name or "study"
    workers = workers or max(1, (os.cpu_count() or 1) // threads_per_worker)
    fit_args = [*(set or []), f"--wandb={str(wandb).lower()}", f"--experiment={name}"]
    chosen = [m for m in methods if not only or m.name in only]

    def seed_dir(seed: int) -> Path:
        return root / f"seed-{seed}"

    def outputs(seed: int) -> dict[str, str]:
        return {s.name: str(seed_dir(seed) / "upstream" / s.name) for s in upstream}

    def method_spec(method: Method, seed: int) -> CellSpec:
        return CellSpec("method", seed, method.name, str(seed_dir(seed) / method.name), str(base), outputs(seed),
                        method=asdict(method), evaluation=asdict(evaluation), fit_args=fit_args,
                        threads=threads_per_worker)

    changed = changed_cells([method_spec(m, seed) for m in chosen for seed in seeds])
    if changed:
        raise DataError(f"study: {len(changed)} finished cells in {root} were run with another configuration: "
                        f"{'; '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}; choose another --run_dir "
                        f"(nothing was changed)")
    records: dict[tuple[str, int], dict[str, Any]] = {}
    pending: dict[Future, CellSpec] = {}
    started = time.perf_counter()
    print(f"[study] {len(chosen)} methods × {len(seeds)} seeds on {executor} ({workers} workers × "
          f"{threads_per_worker} threads) -> {root}")
    pool = None
    from alignkit.signals import clear_stop, note_stop, remember_stop_signals, restore_handlers, stop_noted

    stopped = {"began": 0, "not started": 0}  # cells cut short by SIGTERM/SIGUSR1, and cells never begun

    def never_begun(spec: CellSpec) -> int:
        """The cells a spec that does not begin leaves out: itself, and an upstream's methods."""
        return 1 if spec.kind == "method" else 1 + len(chosen)

    def submit(spec: CellSpec) -> None:
        nonlocal pool
        if stop_noted():
            stopped["not started"] += never_begun(spec)
            return
        if pool is None:
            pool = make_executor(executor, workers, threads_per_worker, ray_address)
        pending[pool.submit(spec)] = spec

    def upstream_done(seed: int) -> None:
        for method in chosen:
            spec = method_spec(method, seed)
            done = read_cell(Path(spec.run_dir))
            if done is not None:
                records[(method.name, seed)] = done
                print(f"[study] {method.name} seed {seed}: already finished, skipped")
            else:
                submit(spec)

    # SIGTERM/SIGUSR1: the running cells stop at a checkpoint, the others do not start, and the study exits with
    # the runs' pre-emption code; running it again continues (see _stop_message)
    handlers = remember_stop_signals(forward=_forward_to_workers if executor == "local" else None)
    cancelled = False
    try:
        for seed in seeds:
            finished = all((Path(d) / METRICS_FILE).is_file() for d in outputs(seed).values())
            if finished:
                upstream_done(seed)
            else:
                submit(CellSpec("upstream", seed, "upstream", str(seed_dir(seed) / "upstream"), str(base),
                                outputs(seed), stages=[asdict(s) for s in upstream], fit_args=fit_args,
                                threads=threads_per_worker))
        while pending:
            done, _ = wait(list(pending), timeout=0.5, return_when=FIRST_COMPLETED)
            if stop_noted() and not cancelled and pool is not None:
                cancelled = True
                for future in [f for f in pending if f.cancel()]:  # queued, not begun
                    stopped["not started"] += never_begun(pending.pop(future))
                pool.stop()
            for future in done:
                spec = pending.pop(future)
                try:
                    record = future.result()
                except Exception as exc:  # noqa: BLE001 - the worker process itself died
                    record = {"kind": spec.kind, "method": spec.name, "seed": spec.seed, "run_dir": spec.run_dir,
                              "status": "failed", "error": " ".join(f"{type(exc).__name__}: {exc}".split())[:500]}
                if record["status"] == "stopped" or (stop_noted() and record["status"] == "failed"):
                    note_stop(record.get("signal", "SIGTERM"))  # (a cell run inline saw the signal itself)
                    began = int(record.get("began", True))  # a stopped upstream leaves its methods out
                    stopped["began"] += began
                    stopped["not started"] += never_begun(spec) - began
                    continue
                _print_record(record)
                if spec.kind == "upstream":
                    records[("upstream", spec.seed)] = record
                    if record["status"] == "ok":
                        upstream_done(spec.seed)
                    else:
                        for method in chosen:
                            records[(method.name, spec.seed)] = {
                                "kind": "method", "method": method.name, "seed": spec.seed, "status": "failed",
                                "run_dir": str(seed_dir(spec.seed) / method.name),
                                "error": f"upstream of seed {spec.seed} failed: {record['error']}"}
                else:
                    records[(spec.name, spec.seed)] = record
        signal_name = stop_noted()
    finally:
        if pool is not None:
            pool.shutdown()
        restore_handlers(handlers)
        clear_stop()
    if signal_name:
        from alignkit.signals import PREEMPTED_EXIT_CODE

        ok = sum(1 for key, record in records.items() if key[0] != "upstream" and record["status"] == "ok")
        print(f"alignkit: study stopped by {signal_name}: {ok} cells finished, {stopped['began']} stopped "
              f"part-way (their runs keep their checkpoints), {stopped['not started']} not started; no report "
              f"written; run the same command again to continue (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr,
              flush=True)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    wall = time.perf_counter() - started
    # cells of methods not run this time (``only``) but finished earlier still count in the report
    for method in methods:
        for seed in seeds:
            if (method.name, seed) not in records:
                earlier = read_cell(seed_dir(seed) / method.name)
                if earlier is not None:
                    records[(method.name, seed)] = earlier
    header = {
        "name": name, "command": command_line(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        "executor": executor, "workers": workers, "threads_per_worker": threads_per_worker,
        "seeds": list(seeds), "methods": [m.name for m in methods], "wall_time_s": round(wall, 1),
        "config": {"methods": [asdict(m) for m in methods], "upstream": [asdict(s) for s in upstream],
                   "evaluation": asdict(evaluation), "set": list(set or [])},
        "claims": [asdict(c) for c in claims or []],
    }
    cells = [records[key] for key in sorted(records, key=lambda k: (k[1], k[0]))]
    return write_report(root, header, cells, kl_budgets, wandb=wandb)


def command_line() -> str | None:
    """The ``alignkit study ...`` command this process is running (None when called from Python)."""
    from alignkit import commands

    argv = commands.last_command()
    return "alignkit " + " ".join(shlex.quote(a) for a in argv) if argv and argv[0] == "study" else None


def _print_record(record: dict[str, Any]) -> None:
    where = f"{record['method']} seed {record['seed']}"
    if record["status"] != "ok":
        print(f"[study] {where}: FAILED ({record['error']}); log: {Path(record['run_dir']) / LOG_FILE}")
        return
    final = record.get("final")
    result = f", gold {final['gold']:.3f} at KL {final['kl']:.3f}" if final else ""
    print(f"[study] {where}: done in {record['wall_time_s']:.0f} s{result}")


__all__ = ["CellSpec", "Claim", "Method", "expand_sweeps", "StudyEvaluation", "run_cell", "study"]
