"""The ``alignkit bench`` command (registered in the ``alignkit.commands`` entry-point group).

``--compare='[trl]'`` adds TRL's ``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer`` and ``RLOOTrainer`` (for PPO) on
the same saved model, the same data and the same batch and sequence lengths (:mod:`alignkit_benchmarks.trl_compare`;
skipped with a message when ``trl`` is not installed). ``--group_by_length`` (default true) batches examples
of similar length on both sides where the framework can: alignkit's data modules (``group_by_length``) and
TRL's ``train_sampling_strategy="group_by_length"`` for SFT, RM and DPO (RLOO samples prompts with its own
sampler, which has no length grouping). Repeats are interleaved (ours, theirs, ours, ...) and medians are
reported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from alignkit_benchmarks import roofline
from alignkit_benchmarks.assets import prepare_assets
from alignkit_benchmarks.measure import measure
from alignkit_benchmarks.results import aggregate, ratios
from alignkit_benchmarks.sizes import (
    CPU_SIZES,
    GPU_SIZES,
    SMOKE_SIZES,
    SMOKE_WORKLOAD,
    Size,
    Workload,
    resolve_sizes,
    size_dict,
)
from alignkit_benchmarks.stages import STAGES, Algo


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def bench(
    algorithms: list[Algo] | None = None,
    sizes: list[Size | str] | None = None,
    workload: Workload = Workload(),
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 3,
    compare: list[Literal["trl"]] | None = None,
    group_by_length: bool = True,
    shared_prompt: bool = True,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    dtype: Literal["float32", "bfloat16"] = "float32",
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
    threads: int | None = None,
    isolate: bool | None = None,
    smoke: bool = False,
    output: str | None = None,
    deterministic: bool = True,
    exact_memory: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark the SFT, reward-model, DPO and PPO stages: tokens/s, generation tokens/s, time per step,
    peak memory, FLOPs and MFU, optionally side by side with TRL. Prints a table, writes a JSON file.

    Args:
        algorithms: stages to measure (default: every stage of ``alignkit_benchmarks.stages.STAGES``: sft, rm, dpo,
            ppo).
        sizes: model shapes: preset names (smoke, tiny, 5M, 25M, 25M-v32k, 120M-v32k, 350M-v32k) or ``{name, model:
            {hidden_size, num_layers, num_heads, intermediate_size}, pad_vocab_to}`` (default: tiny to ~25M
            parameters on CPU, 25M to ~350M on GPU).
        workload: batch size, sequence lengths and generated tokens (the same for every framework).
        steps: measured steps per measurement (after ``warmup`` steps that are not measured).
        warmup: steps run before measuring.
        repeats: measurements per (size, stage, framework), interleaved across frameworks; medians are reported.
        compare: other frameworks to measure on the same model, data and lengths (``trl``: DPOTrainer,
            RewardTrainer, RLOOTrainer; skipped with a message when trl is not installed).
        group_by_length: batch examples of similar length (less padding): alignkit's data modules'
            ``group_by_length`` and, with ``compare``, TRL's ``train_sampling_strategy="group_by_length"`` for SFT,
            RM and DPO (TRL's RLOO has no length grouping). False: uniformly shuffled batches on both sides.
        shared_prompt: alignkit's RM and DPO run each pair's prompt once (``shared_prompt`` of ``RewardModel`` and
            ``DPO``, off by default in recipes); their FLOPs and MFU count the tokens actually run.
        device: ``auto`` picks cuda when available.
        dtype: parameter dtype of every model and of the roofline matmul.
        precision: ``bf16-mixed``: bfloat16 autocast on both sides (alignkit's trainer ``precision``, TRL's
            ``bf16=True``, TRL's own default), float32 weights and optimiser; the rooflines then time bfloat16
            matrix products. ``32-true``: float32 compute (``dtype``) everywhere.
        threads: torch intra-op threads in every measurement (default: 1 on CPU, where a shared or
            oversubscribed machine makes multi-threaded small kernels erratic; torch's default on GPU).
        isolate: one subprocess per measurement, for clean peak-memory figures (default: true, false with smoke).
        smoke: tiny sizes, 2 steps, 1 repeat, in-process: a quick check that everything runs.
        output: JSON file to write (default: runs/bench/bench-<timestamp>.json).
        deterministic: run alignkit's trainer with ``deterministic=True``, the default of ``alignkit fit``.
        exact_memory: CPU peak memory that follows the live tensors: every measurement process runs with
            glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so freed blocks leave the RSS at once instead of staying
            cached (the default allocator's caching moves the RSS high-water mark by ±50 MB between otherwise
            equal runs). It slows large allocations: compare memory, not times, from such a run.
        seed: seed of the models, data and sampling.
    """
    import torch

    algorithms = list(algorithms or STAGES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads is None and device == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)  # the roofline is timed here, with the measurements' thread count
    if smoke:
        sizes = sizes or SMOKE_SIZES
        steps, warmup, repeats = min(steps, 2), 0, 1
        workload = SMOKE_WORKLOAD
    sizes = resolve_sizes(sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES))
    isolate = (not smoke) if isolate is None else isolate
    frameworks: list[str] = ["alignkit"]
    messages: list[str] = []
    if "trl" in (compare or []):
        if trl_available():
            frameworks.append("trl")
        else:
            messages.append("trl is not installed: the TRL comparison is skipped (pip install trl)")
    for message in messages:
        print(f"[bench] {message}")
    report: dict[str, Any] = {"meta": environment(device, dtype, threads), "config": {
        "algorithms": algorithms, "sizes": [size_dict(s) for s in sizes], "workload": asdict(workload), "steps": steps,
        "warmup": warmup, "repeats": repeats, "frameworks": frameworks, "group_by_length": group_by_length,
        "shared_prompt": shared_prompt, "isolate": isolate, "deterministic": deterministic,
        "exact_memory": exact_memory, "precision": precision},
        "messages": messages, "results": []}
    report["roofline_peak"] = roofline.peak_roofline(device, roofline.compute_dtype(precision, dtype),
                                                    budget_s=0.05 if smoke else 1.0, side=256 if smoke else None)
    root = Path(tempfile.mkdtemp(prefix="alignkit-bench-assets-"))
    try:
        for size in sizes:
            paths = prepare_assets(root / size.name, size, workload, seed)
            for algorithm in algorithms:
                runs: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
                for repeat in range(repeats):
                    for framework in frameworks:  # interleaved: ours, theirs, ours, theirs, ...
                        spec = {"framework": framework, "algorithm": algorithm, "size": size_dict(size),
                                "workload": asdict(workload), "paths": paths, "steps": steps, "warmup": warmup,
                                "device": device, "dtype": dtype, "precision": precision, "threads": threads,
                                "seed": seed + repeat,
                                "deterministic": deterministic, "smoke": smoke,
                                "mmap_threshold": 65536 if exact_memory else None,
                                "group_by_length": group_by_length, "shared_prompt": shared_prompt}
                        started = time.perf_counter()
                        result = measure(spec, isolate)
                        result["wall_s"] = time.perf_counter() - started
                        runs[framework].append(result)
                        _progress(size, algorithm, framework, repeat, result)
                for framework, results in runs.items():
                    if results:
                        report["results"].append(aggregate(size, algorithm, framework, results,
                                                           report["roofline_peak"]["flops_per_s"],
                                                           report["roofline_peak"]["flops_per_s_cpu"]))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    report["ratios"] = ratios(report["results"])
    print_table(report)
    path = Path(output) if output else Path("runs") / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"[bench] results written to {path}")
    return report


def _progress(size: Size, algorithm: str, framework: str, repeat: int, result: dict[str, Any]) -> None:
    if "error" in result:
        print(f"[bench] {size.name} {algorithm} {framework} #{repeat}: {result['error']}", flush=True)
    else:
        print(f"[bench] {size.name} {algorithm} {framework} #{repeat}: {result['time_per_step_s'] * 1e3:.1f} ms/step, "
              f"{result['train_tokens_per_s']:.0f} train tok/s, peak {result['peak_mem_mb']:.0f} MB", flush=True)


def environment(device: str, dtype: str, threads: int | None) -> dict[str, Any]:
    import lightning
    import torch
    import transformers

    meta = {"date": datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
            "device": device, "dtype": dtype, "cpu_count": os.cpu_count(),
            "threads": threads or torch.get_num_threads(), "machine": platform.machine()}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if trl_available():
        from importlib.metadata import version

        meta["trl"] = version("trl")
    return meta


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value * scale:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The results as a table: each time-based figure on the wall clock and on the CPU clock (``wall|cpu``)."""
    peak = report["roofline_peak"]["flops_per_s"]
    print(f"\n[bench] device {report['meta']['device']} ({report['meta']['dtype']}), "
          f"{report['meta']['threads']} threads; peak matmul {peak / 1e9:.1f}|"
          f"{report['roofline_peak']['flops_per_s_cpu'] / 1e9:.1f} GFLOP/s; medians of "
          f"{report['config']['repeats']} repeats; figures as wall|cpu clock")
    header = (f"{'size':<6} {'stage':<4} {'framework':<16} {'params':>6} {'ms/step':>13} {'train tok/s':>13} "
              f"{'gen tok/s':>11} {'pad%':>5} {'peak MB':>7} {'MFU %':>11} {'MFUpk %':>11}")
    print(header)
    print("-" * len(header))
    pair = lambda r, key, scale=1.0, digits=0: (  # noqa: E731
        f"{_fmt(r.get(key), scale, digits)}|{_fmt(r.get(key + '_cpu'), scale, digits)}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['size']:<6} {r['algorithm']:<4} {r['framework']:<16} error: {r['error'].splitlines()[-1]}")
            continue
        print(f"{r['size']:<6} {r['algorithm']:<4} {r['framework']:<16} {_fmt(r.get('params'), 1e-6, 1) + 'M':>6} "
              f"{pair(r, 'time_per_step_s', 1e3, 0):>13} {pair(r, 'train_tokens_per_s'):>13} "
              f"{pair(r, 'gen_tokens_per_s'):>11} {_fmt(r.get('pad_fraction'), 100, 1):>5} "
              f"{_fmt(r.get('peak_mem_mb')):>7} {pair(r, 'mfu', 100, 1):>11} {pair(r, 'mfu_peak', 100, 1):>11}")
    if report.get("ratios"):
        print("\nratios ours/theirs (medians): speed-up in tokens/s (online: generated tokens per second of "
              "iteration) on the wall|cpu clock; peak memory")
        for q in report["ratios"]:
            print(f"  {q['size']:<6} {q['algorithm']:<4} {q['ours']:<16} vs {q['theirs']:<4}: speed-up "
                  f"{q['speedup']:.2f}x|{q['speedup_cpu']:.2f}x, memory {q['memory_ratio']:.2f}x")
