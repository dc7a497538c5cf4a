"""The commands that are not a single Lightning ``fit``: each is a typed function whose parameters are its
options (``alignkit <command> --help`` documents them from the docstring)."""

from __future__ import annotations

import inspect
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from alignkit.errors import ConfigError, DataError, NonFiniteError, PluginError, RunExistsError

USER_ERRORS = (ConfigError, DataError, PluginError, RunExistsError, FileNotFoundError, NonFiniteError, OSError)


def plugins(kind: Literal["all", "algorithm", "reward", "task", "command", "other", "broken"] = "all",
            check: bool = False) -> None:
    """List the plugins: the ``alignkit`` entry-point group (algorithms, rewards, tasks) and the commands that
    plugins add through ``alignkit.commands`` (kind ``command``, e.g. Constitutional AI's ``cai-*``).

    Args:
        kind: show only plugins of this kind.
        check: import every plugin (seconds: torch) and list one that fails to import as ``broken``. Without it the
            kinds and hooks are read from the sources (:mod:`alignkit.discovery`), which finds a plugin whose module
            or dependency is missing but not one that raises while it is imported.
    """
    from alignkit.discovery import discover, discover_commands

    rows = [p for p in [*discover(load=check), *discover_commands(COMMAND_GROUP)] if kind in ("all", p.kind)]
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


#: Commands whose ``seed`` is a yardstick, the same for every seed of a pipeline (``alignkit eval`` samples the
#: evaluation prompts with it): ``pipeline(seed=...)`` does not derive theirs. A plugin marks its own commands
#: with :func:`alignkit.seeds.fixed_seed` (the ``fixed_seed`` attribute).
FIXED_SEED_COMMANDS = frozenset({"eval"})


def stage_seed_args(stage: Stage, seed: int, commands: Mapping[str, Callable[..., Any]]) -> list[str]:
    """The arguments by which the pipeline's ``seed`` reaches a stage, placed before the stage's own ``args``
    (which therefore win): ``--seed_everything=derive_seed(seed, <stage name>)`` for a ``fit`` stage (its internal
    seeds derive from that, :mod:`alignkit.seeds`; two stages of one recipe, e.g. the members of a reward ensemble,
    thus train differently), ``--seed=derive_seed(seed, <stage name>)`` for a command with a ``seed`` option, none
    for a command without one or whose seed is a yardstick (:data:`FIXED_SEED_COMMANDS`, ``fixed_seed``)."""
    from alignkit.seeds import derive_seed  # numpy: not for ``alignkit --help``

    if stage.command == "fit":
        return [f"--seed_everything={derive_seed(seed, stage.name)}"]
    function = commands[stage.command]
    if stage.command in FIXED_SEED_COMMANDS or getattr(function, "fixed_seed", False):
        return []
    if "seed" not in inspect.signature(function).parameters:
        return []
    return [f"--seed={derive_seed(seed, stage.name)}"]


def pipeline(stages: list[Stage], run_dir: str | None = None, set: list[str] | None = None,
             only: list[str] | None = None, base_dir: str = ".", seed: int | None = None) -> dict[str, Path]:
    """Run a list of stages, each reading the previous stages' outputs. Stages already finished in
    ``run_dir`` (their ``metrics.json`` exists) are skipped and a ``fit`` stage stopped part-way continues
    from its last checkpoint, so a stopped pipeline resumes.

    Args:
        stages: the stages, in order.
        run_dir: folder holding one sub-folder per stage (default: runs/<pipeline>/<timestamp>).
        set: extra arguments appended to every ``fit`` stage, e.g. ``--trainer.max_steps=5``.
        only: run only these stages (their inputs must exist already).
        base_dir: folder that recipe paths are relative to (the pipeline file's folder by default).
        seed: one seed for the whole pipeline: every ``fit`` stage gets ``--seed_everything=derive_seed(seed,
            <stage name>)`` (its internal seeds derive from that) and every other stage with a ``seed`` option
            ``--seed=derive_seed(seed, <stage name>)``, except yardstick commands such as ``eval``
            (:mod:`alignkit.seeds`). A stage's own ``args`` win. None: each stage's recipe and options decide.
    """
    from alignkit.fitting import fit
    from alignkit.run import METRICS_FILE, default_run_dir, has_checkpoint

    for stage in stages:  # a stage's name is the name of its folder under run_dir
        if not re.fullmatch(r"[A-Za-z0-9_-]+", stage.name or ""):
            raise DataError(f"pipeline stage name {stage.name!r} is not a plain name (letters, digits, '-' and '_' "
                            f"only): it names the stage's folder under the pipeline's run_dir")
    if len({stage.name for stage in stages}) < len(stages):
        raise DataError(f"pipeline stage names must differ: {[stage.name for stage in stages]}")
    root = Path(run_dir) if run_dir else default_run_dir("pipeline")
    outputs = {stage.name: root / stage.name for stage in stages}
    for stage in stages:
        if only and stage.name not in only:
            continue
        stage_dir = outputs[stage.name]
        if (stage_dir / METRICS_FILE).exists():
            print(f"[pipeline] {stage.name}: already finished in {stage_dir}, skipped")
            continue
        if stage.command != "fit" and stage.command not in targets():
            raise DataError(f"pipeline stage {stage.name!r}: unknown command {stage.command!r}; "
                            f"known: fit, {', '.join(sorted(targets()))}")
        commands = {} if stage.command == "fit" else {stage.command: load(stage.command)}
        seeded = stage_seed_args(stage, seed, commands) if seed is not None else []
        args = [*seeded, *(substitute(a, outputs) for a in stage.args)]
        print(f"[pipeline] {stage.name}: {stage.command} {' '.join(shlex.quote(a) for a in args)}"
              + (f"  (seed {seed}: {', '.join(seeded) or 'none derived'})" if seed is not None else ""))
        if stage.command == "fit":
            if stage.recipe is None:
                raise DataError(f"pipeline stage {stage.name!r}: a fit stage needs a recipe")
            recipe = Path(base_dir) / stage.recipe
            if not recipe.is_file():
                raise FileNotFoundError(f"pipeline stage {stage.name!r}: recipe {recipe} does not exist")
            # a stage stopped part-way (a checkpoint but no summary yet) continues from its last checkpoint
            resume = ["--resume", "true"] if has_checkpoint(stage_dir) else []
            # every stage of one pipeline run in one wandb group (runs named <group>/<stage>), unless told otherwise
            given = any(a.split("=")[0] == "--experiment" for a in [*args, *(set or [])])
            group = [] if given else [f"--experiment={root.parent.name}/{root.name}"]
            fit(["--config", str(recipe), *group, *args, *(set or []), "--run_dir", str(stage_dir), *resume])
        else:
            run(stage.command, [*args, "--run_dir", str(stage_dir)])
    return outputs


#: The built-in commands, as ``"module:function"`` targets: imported only when run (``alignkit --help`` and
#: ``alignkit plugins`` import none of them).
COMMANDS = {"pipeline": "alignkit.commands:pipeline", "plugins": "alignkit.commands:plugins",
            "collect": "alignkit.collect:collect", "eval": "alignkit.evaluation:evaluate",
            "compare": "alignkit.compare:compare", "study": "alignkit.study:study"}
COMMAND_GROUP = "alignkit.commands"


def targets() -> dict[str, Any]:
    """Every command: the built-in ones and those plugins register in the ``alignkit.commands`` entry-point group
    (name → ``"module:function"``), without importing any of them. A built-in name wins over a plugin's."""
    from importlib.metadata import entry_points

    return {**{ep.name: ep.value for ep in entry_points(group=COMMAND_GROUP)}, **COMMANDS}


def load(name: str) -> Callable[..., Any]:
    """The typed function behind command ``name``."""
    import importlib

    target = targets()[name]
    if callable(target):  # a function put in the table directly (a test's stand-in, an embedding application)
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def available() -> dict[str, Callable[..., Any]]:
    """Every command (see :func:`targets`), loaded: name → typed function, e.g. Constitutional AI's ``cai-revise``."""
    return {name: load(name) for name in targets()}


_LAST_COMMAND: list[str] = []


def last_command() -> list[str]:
    """The command name and arguments of the newest :func:`run` call in this process (e.g. for a report)."""
    return list(_LAST_COMMAND)


def run(name: str, argv: list[str]) -> object:
    """Parse ``argv`` for command ``name`` (``--config FILE`` allowed) and call it."""
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    # as alignkit.cli sets it for fit: a dataclass option's fields are documented by the docstrings below them
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    _LAST_COMMAND[:] = [name, *argv]
    function = load(name)
    summary = (function.__doc__ or "").split("\n\n")[0]  # the Args section becomes the options' help
    parser = ArgumentParser(prog=f"alignkit {name}", description=summary, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with the options below.")
    parser.add_argument("--quiet", type=bool, default=True,
                        help="Silence the libraries' known noise (alignkit.quiet: their tips, deprecations and "
                             "progress bars of weight loading); false (or --verbose) shows it.")
    parser.add_argument("--verbose", action="store_true",
                        help="Show the libraries' noise that alignkit silences by default (the same as --quiet false).")
    parser.add_function_arguments(function, as_group=False)
    cfg = parser.parse_args(argv)
    if cfg.quiet and not cfg.verbose:
        from alignkit.quiet import quiet

        quiet()
    if name in ("pipeline", "study") and cfg.get("config") and cfg.base_dir == ".":
        cfg.base_dir = str(Path(str(cfg.config[-1])).parent)  # recipes are relative to the pipeline file
    if name == "pipeline" and cfg.get("config") and not cfg.run_dir:
        from alignkit.run import default_run_dir

        cfg.run_dir = str(default_run_dir(str(cfg.config[-1])))  # runs/<pipeline file's name>/<timestamp>
    if name == "study" and cfg.get("config") and not cfg.name:
        cfg.name = Path(str(cfg.config[-1])).stem  # the wandb group: the study file's name
    init = parser.instantiate(cfg)
    return function(**{k: init[k] for k in init.keys() if k not in ("config", "quiet", "verbose")})
