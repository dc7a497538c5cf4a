"""Write the README's results table from a study's ``study.json`` (never typed by hand).

    python docs/gen_results.py runs/study/readme/study.json          # rewrite the README's section
    python docs/gen_results.py runs/study/readme/study.json --check  # exit 1 if the README differs

The section lies between the lines ``<!-- results:start -->`` and ``<!-- results:end -->`` of README.md and
states the study's command, date, machine and seeds with every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def ci(estimate: float | None, low: float | None, high: float | None, spec: str = ".3f") -> str:
    if estimate is None:
        return "-"
    if low is None:
        return f"{estimate:{spec}} (one seed)"
    return f"{estimate:{spec}} [{low:{spec}}, {high:{spec}}]"


def section(study: dict) -> str:
    head = study["study"]
    lines = [START, "",
             f"`{head.get('command') or 'alignkit study'}` — {head['date']}, {head['machine']}, "
             f"{head['wall_time_s'] / 60:.1f} min; {len(head['seeds'])} seeds ({', '.join(map(str, head['seeds']))}), "
             "95 % bootstrap CIs over seeds; methods share each seed's SFT model, labelled pairs and reward model:", "",
             "| method | seeds | gold reward [95% CI] | KL from SFT (nats) [95% CI] | gold win rate vs SFT |",
             "|---|---:|---:|---:|---:|"]
    for name in head["methods"]:  # the study's order (study.json's keys are sorted)
        m = study["methods"][name]
        if not m["n_seeds"]:
            lines.append(f"| {name} | 0 | - | - | - |")
            continue
        win = "-" if m.get("win_rate_mean") is None else f"{m['win_rate_mean']:.1%}"
        lines.append(f"| {name} | {m['n_seeds']} | {ci(m['gold_mean'], m['gold_ci_low'], m['gold_ci_high'])} | "
                     f"{ci(m['kl_mean'], m['kl_ci_low'], m['kl_ci_high'])} | {win} |")
    if study["pairs"]:
        lines += ["", "| paired difference of gold (A − B) | seeds | difference [95% CI] | P(A > B) [95% CI] |",
                  "|---|---:|---:|---:|"]
        order = {name: i for i, name in enumerate(head["methods"])}
        for pair, p in sorted(study["pairs"].items(), key=lambda kv: (order[kv[1]["a"]], order[kv[1]["b"]])):
            lines.append(f"| {pair.replace(' - ', ' − ')} | {p['n']} | "
                         f"{ci(p['difference'], p['ci_low'], p['ci_high'])} | "
                         f"{ci(p['probability_of_improvement'], p['poi_ci_low'], p['poi_ci_high'], '.2f')} |")
    lines += ["", "(best-of-n: at its largest n; made by `python docs/gen_results.py <run_dir>/study.json`)", "", END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study's study.json")
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's section differs")
    args = parser.parse_args(argv)
    study = json.loads(args.study.read_text())
    text = README.read_text()
    if START not in text or END not in text:
        print(f"{README}: no {START} … {END} section", file=sys.stderr)
        return 2
    before, rest = text.split(START, 1)
    new = before + section(study) + rest.split(END, 1)[1]
    if args.check:
        return 0 if new == text else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
