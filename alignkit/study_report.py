"""The statistics, tables and plots of an ``alignkit study``, from its cells alone.

:func:`aggregate` turns the cell records (one per method and seed: a trajectory of evaluation points
``{step, kl, gold, proxy, win_rate}`` and its last point as ``final``) into, per method,

- ``n_seeds`` and the final gold reward's mean and IQM with 95 % percentile-bootstrap CIs over seeds;
- the mean proxy reward, KL (with its CI) and gold win rate against the reference;
- ``matched_kl``: gold at each KL budget, read off each run's trajectory (:func:`alignkit.stats.matched_kl`)
  and then aggregated over the seeds that reached it;
- ``fit``: Gao et al. (2022)'s form, fitted to the gold *gain* over the cell's starting point against
  d = √KL, pooled over seeds: ``d(α − βd)`` for best-of-n, ``d(α − β log d)`` for trained methods;

and, per pair of methods, the paired difference of final gold over the seeds both finished, with its CI and
the probability of improvement. :func:`write_report` writes ``study.json``, ``report.md`` and the PNGs.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any, cast

from alignkit import stats
from alignkit.run import atomic_write_json

STUDY_FILE = "study.json"
REPORT_FILE = "report.md"
GOLD_VS_KL_PNG = "gold_vs_sqrt_kl.png"
FINAL_GOLD_PNG = "final_gold.png"
PROXY_VS_GOLD_PNG = "proxy_vs_gold.png"


def _ok(cells: list[dict[str, Any]], method: str) -> list[dict[str, Any]]:
    return [c for c in cells if c.get("kind") == "method" and c["method"] == method and c["status"] == "ok"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def default_budgets(cells: list[dict[str, Any]], count: int = 4) -> list[float]:
    """``count`` KL budgets spread evenly up to the median of the trained runs' final KL (so that most runs
    reach most budgets); none when no run moved away from its reference."""
    finals = sorted(c["final"]["kl"] for c in cells if c.get("status") == "ok" and c.get("final")
                    and len(c.get("trajectory", [])) > 1)
    if not finals or finals[len(finals) // 2] <= 0:
        return []
    top = finals[len(finals) // 2]
    return sorted({float(f"{top * (i + 1) / count:.2g}") for i in range(count)})  # 2 significant digits


def _gain_points(cell: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(d = √KL, gold − gold of the first point) of a cell's trajectory."""
    trajectory = cell["trajectory"]
    start = trajectory[0]["gold"]
    return [math.sqrt(max(p["kl"], 0.0)) for p in trajectory], [p["gold"] - start for p in trajectory]


def _fit(method_cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Gao et al.'s form fitted to the pooled trajectories (None: fewer than 2 points away from the start)."""
    d, gain = [], []
    for cell in method_cells:
        cd, cg = _gain_points(cell)
        d += cd
        gain += cg
    best_of_n = all("n" in p for c in method_cells for p in c["trajectory"])
    try:
        fit = stats.fit_best_of_n(d, gain) if best_of_n else stats.fit_rl(d, gain)
    except ValueError:
        return None
    return fit.to_dict()


def aggregate(cells: list[dict[str, Any]], methods: list[str], kl_budgets: list[float] | None = None,
              seed: int = 0) -> dict[str, Any]:
    """The per-method aggregates and the pairwise comparisons of :mod:`alignkit.study_report`'s docstring.

    Args:
        cells: the cell records (``kind``, ``method``, ``seed``, ``status``, ``trajectory``, ``final``).
        methods: the methods, in the order of the tables.
        kl_budgets: KL budgets of the matched-KL comparison (default: :func:`default_budgets`).
        seed: seed of the bootstrap resampling.
    """
    budgets = list(kl_budgets) if kl_budgets is not None else default_budgets(cells)
    out: dict[str, Any] = {"kl_budgets": budgets, "methods": {}, "pairs": {}}
    finals: dict[str, dict[int, float]] = {}
    for name in methods:
        ok = _ok(cells, name)
        failed = [c["seed"] for c in cells if c.get("kind") == "method" and c["method"] == name and c["status"] != "ok"]
        gold = [c["final"]["gold"] for c in ok]
        finals[name] = {c["seed"]: c["final"]["gold"] for c in ok}
        entry: dict[str, Any] = {"n_seeds": len(ok), "seeds": [c["seed"] for c in ok], "failed_seeds": failed}
        if ok:
            mean, iqm = stats.mean_ci(gold, seed=seed), stats.iqm_ci(gold, seed=seed)
            kl = stats.mean_ci([c["final"]["kl"] for c in ok], seed=seed)
            entry.update(gold_mean=mean.estimate, gold_ci_low=mean.low, gold_ci_high=mean.high,
                         gold_iqm=iqm.estimate, gold_iqm_ci_low=iqm.low, gold_iqm_ci_high=iqm.high,
                         kl_mean=kl.estimate, kl_ci_low=kl.low, kl_ci_high=kl.high,
                         proxy_mean=_mean([c["final"]["proxy"] for c in ok if c["final"].get("proxy") is not None]),
                         win_rate_mean=_mean([c["final"]["win_rate"] for c in ok
                                              if c["final"].get("win_rate") is not None]))
            matched = {}
            for budget, values in zip(budgets, zip(*(stats.matched_kl([p["kl"] for p in c["trajectory"]],
                                                                      [p["gold"] for p in c["trajectory"]], budgets)
                                                     for c in ok)) if budgets else []):
                reached = [v for v in values if v is not None]
                interval = stats.mean_ci(reached, seed=seed) if reached else None
                matched[f"{budget:g}"] = {"n": len(reached), "gold_mean": interval.estimate if interval else None,
                                          "ci_low": interval.low if interval else None,
                                          "ci_high": interval.high if interval else None}
            entry["matched_kl"] = matched
            entry["fit"] = _fit(ok)
        out["methods"][name] = entry
    for a, b in combinations(methods, 2):
        common = sorted(set(finals[a]) & set(finals[b]))
        if not common:
            continue
        xa, xb = [finals[a][s] for s in common], [finals[b][s] for s in common]
        diff = stats.paired_difference_ci(xa, xb, seed=seed)
        poi = stats.probability_of_improvement(xa, xb, seed=seed)
        out["pairs"][f"{a} - {b}"] = {"a": a, "b": b, "n": len(common), "seeds": common,
                                      "difference": diff.estimate, "ci_low": diff.low, "ci_high": diff.high,
                                      "probability_of_improvement": poi.estimate, "poi_ci_low": poi.low,
                                      "poi_ci_high": poi.high}
    return out


# ------------------------------------------------------------------------------------------ claims


def _interval_text(interval: stats.Interval) -> str:
    return _ci(interval.estimate, interval.low, interval.high)


def _claim_greater(agg: dict[str, Any], a: str, b: str) -> tuple[bool, str]:
    pair = agg["pairs"].get(f"{a} - {b}")
    flipped = agg["pairs"].get(f"{b} - {a}")
    if pair is None and flipped is not None:  # the table holds b − a: negate
        pair = {**flipped, "difference": -flipped["difference"],
                "ci_low": None if flipped["ci_high"] is None else -flipped["ci_high"],
                "ci_high": None if flipped["ci_low"] is None else -flipped["ci_low"]}
    if pair is None:
        return False, f"no seed where both {a} and {b} finished"
    supported = pair["ci_low"] is not None and pair["ci_low"] > 0
    return supported, (f"gold {a} − {b} = {_ci(pair['difference'], pair['ci_low'], pair['ci_high'])} over "
                       f"{pair['n']} paired seeds")


def _claim_overoptimisation(cells: list[dict[str, Any]], a: str, seed: int) -> tuple[bool, str]:
    runs = [c for c in _ok(cells, a) if len(c["trajectory"]) > 2
            and all(p.get("proxy") is not None for p in c["trajectory"])]
    if len(runs) < 2:
        return False, f"fewer than 2 runs of {a} with a proxy trajectory"
    length = min(len(c["trajectory"]) for c in runs)
    mean_gold = [sum(c["trajectory"][k]["gold"] for c in runs) / len(runs) for k in range(length)]
    peak = max(range(length), key=mean_gold.__getitem__)  # one peak for all seeds: no per-seed selection
    drop = stats.mean_ci([c["trajectory"][peak]["gold"] - c["trajectory"][-1]["gold"] for c in runs], seed=seed)
    rise = stats.mean_ci([c["trajectory"][-1]["proxy"] - c["trajectory"][peak]["proxy"] for c in runs], seed=seed)
    step = runs[0]["trajectory"][peak]["step"]
    supported = all(i.low is not None and i.low > 0 for i in (drop, rise))
    return supported, (f"mean gold peaks at step {step}; from there to the end gold falls by {_interval_text(drop)} "
                       f"while the proxy rises by {_interval_text(rise)} ({len(runs)} seeds)")


def _claim_best_of_n_fit(agg: dict[str, Any], a: str) -> tuple[bool, str]:
    fit = (agg["methods"].get(a) or {}).get("fit")
    if not fit:
        return False, f"no fit for {a}"
    supported = fit["r2"] is not None and fit["r2"] >= 0.9 and fit["beta"] > 0
    return supported, (f"{fit['form']}: α = {fit['alpha']:.4f}, β = {fit['beta']:.4f}, R² = "
                       f"{_num(fit['r2'])} on {fit['n_points']} points")


def evaluate_claims(claims: list[dict[str, Any]], cells: list[dict[str, Any]], agg: dict[str, Any],
                    seed: int = 0) -> list[dict[str, Any]]:
    """Each claim (:class:`alignkit.study.Claim` as a dict) with ``supported`` and the ``evidence`` in words."""
    out = []
    for claim in claims:
        if claim["kind"] == "greater":
            supported, evidence = _claim_greater(agg, claim["a"], claim["b"])
        elif claim["kind"] == "overoptimisation":
            supported, evidence = _claim_overoptimisation(cells, claim["a"], seed)
        else:
            supported, evidence = _claim_best_of_n_fit(agg, claim["a"])
        out.append({**claim, "supported": supported, "evidence": evidence})
    return out


# ------------------------------------------------------------------------------------------ markdown


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _ci(estimate: float | None, low: float | None, high: float | None, spec: str = ".3f") -> str:
    if estimate is None:
        return "-"
    if low is None or high is None:
        return f"{estimate:{spec}} (one seed, no CI)"
    return f"{estimate:{spec}} [{low:{spec}}, {high:{spec}}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(study: dict[str, Any]) -> str:
    """``report.md``: the header, final gold, paired differences, matched KL, fits and failed cells."""
    head, agg = study["study"], study["aggregates"]
    lines = [f"# Study `{head['name']}`", "",
             f"- command: `{head.get('command') or 'alignkit study'}`",
             f"- date: {head['date']}; machine: {head['machine']}; wall time {head['wall_time_s']:.0f} s "
             f"({head['executor']} executor, {head['workers']} workers, "
             f"{head['threads_per_worker']} torch thread(s) each)",
             f"- seeds: {', '.join(str(s) for s in head['seeds'])}; intervals are 95 % percentile-bootstrap CIs "
             f"over seeds; methods of one seed share their upstream stages, so differences are paired.", ""]
    lines += ["## Final gold reward", ""]
    rows = []
    for name, m in agg["methods"].items():
        if not m["n_seeds"]:
            rows.append([name, "0", "-", "-", "-", "-", "-"])
            continue
        rows.append([name, str(m["n_seeds"]), _ci(m["gold_mean"], m["gold_ci_low"], m["gold_ci_high"]),
                     _ci(m["gold_iqm"], m["gold_iqm_ci_low"], m["gold_iqm_ci_high"]), _num(m["proxy_mean"]),
                     _ci(m["kl_mean"], m["kl_ci_low"], m["kl_ci_high"]), _num(m["win_rate_mean"], ".1%")])
    lines += _table(["method", "seeds", "gold mean [95% CI]", "gold IQM [95% CI]", "proxy", "KL (nats) [95% CI]",
                     "win rate"], rows)
    if agg["pairs"]:
        lines += ["", "## Paired differences (final gold, A − B)", ""]
        lines += _table(["A − B", "seeds", "difference [95% CI]", "P(A > B) [95% CI]"], [
            [pair, str(p["n"]), _ci(p["difference"], p["ci_low"], p["ci_high"]),
             _ci(p["probability_of_improvement"], p["poi_ci_low"], p["poi_ci_high"], ".2f")]
            for pair, p in agg["pairs"].items()])
    if agg["kl_budgets"]:
        lines += ["", "## Gold at matched KL", "",
                  "Gold where each run first reached the KL budget (interpolated on its trajectory), mean over the "
                  "seeds that reached it [95% CI] (n)."]
        budgets = [f"{b:g}" for b in agg["kl_budgets"]]
        rows = []
        for name, m in agg["methods"].items():
            cells = []
            for b in budgets:
                e = (m.get("matched_kl") or {}).get(b)
                if not e or not e["n"]:
                    cells.append("-")
                else:
                    cells.append(f"{_ci(e['gold_mean'], e['ci_low'], e['ci_high'])} ({e['n']})")
            rows.append([name, *cells])
        lines += [""] + _table(["method", *(f"KL = {b}" for b in budgets)], rows)
    fits = [(n, m["fit"]) for n, m in agg["methods"].items() if m.get("fit")]
    if fits:
        lines += ["", "## Gao et al. (2022) fits (gold gain vs d = √KL, pooled over seeds)", ""]
        lines += _table(["method", "form", "α", "β", "R²", "points"], [
            [n, f["form"], _num(f["alpha"], ".4f"), _num(f["beta"], ".4f"), _num(f["r2"]), str(f["n_points"])]
            for n, f in fits])
    if study.get("claims"):
        lines += ["", "## Claims", ""]
        lines += _table(["claim", "supported by the CIs", "evidence"], [
            [c["name"], "yes" if c["supported"] else "no", c["evidence"]] for c in study["claims"]])
    failed = [c for c in study["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += _table(["cell", "error"], [[f"{c['method']} seed {c['seed']}", c.get("error", "").replace("|", "/")]
                                            for c in failed])
    timing = [c for c in study["cells"] if c["status"] == "ok" and c.get("training")]  # the trained cells
    if timing:
        share = sum(c.get("eval_time_s", 0.0) for c in timing) / max(sum(c["wall_time_s"] for c in timing), 1e-9)
        lines += ["", f"In-training evaluation took {share:.1%} of the trained cells' wall time."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ plots


def _figure(width: float = 6.4, height: float = 4.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()


def _grid(cells: list[dict[str, Any]], points: int = 24) -> list[float]:
    """KL values from the highest starting KL of the runs (≈ 0, the estimate's noise around it) to the highest KL
    reached: every run has a value at the first one, so the curve's start averages all the seeds."""
    start = max((c["trajectory"][0]["kl"] for c in cells), default=0.0)
    top = max((p["kl"] for c in cells for p in c["trajectory"]), default=0.0)
    return [start + (top - start) * i / (points - 1) for i in range(points)] if top > start else [start]


def plot_gold_vs_kl(study: dict[str, Any], path: Path, attr: str = "gold") -> None:
    """Mean ``attr`` (gold or proxy) against √KL per method with a 95 % CI band over seeds (where at least
    two seeds reached that KL), each run's trajectory read at a common grid of KL values; the fitted Gao form
    (plus the mean starting gold) as a dashed line; single points as markers with CI bars."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    tab10 = colormaps["tab10"]
    assert isinstance(tab10, ListedColormap)  # a qualitative map: a list of colours
    colors = cast("tuple[tuple[float, float, float], ...]", tab10.colors)  # matplotlib types it as any ArrayLike
    fig, ax = _figure()
    for i, name in enumerate(study["aggregates"]["methods"]):
        ok = [c for c in _ok(study["cells"], name) if all(p.get(attr) is not None for p in c["trajectory"])]
        if not ok:
            continue
        color = colors[i % len(colors)]
        if all(len(c["trajectory"]) == 1 for c in ok):  # an evaluated policy: one point per seed
            values = [c["trajectory"][0][attr] for c in ok]
            x = _mean([math.sqrt(max(c["trajectory"][0]["kl"], 0.0)) for c in ok])
            ci = stats.mean_ci(values, n_resamples=2000)
            err = ([[ci.estimate - ci.low], [ci.high - ci.estimate]]
                   if ci.low is not None and ci.high is not None else None)  # both or neither are None
            ax.errorbar([x], [ci.estimate], yerr=err, fmt="o", color=color, capsize=4, label=f"{name} (n={len(ok)})")
            continue
        grid = _grid(ok)
        xs, mean, low, high = [], [], [], []
        for kl in grid:
            at_kl = (stats.matched_kl([p["kl"] for p in c["trajectory"]], [p[attr] for p in c["trajectory"]], [kl])[0]
                     for c in ok)
            values = [v for v in at_kl if v is not None]
            if len(values) >= 2:
                ci = stats.mean_ci(values, n_resamples=2000)
                xs.append(math.sqrt(max(kl, 0.0)))
                mean.append(ci.estimate)
                low.append(ci.low)
                high.append(ci.high)
        if xs:
            ax.plot(xs, mean, color=color, label=f"{name} (n={len(ok)})")
            ax.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)
        fit = study["aggregates"]["methods"][name].get("fit")
        if attr == "gold" and fit and xs:
            start = _mean([c["trajectory"][0]["gold"] for c in ok])
            form = stats.CurveFit(**{k: fit[k] for k in ("form", "alpha", "beta", "r2", "n_points")})
            d = [max(xs) * j / 40 for j in range(41)]
            ax.plot(d, [start + g for g in form.predict(d)], "--", color=color, linewidth=1,
                    label=f"{name} fit (R² {_num(fit['r2'], '.2f')})")
    ax.set_xlabel("√KL(π ‖ π_ref)  [√nats]")
    ax.set_ylabel(f"{attr} reward")
    ax.set_title(f"{attr.capitalize()} reward vs √KL (mean, 95% CI band over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def plot_final_gold(study: dict[str, Any], path: Path) -> None:
    """Final gold per method: mean with its 95 % CI bar, and each seed's value as a dot."""
    fig, ax = _figure()
    names = [n for n, m in study["aggregates"]["methods"].items() if m["n_seeds"]]
    for i, name in enumerate(names):
        m = study["aggregates"]["methods"][name]
        err = ([[m["gold_mean"] - m["gold_ci_low"]], [m["gold_ci_high"] - m["gold_mean"]]]
               if m["gold_ci_low"] is not None else None)
        ax.bar([i], [m["gold_mean"]], yerr=err, capsize=6, alpha=0.6)
        seeds = [c["final"]["gold"] for c in _ok(study["cells"], name)]
        ax.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [f"{n}\n(n={study['aggregates']['methods'][n]['n_seeds']})" for n in names])
    ax.set_ylabel("final gold reward")
    ax.set_title("Final gold reward (mean, 95% CI; dots: seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ output


def write_report(root: Path, header: dict[str, Any], cells: list[dict[str, Any]],
                 kl_budgets: list[float] | None = None, wandb: bool = False) -> dict[str, Any]:
    """Aggregate ``cells`` and write ``study.json``, ``report.md`` and the plots to ``root`` (and, with ``wandb``,
    one offline wandb run of job type ``study`` in the study's group); print the report; return the study."""
    study: dict[str, Any] = {"study": header, "cells": cells,
                             "aggregates": aggregate(cells, header["methods"], kl_budgets)}
    # the flat per-method entries (`methods.<name>.gold_mean`, ...) and the pairs at the top level
    study["methods"], study["pairs"] = study["aggregates"]["methods"], study["aggregates"]["pairs"]
    study["claims"] = evaluate_claims(header.get("claims") or [], cells, study["aggregates"])
    atomic_write_json(root / STUDY_FILE, study)
    report = markdown(study)
    (root / REPORT_FILE).write_text(report)
    plots = []
    if any(c["status"] == "ok" and c.get("kind") == "method" for c in cells):
        plot_gold_vs_kl(study, root / GOLD_VS_KL_PNG)
        plot_gold_vs_kl(study, root / PROXY_VS_GOLD_PNG, attr="proxy")
        plot_final_gold(study, root / FINAL_GOLD_PNG)
        plots = [GOLD_VS_KL_PNG, PROXY_VS_GOLD_PNG, FINAL_GOLD_PNG]
    if wandb:
        log_to_wandb(root, study, plots)
    print(report)
    print(f"[study] -> {root / STUDY_FILE}, {root / REPORT_FILE}" + (f", {', '.join(plots)}" if plots else ""))
    return study


def log_to_wandb(root: Path, study: dict[str, Any], plots: list[str]) -> None:
    """One offline wandb run (job type ``study``, the study's group): the tables, the plots and, in its
    summary, each method's ``gold_mean`` / CI / ``kl_mean``."""
    import os

    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    name = study["study"]["name"]
    run = wandb.init(project="alignkit", group=name, job_type="study", name=f"{name}/study", dir=str(root),
                     mode="offline", config=study["study"]["config"], reinit="finish_previous")
    try:
        columns: list[str | int] = ["method", "n_seeds", "gold_mean", "gold_ci_low", "gold_ci_high", "kl_mean",
                                    "proxy_mean"]
        rows = [[n, *(m.get(c) for c in columns[1:])] for n, m in study["methods"].items()]
        pairs = [[p, v["n"], v["difference"], v["ci_low"], v["ci_high"], v["probability_of_improvement"]]
                 for p, v in study["pairs"].items()]
        run.log({"study/methods": wandb.Table(columns=columns, data=rows),
                 "study/pairs": wandb.Table(columns=["pair", "n", "difference", "ci_low", "ci_high", "poi"],
                                            data=pairs),
                 **{f"study/{Path(p).stem}": wandb.Image(str(root / p)) for p in plots}})
        for n, m in study["methods"].items():
            for key in ("gold_mean", "gold_ci_low", "gold_ci_high", "kl_mean"):
                if m.get(key) is not None:
                    run.summary[f"{n}/{key}"] = m[key]
    finally:
        run.finish()


__all__ = ["aggregate", "default_budgets", "evaluate_claims", "markdown", "write_report"]
