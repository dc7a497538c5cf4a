"""``alignkit`` and ``alignkit --help``: every command with its one-line summary, without importing any of them.

A command is a ``"module:function"`` target (a built-in one or a plugin's ``alignkit.commands`` entry point). Its
summary is the first line of the function's docstring, read from the module's source with :mod:`ast`, so listing
the commands costs milliseconds instead of the seconds that importing torch, Lightning and transformers takes.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

#: The two Lightning subcommands of ``alignkit`` (``alignkit.cli.AlignCLI``), which are not functions.
TRAINER_COMMANDS = {
    "fit": "Train a recipe (SFT, reward model, DPO, PPO, GRPO, KTO, ...) into a run directory.",
    "validate": "Compute a recipe's validation metrics on a model without training it.",
}


def docstring_summary(target: str) -> str:
    """The first line of the docstring of ``target`` (``"package.module:function"``), read without importing the
    module; ``""`` when the module's source or the function cannot be found."""
    module, _, name = target.partition(":")
    source = module_source(module)
    if source is None:
        return ""
    tree = ast.parse(source.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return first_sentence(ast.get_docstring(node) or "")
    return ""


def module_source(module: str) -> Path | None:
    """The ``.py`` file of a dotted module name, found without importing it or its parent packages (whose
    ``__init__`` may import torch): the top-level package is located, then the path is followed."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for folder in spec.submodule_search_locations or []:
        base = Path(folder).joinpath(*rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def first_sentence(doc: str, limit: int = 96) -> str:
    """The docstring's first sentence on one line, cut at a word boundary to ``limit`` characters."""
    text = " ".join(doc.split("\n\n")[0].split())
    sentence = text.split(". ")[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def overview(commands: dict[str, Any]) -> str:
    """The text of ``alignkit --help``: usage, then one line per command (``commands``: name → target, or the
    function itself)."""
    rows = [*TRAINER_COMMANDS.items(), *sorted((name, first_sentence(t.__doc__ or "") if callable(t) else
                                                docstring_summary(t)) for name, t in commands.items())]
    width = max(len(name) for name, _ in rows)
    lines = ["usage: alignkit <command> [options]   (alignkit <command> --help: the command's options)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {summary}" for name, summary in rows]
    lines += ["", "Recipes: recipes/*.yaml (alignkit fit --config recipes/sft.yaml). Plugins: alignkit plugins.",
              "Docs: docs/index.md."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The ``alignkit`` program. ``alignkit`` alone and ``alignkit --help`` print the command overview, and
    ``alignkit plugins`` lists the plugins, without importing Lightning; every other call goes to
    :func:`alignkit.cli.main`."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        from alignkit.commands import targets

        print(overview(targets()))
        return
    if args[0] == "plugins":  # needs the plugin classes (torch), not Lightning
        from alignkit.commands import run

        run("plugins", args[1:])
        return
    from alignkit.cli import main as cli_main

    cli_main(argv)
