"""Generate ``docs/reference.md``, the recipe reference, from the code itself.

Every table is built the way ``alignkit fit`` builds its parser: jsonargparse reads each class's (or
command's) signature, type hints and docstrings (``Args:`` sections and dataclass attribute docstrings).
The components are alignkit's own entry points (algorithms, rewards, tasks: the ``alignkit`` group of
pyproject.toml, so a new built-in plugin appears here once it is declared there), the data modules, the
``model:`` block (``AlignModule``) and the commands. Installed outside packages are left out, so the output
does not depend on the environment (``alignkit plugins`` lists everything installed).

Usage::

    python docs/gen_reference.py            # rewrite docs/reference.md
    python docs/gen_reference.py --check    # exit 1 if docs/reference.md is stale (tests/test_docs.py does this)
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import tomllib
import yaml
from jsonargparse import ArgumentParser, set_parsing_settings
from jsonargparse._optionals import get_docstring_parse_options

DOCS = Path(__file__).resolve().parent
OUTPUT = DOCS / "reference.md"
ROOT = DOCS.parent
KINDS = (("algorithm", "Algorithms", "model.algorithm"), ("reward", "Rewards", "model.rewards"),
         ("task", "Tasks", "data.init_args.task"), ("other", "Other plugins", "model.plugins"))


@dataclass
class Option:
    key: str  # dotted, relative to the component (e.g. ``sampling.max_new_tokens``)
    type: str
    default: Any
    required: bool
    help: str


@contextmanager
def attribute_docstrings():
    """Read dataclass attribute docstrings too (a global jsonargparse setting, restored afterwards)."""
    before = get_docstring_parse_options()["attribute_docstrings"]
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        yield
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=before)


def type_name(hint: Any) -> str:
    if hint is None:
        return ""
    text = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    text = re.sub(r"Optional\[(.*)\]$", r"\1 | None", text)
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", text)  # alignkit.task.Task -> Task


def clean(text: str | None, cell: bool = True) -> str:
    """Docstring text as one markdown line: rst ``code`` -> `code`, ``<`` and ``>`` escaped outside code spans
    (``runs/<recipe>`` must not read as an HTML tag), and in a table ``cell`` the pipes escaped."""
    parts = " ".join((text or "").split()).replace("``", "`").split("`")
    parts = [p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts)]
    text = "`".join(parts)
    return text.replace("|", "\\|") if cell else text


def summary(obj: Any) -> str:
    return clean((inspect.getdoc(obj) or "").split("\n\n")[0], cell=False)


def options(parser: ArgumentParser, prefix: str = "") -> list[Option]:
    """The parser's leaf options and the nested groups (dataclasses), in declaration order."""
    rows = []
    titles = {key: group.title for key, group in parser.groups.items() if key}
    for action in parser._actions:
        dest = action.dest
        if dest == "help" or dest.endswith(".help") or action.default == argparse.SUPPRESS and dest not in titles:
            continue
        key = dest[len(prefix):] if prefix and dest.startswith(prefix) else dest
        if not key or dest == prefix.rstrip("."):
            continue
        if dest in titles and not hasattr(action, "_typehint"):  # a nested dataclass: one row naming it
            rows.append(Option(key, "", None, False, titles[dest]))
            continue
        rows.append(Option(key, type_name(getattr(action, "_typehint", None)), action.default,
                           bool(action.required), action.help or ""))
    return rows


def class_options(cls: type) -> list[Option]:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "init_args", fail_untyped=False, sub_configs=True)
    return options(parser, "init_args.")


def function_options(function: Any) -> list[Option]:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_function_arguments(function, as_group=False, fail_untyped=False)
    return options(parser)


def scalar(value: Any) -> str:
    """A default as YAML; a path inside this checkout is shown relative to it, so the page is the same on every
    machine (a plugin's default may be a path computed from its ``__file__``)."""
    if isinstance(value, str) and value.startswith(str(ROOT) + "/"):
        value = value[len(str(ROOT)) + 1:]
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True).strip()
    return text.removesuffix("...").strip()


def table(rows: list[Option]) -> list[str]:
    if not rows:
        return ["No options."]
    lines = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    for row in rows:
        kind = f"`{row.type.replace('|', chr(92) + '|')}`" if row.type else "group"
        default = "required" if row.required else ("" if not row.type else f"`{scalar(row.default)}`")
        lines.append(f"| `{row.key}` | {kind} | {default} | {clean(row.help) or '—'} |")
    return lines


def yaml_block(class_path: str, rows: list[Option]) -> list[str]:
    """``class_path`` + ``init_args`` with every default, as a recipe would hold them."""
    lines = ["```yaml", f"class_path: {class_path}"]
    leaves = [r for r in rows if r.type]
    if leaves:
        lines.append("init_args:")
    opened: set[str] = set()
    for row in leaves:
        *parents, leaf = row.key.split(".")
        for depth, parent in enumerate(parents):
            path = ".".join(parents[: depth + 1])
            if path not in opened:
                opened.add(path)
                lines.append("  " * (depth + 1) + f"{parent}:")
        value = "  # required" if row.required else " " + scalar(row.default)
        lines.append("  " * (len(parents) + 1) + f"{leaf}:{value}")
    return [*lines, "```"]


def traits(cls: type) -> str:
    from alignkit.manager import implemented_hooks
    from alignkit.plugin import Algorithm

    hooks = ", ".join(f"`{h.removeprefix('alignkit_')}`" for h in implemented_hooks(cls))
    hooks = f" · hooks: {hooks}" if hooks else ""
    if issubclass(cls, Algorithm):
        return (f" · data: `{cls.data_kind}` · model head: `{cls.model_head}` · reference model: "
                f"{'yes' if cls.needs_reference else 'no'} · online: {'yes' if cls.online else 'no'}{hooks}")
    return hooks


def component(heading: str, class_path: str, cls: type, rows: list[Option], note: str) -> list[str]:
    return [f"### {heading}", "", f"`{class_path}` — {note}", "", summary(cls), "", *table(rows), "",
            *yaml_block(class_path, rows), ""]


def builtin_entry_points() -> dict[str, str]:
    """alignkit's own ``alignkit`` entry points, as pyproject.toml declares them (name -> "module:Class")."""
    pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text())
    return pyproject["project"]["entry-points"]["alignkit"]


def generate() -> str:
    import alignkit.data as data_modules
    from alignkit.cli import AlignCLI
    from alignkit.commands import COMMAND_GROUP, COMMANDS, Stage, load
    from alignkit.data.modules import AlignData
    from alignkit.gold_eval import GoldEval
    from alignkit.manager import plugin_kind
    from alignkit.module import AlignModule
    from alignkit.study import Claim, Method, StudyEvaluation

    with attribute_docstrings():
        out = ["# Recipe reference", "",
               "<!-- Generated by docs/gen_reference.py from the code's signatures and docstrings: do not edit by "
               "hand; run `python docs/gen_reference.py` after changing an option. -->", "",
               "Every option of a recipe, with its type, default and help, as `alignkit fit --print_config` and "
               "`--help` see them. Override any of them on the command line with its dotted key, e.g. "
               "`--model.algorithm.init_args.beta=0.2`. See [concepts](concepts.md) for what the parts do.", "",
               "## Recipe layout", "",
               "| key | what it holds |", "| --- | --- |",
               "| `seed_everything` | global seed (default 0) |",
               "| `model` | the [`AlignModule`](#model): algorithm, policy, reference, rewards, optimiser |",
               "| `data` | `class_path` + `init_args` of a [data module](#data-modules) |",
               "| `trainer` | Lightning `Trainer` arguments (devices, strategy, precision, max_steps, ...) |"]
        parser = ArgumentParser(exit_on_error=False)
        AlignCLI.add_arguments_to_parser(None, parser)  # alignkit's own top-level options
        out += [f"| `{row.key}` | {clean(row.help)} (`{row.type.replace('|', chr(92) + '|')}`, default "
                f"`{scalar(row.default)}`) |" for row in options(parser)]
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(AlignModule, "model", fail_untyped=False, sub_configs=True)
        out += ["", "## model", "", summary(AlignModule), "", *table(options(parser, "model.")), ""]

        found = []
        for name, target in builtin_entry_points().items():
            cls = EntryPoint(name, target, "alignkit").load()
            found.append((plugin_kind(cls), name, target.replace(":", "."), cls))
        for kind, title, where in KINDS:
            if kind == "other" and not any(f[0] == kind for f in found):
                continue
            out += [f"## {title}", "", f"Selected by `class_path` under `{where}`.", ""]
            for _, name, class_path, cls in sorted((f for f in found if f[0] == kind), key=lambda f: f[1]):
                out += component(name, class_path, cls, class_options(cls), f"entry point `{name}`{traits(cls)}")

        out += ["## Data modules", "", "Selected by `class_path` under `data`.", ""]
        for name in sorted(data_modules.__all__):
            cls = getattr(data_modules, name)
            if inspect.isclass(cls) and issubclass(cls, AlignData) and not inspect.isabstract(cls):
                out += component(name, f"alignkit.data.{name}", cls, class_options(cls),
                                 f"batches of kind `{cls.kind}`")

        out += ["## Commands", "",
                "`alignkit <command> --option=value ...`, or the same options in a YAML file given with `--config`.",
                ""]
        pyproject = tomllib.loads((DOCS.parent / "pyproject.toml").read_text())
        plugin_commands = pyproject["project"]["entry-points"][COMMAND_GROUP]  # alignkit's own, not installed ones
        functions = {**{name: load(name) for name in COMMANDS},
                     **{name: EntryPoint(name, target, COMMAND_GROUP).load()
                        for name, target in sorted(plugin_commands.items())}}
        for name, function in functions.items():
            out += [f"### alignkit {name}", "", summary(function), "", *table(function_options(function)), ""]
        out += ["A pipeline stage (`stages:` items, and a study's `upstream:` items):", "",
                *table(class_options(Stage)), ""]
        out += ["A study method (`methods:` items):", "", *table(class_options(Method)), ""]
        out += ["A study's yardstick (`evaluation:`):", "", *table(class_options(StudyEvaluation)), ""]
        out += ["A study claim (`claims:` items):", "", *table(class_options(Claim)), ""]
        out += ["## Callbacks", "", "Added under `trainer.callbacks` (a list of `class_path` + `init_args`).", ""]
        out += component("GoldEval", "alignkit.gold_eval.GoldEval", GoldEval, class_options(GoldEval),
                         "gold-reward trajectory during training")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", default=str(OUTPUT), help="where to write (default: docs/reference.md)")
    parser.add_argument("--check", action="store_true", help="only compare with the existing file")
    args = parser.parse_args(argv)
    text, path = generate(), Path(args.output)
    if args.check:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is stale: run `python docs/gen_reference.py`", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
