"""The commands that are not a single Lightning ``fit``: each is a typed function whose parameters are its
options (``alignkit <command> --help`` documents them from the docstring)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from alignkit.bench import bench
from alignkit.collect import collect
from alignkit.compare import compare
from alignkit.data.formats import DataError
from alignkit.evaluation import evaluate
from alignkit.manager import PluginError, discover
from alignkit.module import NonFiniteError
from alignkit.run import METRICS_FILE, MODEL_DIR, RunExistsError, read_metrics

USER_ERRORS = (DataError, PluginError, RunExistsError, FileNotFoundError, NonFiniteError, OSError)


def plugins(kind: Literal["all", "algorithm", "reward", "task", "other", "broken"] = "all") -> None:
    """List the plugins registered in the ``alignkit`` entry-point group.

    Args:
        kind: show only plugins of this kind.
    """
    rows = [p for p in discover() if kind in ("all", p.kind)]
    table = [("name", "kind", "distribution", "target", "hooks")] + [
        (p.name, p.kind, f"{p.distribution} {p.version}", p.target,
         ", ".join(h.removeprefix("alignkit_") for h in p.hooks) or "-") for p in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[4])


@dataclass
class Stage:
    """One step of a pipeline."""

    name: str
    """Stage name; ``${name}`` in later stages' args is replaced by this stage's run directory."""
    recipe: str | None = None
    """Recipe YAML, relative to the pipeline file (for ``fit`` stages)."""
    command: str = "fit"
    """``fit`` (a recipe), or any other alignkit command: collect, eval, compare, or one a plugin adds."""
    args: list[str] = field(default_factory=list)
    """Command-line arguments/overrides, e.g. ``--model.policy.name_or_path=${sft}/model``."""


def substitute(arg: str, outputs: dict[str, Path]) -> str:
    """Replace ``${stage}`` by that stage's run directory."""
    for name, path in outputs.items():
        arg = arg.replace("${" + name + "}", str(path))
    return arg


def pipeline(stages: list[Stage], run_dir: str | None = None, set: list[str] | None = None,
             only: list[str] | None = None, base_dir: str = ".") -> dict[str, Path]:
    """Run a list of stages, each reading the previous stages' outputs. Stages already finished in
    ``run_dir`` (their ``metrics.json`` exists) are skipped and a ``fit`` stage stopped part-way continues
    from its last checkpoint, so a stopped pipeline resumes.

    Args:
        stages: the stages, in order.
        run_dir: folder holding one sub-folder per stage (default: runs/<pipeline>/<timestamp>).
        set: extra arguments appended to every ``fit`` stage, e.g. ``--trainer.max_steps=5``.
        only: run only these stages (their inputs must exist already).
        base_dir: folder that recipe paths are relative to (the pipeline file's folder by default).
    """
    from alignkit.cli import fit
    from alignkit.run import default_run_dir

    root = Path(run_dir) if run_dir else default_run_dir("pipeline")
    outputs = {stage.name: root / stage.name for stage in stages}
    for stage in stages:
        if only and stage.name not in only:
            continue
        stage_dir = outputs[stage.name]
        if (stage_dir / METRICS_FILE).exists():
            print(f"[pipeline] {stage.name}: already finished in {stage_dir}, skipped")
            continue
        args = [substitute(a, outputs) for a in stage.args]
        print(f"[pipeline] {stage.name}: {stage.command} {' '.join(shlex.quote(a) for a in args)}")
        if stage.command != "fit" and stage.command not in available():
            raise DataError(f"pipeline stage {stage.name!r}: unknown command {stage.command!r}; "
                            f"known: fit, {', '.join(sorted(available()))}")
        if stage.command == "fit":
            if stage.recipe is None:
                raise DataError(f"pipeline stage {stage.name!r}: a fit stage needs a recipe")
            recipe = Path(base_dir) / stage.recipe
            if not recipe.is_file():
                raise FileNotFoundError(f"pipeline stage {stage.name!r}: recipe {recipe} does not exist")
            # a stage stopped part-way (a checkpoint but no summary yet) continues from its last checkpoint
            resume = ["--resume", "true"] if (stage_dir / "checkpoints" / "last.ckpt").is_file() else []
            fit(["--config", str(recipe), *args, *(set or []), "--run_dir", str(stage_dir), *resume])
        else:
            run(stage.command, [*args, "--run_dir", str(stage_dir)])
    return outputs


COMMANDS = {"pipeline": pipeline, "plugins": plugins, "collect": collect, "eval": evaluate, "compare": compare, "bench": bench}
COMMAND_GROUP = "alignkit.commands"


def available() -> dict[str, object]:
    """The built-in commands and those plugins register in the ``alignkit.commands`` entry-point group
    (name → typed function), e.g. Constitutional AI's ``cai-revise``."""
    from importlib.metadata import entry_points

    table = {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}
    return {**{name: ep.load() for name, ep in table.items() if name not in COMMANDS}, **COMMANDS}


def run(name: str, argv: list[str]) -> object:
    """Parse ``argv`` for command ``name`` (``--config FILE`` allowed) and call it."""
    function = available()[name]
    summary = (function.__doc__ or "").split("\n\n")[0]  # the Args section becomes the options' help
    parser = ArgumentParser(prog=f"alignkit {name}", description=summary, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the options below.")
    parser.add_function_arguments(function, as_group=False)
    cfg = parser.parse_args(argv)
    if name == "pipeline" and cfg.get("config") and cfg.base_dir == ".":
        cfg.base_dir = str(Path(str(cfg.config[-1])).parent)  # recipes are relative to the pipeline file
    init = parser.instantiate(cfg)
    return function(**{k: init[k] for k in init.keys() if k != "config"})
