"""From recorded steps to figures: FLOPs, throughputs, padding waste and MFU of one measurement; medians over
repeats; ours/theirs ratios."""

from __future__ import annotations

import statistics
from typing import Any

from alignkit_benchmarks import roofline
from alignkit_benchmarks.flops import ModelShape, step_flops
from alignkit_benchmarks.sizes import Size, Workload
from alignkit_benchmarks.stages import algorithm_class


def finish_result(spec: dict[str, Any], result: dict[str, Any], shape: ModelShape,
                  rm_shape: ModelShape | None = None) -> dict[str, Any]:
    """Add FLOPs, throughputs, padding waste and MFU (roofline timed now, in this process) to a result.
    Every time-based figure exists on the wall clock and, suffixed ``_cpu``, on the process CPU clock."""
    stage, work = spec["algorithm"], Workload(**spec["workload"])
    online = algorithm_class(stage).online
    per_step = result.get("per_step", [])
    for step in per_step:  # a trainer whose update is not timed on its own: the rest of the step
        for clock in ("time", "cpu"):
            if f"{clock}/rollout+score+experience" in step and f"{clock}/update" not in step:
                step[f"{clock}/update"] = step[f"{clock}/step"] - step[f"{clock}/rollout+score+experience"]
    if per_step:
        keys = sorted({k for s in per_step for k in s})
        result["median"] = {k: statistics.median(s.get(k, 0.0) for s in per_step) for k in keys}
    med = result.get("median", {})
    flops = [step_flops(stage, s, shape, rm_shape or shape, work, spec.get("reference", "live")) for s in per_step]
    result["params"] = shape.params
    result["matmul_params"] = shape.matmul_params
    result["flops_per_step"] = statistics.median(flops) if flops else 0.0
    real, padded = med.get("tokens/real", 0.0), med.get("tokens/padded", 0.0)
    result["pad_fraction"] = 1.0 - real / padded if padded else 0.0
    m = int(max(padded, 1))
    inner = int(spec["size"]["model"]["intermediate_size"])
    result["roofline_flops_per_s"], result["roofline_flops_per_s_cpu"] = roofline.time_matmul(
        m, shape.hidden, inner, spec["device"], roofline.compute_dtype(spec.get("precision"), spec["dtype"]),
        budget_s=0.05 if spec.get("smoke") else 0.3)
    result["roofline_shape"] = [m, shape.hidden, inner]
    rate = lambda amount, seconds: amount / seconds if seconds > 0 else 0.0  # noqa: E731
    for clock, suffix in (("time", ""), ("cpu", "_cpu")):
        step_time = med.get(f"{clock}/step", float("nan"))
        achieved = [rate(f, s[f"{clock}/step"]) for f, s in zip(flops, per_step)]
        result[f"flops_per_s{suffix}"] = statistics.median(achieved) if achieved else 0.0
        result[f"time_per_step_s{suffix}"] = step_time
        if online:
            generation = med.get(f"{clock}/rollout", 0.0)
            result[f"gen_tokens_per_s{suffix}"] = rate(med.get("tokens/generated", 0.0), generation)
            result[f"train_tokens_per_s{suffix}"] = rate(work.update_epochs * real, med.get(f"{clock}/update", 0.0))
            result[f"iteration_tokens_per_s{suffix}"] = rate(med.get("tokens/generated", 0.0), step_time)
        else:
            result[f"train_tokens_per_s{suffix}"] = rate(real, step_time)
        result[f"mfu{suffix}"] = result[f"flops_per_s{suffix}"] / result[f"roofline_flops_per_s{suffix}"]
    if online:
        result["generated_tokens_per_step"] = med.get("tokens/generated", 0.0)
    if not spec.get("keep_steps"):
        result.pop("per_step", None)
    return result


METRICS = tuple(f"{name}{suffix}" for name in ("time_per_step_s", "train_tokens_per_s", "gen_tokens_per_s",
                                                "iteration_tokens_per_s", "flops_per_s", "mfu")
                for suffix in ("", "_cpu")) + (
    "peak_mem_mb", "peak_rss_mb", "flops_per_step", "roofline_flops_per_s", "roofline_flops_per_s_cpu", "pad_fraction",
    "generated_tokens_per_step",
    "params")


def aggregate(size: Size, algorithm: str, framework: str, results: list[dict[str, Any]],
              peak_flops: float, peak_flops_cpu: float | None = None) -> dict[str, Any]:
    """Medians over repeats of every metric (and the per-repeat values)."""
    ok = [r for r in results if "error" not in r]
    row: dict[str, Any] = {"size": size.name, "algorithm": algorithm, "framework": framework, "repeats": len(ok)}
    if not ok:
        row["error"] = results[0].get("error")
        return row
    for key in METRICS:
        values = [r[key] for r in ok if key in r]
        if values:
            row[key] = statistics.median(values)
            row[f"{key}/all"] = values
    row["mfu_peak"] = row.get("flops_per_s", 0.0) / peak_flops if peak_flops else 0.0
    peak_flops_cpu = peak_flops_cpu or peak_flops
    row["mfu_peak_cpu"] = row.get("flops_per_s_cpu", 0.0) / peak_flops_cpu if peak_flops_cpu else 0.0
    for clock, name in (("time/", "phases_s"), ("cpu/", "phases_cpu_s")):
        phases = sorted({k for r in ok for k in r.get("median", {}) if k.startswith(clock)})
        row[name] = {k.removeprefix(clock): statistics.median(r["median"].get(k, 0.0) for r in ok) for k in phases}
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / theirs for each (size, stage): speed-up in tokens/s (online stages, which report
    ``iteration_tokens_per_s``: generated tokens per second of iteration) and memory ratio."""
    out = []
    keyed = {(r["size"], r["algorithm"], r["framework"]): r for r in rows if "error" not in r}
    for (size, algorithm, framework), theirs in keyed.items():
        ours = keyed.get((size, algorithm, "alignkit"))
        if framework == "alignkit" or ours is None:
            continue
        key = "iteration_tokens_per_s" if "iteration_tokens_per_s" in ours else "train_tokens_per_s"
        ratio = lambda k: ours.get(k, 0.0) / theirs[k] if theirs.get(k) else float("nan")  # noqa: E731
        out.append({"size": size, "algorithm": algorithm, "ours": "alignkit", "theirs": framework, "metric": key,
                    "speedup": ratio(key), "speedup_cpu": ratio(key + "_cpu"), "memory_ratio": ratio("peak_mem_mb")})
    return out
