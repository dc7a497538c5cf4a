"""Render ``alignkit bench`` JSON results as Markdown tables (the tables of ``benchmarks/README.md``).

    python -m alignkit_benchmarks.report runs/bench/bench-*.json > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(value, scale: float = 1.0, digits: int = 0) -> str:
    if value is None or value != value:
        return "–"
    return f"{value * scale:,.{digits}f}"


def results_table(reports: list[dict]) -> str:
    lines = ["| size | stage | framework | ms/step wall | ms/step CPU | train tok/s (CPU) | gen tok/s (CPU) | "
             "pad % | peak MB | MFU (CPU) | MFU vs peak (CPU) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for report in reports:
        for r in report["results"]:
            if "error" in r:
                error = r["error"].splitlines()[-1]
                lines.append(f"| {r['size']} | {r['algorithm']} | {r['framework']} | error: {error} |" + " |" * 8)
                continue
            lines.append(
                f"| {r['size']} | {r['algorithm']} | {r['framework']} | {_f(r.get('time_per_step_s'), 1e3)} | "
                f"{_f(r.get('time_per_step_s_cpu'), 1e3)} | {_f(r.get('train_tokens_per_s_cpu'))} | "
                f"{_f(r.get('gen_tokens_per_s_cpu'))} | {_f(r.get('pad_fraction'), 100, 1)} | "
                f"{_f(r.get('peak_mem_mb'))} | {_f(r.get('mfu_cpu'), 100, 1)}% | "
                f"{_f(r.get('mfu_peak_cpu'), 100, 1)}% |")
    return "\n".join(lines)


def ratios_table(reports: list[dict]) -> str:
    lines = ["| size | stage | ours | vs | speed-up (CPU clock) | speed-up (wall) | peak memory ours/theirs |",
             "|---|---|---|---|---:|---:|---:|"]
    for report in reports:
        for q in report.get("ratios", []):
            lines.append(f"| {q['size']} | {q['algorithm']} | {q['ours']} | {q['theirs']} | "
                         f"{_f(q['speedup_cpu'], 1, 2)}× | {_f(q['speedup'], 1, 2)}× | "
                         f"{_f(q['memory_ratio'], 1, 2)}× |")
    return "\n".join(lines)


def memory_table(reports: list[dict]) -> str:
    """Peak memory (MB above the post-import RSS) of alignkit and each other framework, and the ratio."""
    lines = ["| size | stage | alignkit MB | other | other MB | alignkit ÷ other |", "|---|---|---:|---|---:|---:|"]
    for report in reports:
        rows = {(r["size"], r["algorithm"], r["framework"]): r for r in report["results"] if "error" not in r}
        for q in report.get("ratios", []):
            ours, theirs = rows[(q["size"], q["algorithm"], q["ours"])], rows[(q["size"], q["algorithm"], q["theirs"])]
            lines.append(f"| {q['size']} | {q['algorithm']} | {_f(ours.get('peak_mem_mb'))} | {q['theirs']} | "
                         f"{_f(theirs.get('peak_mem_mb'))} | {_f(q['memory_ratio'], 1, 2)}× |")
    return "\n".join(lines)


def phases_table(reports: list[dict]) -> str:
    lines = ["| size | framework | step | generation | score | experience | update |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for report in reports:
        for r in report["results"]:
            if "generated_tokens_per_step" not in r or "error" in r:  # online stages only
                continue
            p = {k: v * 1e3 for k, v in r.get("phases_cpu_s", {}).items()}
            experience = p.get("experience", p.get("rollout+score+experience", 0.0) - p.get("rollout", 0.0)
                               - p.get("score", 0.0))
            lines.append(f"| {r['size']} | {r['framework']} | {_f(p.get('step'))} | {_f(p.get('rollout'))} | "
                         f"{_f(p.get('score'))} | {_f(experience)} | {_f(p.get('update'))} |")
    return "\n".join(lines)


def main(paths: list[str]) -> None:
    reports = [json.loads(Path(p).read_text()) for p in paths]
    meta = reports[0]["meta"]
    print(f"{meta['date']}: torch {meta['torch']}, transformers {meta['transformers']}, lightning {meta['lightning']}, "
          f"trl {meta.get('trl', '–')}; {meta['device']} {meta['dtype']}, {meta['threads']} thread(s) of "
          f"{meta['cpu_count']} CPUs; medians of {reports[0]['config']['repeats']} interleaved repeats; "
          f"group_by_length={reports[0]['config'].get('group_by_length')}, "
          f"exact_memory={reports[0]['config'].get('exact_memory')}\n")
    print(results_table(reports), "\n")
    print(ratios_table(reports), "\n")
    print("Peak memory (MB above the post-import RSS):\n")
    print(memory_table(reports), "\n")
    print("Online step phases (CPU ms, medians):\n")
    print(phases_table(reports))


if __name__ == "__main__":
    main(sys.argv[1:])
