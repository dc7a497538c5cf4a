"""``alignkit compare``: compare finished runs offline, from their run directories alone.

Three kinds of run directory are understood, told apart by their ``study.json`` or ``metrics.json``:

- a study (``alignkit study``): its ``study.json``, whose report and plots are made again from its cells;
- a training run (``alignkit fit``, a pipeline's fit stage): ``{"algorithm", "global_step",
  "wall_time_s", "first", "final", ...}`` plus the per-step ``metrics.csv`` of Lightning's CSVLogger;
- an evaluation (``alignkit eval``): ``{"settings", "policies": {name: {"metrics": {"eval/*": ...}}}}``.

The command writes to its output folder

- ``comparison.md`` / ``comparison.json``: the summaries side by side, one column per training run and
  one column per evaluated policy (the markdown is also printed);
- ``gold_vs_kl.png`` / ``gold_vs_sqrt_kl.png``: gold and proxy reward of every evaluated policy against
  KL(π‖π_ref) and against √KL, the axis on which Gao et al. (2022) plot reward-model overoptimisation;
- ``reward_over_steps.png``: each training run's reward (or loss) curve from its ``metrics.csv``.

A plot with nothing to show (no evaluation among the runs, no training run with a ``metrics.csv``) is
left out and named in the summary. Nothing is recomputed and no model is loaded.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import DataError
from alignkit.io import atomic_write_text

COMPARISON_MD = "comparison.md"
COMPARISON_JSON = "comparison.json"
GOLD_VS_KL_PNG = "gold_vs_kl.png"
GOLD_VS_SQRT_KL_PNG = "gold_vs_sqrt_kl.png"
REWARD_OVER_STEPS_PNG = "reward_over_steps.png"
CSV_FILE = "metrics.csv"
STUDY_FILE = "study.json"

#: Per-step metric plotted for a training run: the first of these its ``metrics.csv`` holds.
STEP_METRICS = ("objective/scores", "rewards/margins", "train/loss")

#: Final metrics shown for training runs (a row appears when at least one run has the metric).
KEY_METRICS = ("objective/scores", "objective/kl", "objective/rlhf_reward", "rewards/accuracies",
               "rewards/margins", "val/loss", "val/rewards/accuracies", "val/ppl")

Value = float | int | str | None


# ------------------------------------------------------------------------------------------ loading


@dataclass
class Run:
    """One run directory and its ``metrics.json``."""

    name: str
    """Display name (the ``names`` given, else the folder's name, made unique)."""
    path: Path
    kind: Literal["train", "eval"]
    summary: dict[str, Any]
    """The parsed ``metrics.json``."""


def default_names(paths: list[Path]) -> list[str]:
    """Each run's folder name; runs whose folder names collide get their parent's name prefixed
    (``qs1/eval``, ``qs2/eval``), and a numeric suffix if that still collides."""
    base = [p.name or str(p) for p in paths]
    names = [f"{p.parent.name}/{n}" if base.count(n) > 1 and p.parent.name else n for p, n in zip(paths, base)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if names.count(name) == 1 else f"{name}#{seen[name]}")
    return unique


def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read a run directory's ``metrics.json`` and tell its kind.

    Raises:
        FileNotFoundError: the directory holds no ``metrics.json`` (the message names it).
        DataError: ``metrics.json`` is not JSON, or neither a training run's nor an evaluation's summary.
    """
    from alignkit.run import read_metrics  # Lightning: not for ``alignkit compare --help``

    path = Path(path)
    try:
        summary = read_metrics(path)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path / 'metrics.json'} is not valid JSON: {exc}") from None
    if isinstance(summary, dict) and isinstance(summary.get("policies"), dict):
        kind: Literal["train", "eval"] = "eval"
    elif isinstance(summary, dict) and isinstance(summary.get("final"), dict):
        kind = "train"
    else:
        raise DataError(f"{path / 'metrics.json'} is neither a training run's summary (no 'final' metrics) nor "
                        f"an evaluation's (no 'policies'); compare takes fit and eval run directories")
    return Run(name or path.name, path, kind, summary)


# ------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Row:
    """One table row: the key of the value in every column and the label shown."""

    key: str
    label: str


@dataclass
class Column:
    """One table column: a training run, or one policy of an evaluation."""

    name: str
    run: str
    """The run directory it comes from."""
    values: dict[str, Value] = field(default_factory=dict)


@dataclass
class Table:
    """Rows of named values, one column per run or policy."""

    title: str
    rows: list[Row]
    columns: list[Column]

    def cell(self, row: Row, column: Column) -> str:
        return format_value(row.key, column.values.get(row.key))

    def markdown(self) -> str:
        """A GitHub-flavoured markdown table under a ``##`` heading."""
        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"## {self.title}", "", line(["", *(c.name for c in self.columns)]),
                 line(["---", *("---:" for _ in self.columns)])]
        lines += [line([row.label, *(self.cell(row, c) for c in self.columns)]) for row in self.rows]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "columns": [asdict(c) for c in self.columns]}


def format_value(key: str, value: Value) -> str:
    """``-`` for a missing value, a percentage for rates, 4 significant digits for other floats."""
    if value is None:
        return "-"
    if isinstance(value, (int, str)):  # bool is an int
        return str(value)
    if key.endswith("win_rate"):
        return f"{value:.1%}"
    return f"{value:.4g}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def sqrt_kl(kl: float) -> float:
    """√KL, the x axis of Gao et al. (2022). A Monte-Carlo KL estimate can come out slightly negative;
    it is taken as 0 (no distance from the reference)."""
    return math.sqrt(max(kl, 0.0))


def training_table(runs: list[Run]) -> Table:
    """One column per training run: algorithm, recipe, steps, wall time, first and final ``train/loss``
    and the final value of each of :data:`KEY_METRICS` that some run logged."""
    columns = []
    for run in runs:
        first, final = run.summary.get("first") or {}, run.summary.get("final") or {}
        values: dict[str, Value] = {
            "algorithm": run.summary.get("algorithm"), "recipe": run.summary.get("recipe"),
            "global_step": run.summary.get("global_step"), "wall_time_s": _number(run.summary.get("wall_time_s")),
            "first/train/loss": _number(first.get("train/loss")), "final/train/loss": _number(final.get("train/loss")),
        }
        values.update({f"final/{k}": _number(final.get(k)) for k in KEY_METRICS})
        columns.append(Column(run.name, str(run.path), values))
    rows = [Row("algorithm", "algorithm"), Row("recipe", "recipe"), Row("global_step", "steps"),
            Row("wall_time_s", "wall time (s)"), Row("first/train/loss", "train/loss (first)"),
            Row("final/train/loss", "train/loss (final)"), *(Row(f"final/{k}", f"{k} (final)") for k in KEY_METRICS)]
    return Table("Training runs", _present(rows, columns), columns)


EVAL_ROWS = [Row("run", "evaluation"), Row("reference", "reference policy"),
             Row("eval/gold_reward", "gold reward"), Row("eval/gold_reward_std", "gold reward std"),
             Row("eval/proxy_reward", "proxy reward"), Row("eval/kl", "KL (nats)"), Row("sqrt_kl", "√KL"),
             Row("eval/win_rate", "gold win rate vs reference"),
             Row("eval/judge_win_rate", "judge win rate vs reference"), Row("eval/response_len", "response length"),
             Row("eval/distinct_2", "distinct-2"), Row("eval/best_of_n_gold", "best-of-n gold (proxy pick)")]


def eval_table(runs: list[Run]) -> Table:
    """One column per evaluated policy, named by the policy (``evaluation/policy`` when two evaluations
    hold policies of the same name): gold and proxy reward, KL and √KL, win rate, length, diversity."""
    entries = [(run, name, policy) for run in runs for name, policy in run.summary["policies"].items()]
    policy_names = [name for _, name, _ in entries]
    columns = []
    for run, name, policy in entries:
        metrics = {k: _number(v) for k, v in (policy.get("metrics") or {}).items()}
        kl = metrics.get("eval/kl")
        values: dict[str, Value] = {"run": run.name, "reference": (run.summary.get("settings") or {}).get("reference"),
                                    "path": policy.get("path"), **metrics,
                                    "sqrt_kl": None if kl is None else sqrt_kl(kl)}
        label = name if policy_names.count(name) == 1 else f"{run.name}/{name}"
        columns.append(Column(label, str(run.path), values))
    return Table("Evaluated policies", _present(EVAL_ROWS, columns), columns)


def _present(rows: list[Row], columns: list[Column]) -> list[Row]:
    """The rows that at least one column has a value for."""
    return [r for r in rows if any(c.values.get(r.key) is not None for c in columns)]


# ------------------------------------------------------------------------------------------ plot data


@dataclass
class KLPoint:
    """One evaluated policy (or the best-of-n baseline) on a reward-vs-KL plot."""

    label: str
    kl: float
    sqrt_kl: float
    gold: float
    proxy: float | None
    best_of_n: bool = False
    """The best-of-n baseline: KL is the analytic bound log n − (n−1)/n and no proxy mean is recorded."""


@dataclass
class KLSeries:
    """The points of one evaluation run."""

    name: str
    points: list[KLPoint]


def kl_series(runs: list[Run]) -> list[KLSeries]:
    """The reward-vs-KL series: one per evaluation run, one point per policy that has a gold reward and a KL
    (in the evaluation's order), plus the best-of-n baseline where the evaluation ran one."""
    series = []
    for run in runs:
        if run.kind != "eval":
            continue
        settings = run.summary.get("settings") or {}
        bon_kl = _number(settings.get("best_of_n_kl"))
        points = []
        for name, policy in run.summary["policies"].items():
            metrics = policy.get("metrics") or {}
            kl, gold = _number(metrics.get("eval/kl")), _number(metrics.get("eval/gold_reward"))
            if kl is None or gold is None:
                continue
            points.append(KLPoint(name, kl, sqrt_kl(kl), gold, _number(metrics.get("eval/proxy_reward"))))
            bon_gold = _number(metrics.get("eval/best_of_n_gold"))  # recorded on the reference only
            if bon_gold is not None and bon_kl is not None:
                label = f"best-of-{settings.get('best_of_n')} (KL bound)"
                points.append(KLPoint(label, bon_kl, sqrt_kl(bon_kl), bon_gold, None, best_of_n=True))
        if points:
            series.append(KLSeries(run.name, points))
    return series


@dataclass
class StepSeries:
    """One training run's per-step curve."""

    name: str
    metric: str
    steps: list[float]
    values: list[float]
    algorithm: str | None = None

    @property
    def label(self) -> str:
        """The run's name, with its algorithm when the name does not already say it."""
        if self.algorithm and self.algorithm.lower() not in self.name.lower():
            return f"{self.name} ({self.algorithm})"
        return self.name


def step_series(run: Run, metrics: tuple[str, ...] = STEP_METRICS) -> StepSeries | None:
    """The first of ``metrics`` present in the run's ``metrics.csv``, over the logged ``step`` (the row
    number when there is no ``step`` column). Rows where it is empty (e.g. validation rows) are skipped.
    None when the run has no ``metrics.csv`` or none of the metrics."""
    path = run.path / CSV_FILE
    if run.kind != "train" or not path.is_file():
        return None
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    metric = next((m for m in metrics if m in header), None)
    if metric is None:
        return None
    steps, values = [], []
    for i, row in enumerate(rows):
        value, step = row.get(metric) or "", row.get("step") or ""
        if value.strip():
            steps.append(float(step) if step.strip() else float(i))
            values.append(float(value))
    if not values:
        return None
    algorithm = run.summary.get("algorithm")
    return StepSeries(run.name, metric, steps, values, algorithm if isinstance(algorithm, str) else None)


# ------------------------------------------------------------------------------------------ plots


MARKERS = "osD^vPX*"


def _figure(panels: int, width: float = 5.6, height: float = 4.4):
    """A figure with ``panels`` axes side by side on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot_reward_vs_kl(series: list[KLSeries], path: Path, x: Literal["kl", "sqrt_kl"]) -> None:
    """Two panels, gold and proxy reward against ``x``: one colour and marker per series, each point
    labelled with its policy's name; the best-of-n baseline is a hollow marker (gold panel only)."""
    from matplotlib import color_sequences

    colors = color_sequences["tab10"]  # (the colours of the tab10 colour map)
    fig, (gold_ax, proxy_ax) = _figure(2)
    xlabel = "KL(π ‖ π_ref)  [nats]" if x == "kl" else "√KL(π ‖ π_ref)  [√nats]"
    for ax, attr, title in ((gold_ax, "gold", "Gold reward"), (proxy_ax, "proxy", "Proxy reward")):
        labelled: set[tuple[str, float]] = set()
        for i, s in enumerate(series):
            color, marker = colors[i % len(colors)], MARKERS[i % len(MARKERS)]
            points = [p for p in s.points if getattr(p, attr) is not None]
            if not points:
                continue
            for bon in (False, True):
                group = [p for p in points if p.best_of_n == bon]
                if group:
                    ax.scatter([getattr(p, x) for p in group], [getattr(p, attr) for p in group], s=48,
                               marker=marker, color=color, facecolors="none" if bon else color, linewidths=1.4,
                               label=None if bon else s.name, zorder=3)
            for p in points:
                px, py = getattr(p, x), getattr(p, attr)
                key = (p.label, round(px, 3))
                if key not in labelled:  # the same reference in several evaluations: labelled once
                    labelled.add(key)
                    ax.annotate(p.label, (px, py), xytext=(5, 4), textcoords="offset points", fontsize=8,
                                color=color)
        ax.set_title(f"{title} vs {'KL' if x == 'kl' else '√KL (Gao et al. 2022)'}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{attr} reward (mean over prompts)")
        ax.grid(alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(title="evaluation", fontsize=8, title_fontsize=8)
    fig.savefig(path, dpi=120)


def plot_steps(series: list[StepSeries], path: Path) -> None:
    """One panel per plotted metric (runs of different algorithms log different ones), one line per run."""
    from matplotlib import color_sequences

    colors = color_sequences["tab10"]  # (the colours of the tab10 colour map)
    metrics = list(dict.fromkeys(s.metric for s in series))
    fig, axes = _figure(len(metrics), width=5.2)
    for ax, metric in zip(axes, metrics):
        for i, s in enumerate(series):
            if s.metric == metric:
                ax.plot(s.steps, s.values, color=colors[i % len(colors)], marker=".", markersize=4, linewidth=1.4,
                        label=s.label)
        ax.set_title(f"{metric} over training")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(title="run", fontsize=8, title_fontsize=8)
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ command


def compare(runs: list[str], out: str | None = None, names: list[str] | None = None,
            x: Literal["kl", "sqrt_kl", "both"] = "both", step_metric: str | None = None) -> Path:
    """Compare finished runs offline: summaries side by side, reward-vs-KL and reward-over-steps plots.

    Training run directories (``alignkit fit``) give one table column each (algorithm, steps, wall time,
    first/final train loss, final key metrics) and one line on ``reward_over_steps.png``; evaluation
    directories (``alignkit eval``) give one column per evaluated policy (gold/proxy reward, KL, √KL, win
    rate, ...) and one series on ``gold_vs_kl.png`` / ``gold_vs_sqrt_kl.png``. Writes ``comparison.md``
    (also printed) and ``comparison.json`` beside the plots; reads only the run directories.

    Args:
        runs: run directories to compare, each holding a ``metrics.json``, or study directories (``study.json``).
        out: output folder (default: runs/compare/<timestamp>); existing comparison files are replaced.
        names: display names of the runs, one per run (default: the folders' names).
        x: which reward-vs-KL plots to draw: against KL, against √KL (Gao et al. 2022), or both.
        step_metric: metrics.csv column to plot over steps, tried before objective/scores,
            rewards/margins and train/loss (the first one a run logged is plotted).
    """
    if not runs:
        raise ValueError("give at least one run directory")
    if names is not None and len(names) != len(runs):
        raise ValueError(f"{len(names)} names for {len(runs)} runs; give one name per run")
    if names is not None and len(set(names)) != len(names):
        raise ValueError(f"names must be unique, got {names}")
    from alignkit.run import default_run_dir  # Lightning: not for ``alignkit compare --help``

    dest = Path(out) if out else default_run_dir("compare")
    studies = [Path(r) for r in runs if (Path(r) / STUDY_FILE).is_file()]
    for study_dir in studies:  # a study: its report, re-aggregated from its cells
        from alignkit.study_report import write_report

        study = json.loads((study_dir / STUDY_FILE).read_text())
        target = dest if len(studies) == 1 else dest / study_dir.name
        write_report(target, study["study"], study["cells"], study["aggregates"]["kl_budgets"])
    if len(studies) == len(runs):
        return dest
    paths = [Path(r) for r in runs if Path(r) not in studies]
    names = [n for r, n in zip(runs, names) if Path(r) not in studies] if names is not None else None
    loaded = [load_run(p, n) for p, n in zip(paths, names or default_names(paths))]
    train = [r for r in loaded if r.kind == "train"]
    evals = [r for r in loaded if r.kind == "eval"]
    tables = [t for t in (training_table(train) if train else None, eval_table(evals) if evals else None) if t]

    dest.mkdir(parents=True, exist_ok=True)
    for file in (GOLD_VS_KL_PNG, GOLD_VS_SQRT_KL_PNG, REWARD_OVER_STEPS_PNG):
        (dest / file).unlink(missing_ok=True)  # a plot of an earlier comparison never passes for this one's
    plots, skipped = [], []
    series = kl_series(loaded)
    kl_plots: tuple[tuple[Literal["kl", "sqrt_kl"], str], ...] = (("kl", GOLD_VS_KL_PNG),
                                                                  ("sqrt_kl", GOLD_VS_SQRT_KL_PNG))
    for axis, file in kl_plots:
        if x not in (axis, "both"):
            continue
        if series:
            plot_reward_vs_kl(series, dest / file, axis)
            plots.append(file)
        else:
            skipped.append(f"{file} (no evaluation run)")
    metrics = (step_metric, *STEP_METRICS) if step_metric else STEP_METRICS
    steps = [s for s in (step_series(r, metrics) for r in train) if s is not None]
    if steps:
        plot_steps(steps, dest / REWARD_OVER_STEPS_PNG)
        plots.append(REWARD_OVER_STEPS_PNG)
    else:
        skipped.append(f"{REWARD_OVER_STEPS_PNG} (no training run with a {CSV_FILE} holding {', '.join(metrics)})")

    markdown = "\n\n".join(t.markdown() for t in tables)
    atomic_write_text(dest / COMPARISON_MD, markdown + "\n")
    atomic_write_text(dest / COMPARISON_JSON, json.dumps({
        "runs": [{"name": r.name, "path": str(r.path), "kind": r.kind} for r in loaded],
        "training": tables[0].to_json() if train else None,
        "evaluation": tables[-1].to_json() if evals else None,
        "plots": plots, "skipped_plots": skipped,
    }, indent=2) + "\n")
    print(markdown)
    for note in skipped:
        print(f"[compare] no plot {note}")
    print(f"[compare] {len(loaded)} runs -> {dest / COMPARISON_MD}" + (f"; plots: {', '.join(plots)}" if plots else ""))
    return dest


__all__ = ["KLPoint", "KLSeries", "Run", "StepSeries", "Table", "compare", "eval_table", "kl_series", "load_run",
           "sqrt_kl", "step_series", "training_table"]
