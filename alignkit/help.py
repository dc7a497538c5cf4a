"""``alignkit``, ``alignkit --help`` and ``alignkit <command> --help`` without waiting for torch and Lightning.

A command is a ``"module:function"`` target (a built-in one or a plugin's ``alignkit.commands`` entry point). Its
summary is the first line of the function's docstring, read from the module's source with :mod:`ast`, so listing
the commands costs milliseconds instead of the seconds that importing torch, Lightning and transformers takes.
``alignkit plugins`` reads the plugins' kinds and hooks from their sources too (:mod:`alignkit.discovery`).

A command's own ``--help`` needs its parser, and building it imports what the signature names (Lightning's
``Trainer`` for ``fit``, torch-backed types for ``collect``, ``eval``, ``cai-*``): seconds. So the exact calls
``alignkit <command> --help`` and ``alignkit <command> -h`` keep the text they printed in the user's cache folder
(``$XDG_CACHE_HOME/alignkit/help/``, by default ``~/.cache/alignkit/help/``) and print it from there the next time.
A cache file is named by a hash of everything the text can depend on, so it is never stale: the arguments, the
terminal width, the Python interpreter, every installed distribution's name and version (the ``*.dist-info``
folders on ``sys.path``, with their times, which a reinstall changes), the ``ALIGNKIT_*``, ``JSONARGPARSE_*``,
``PL_*`` and colour environment variables, and the path, time and size of every file of alignkit and of the
packages that provide ``alignkit`` and ``alignkit.commands`` entry points. It is written atomically; an unreadable
or damaged file is ignored (and rewritten). Before the parser is built, the texts alignkit ships are tried
(:mod:`alignkit.shipped_help`: made from the pinned versions, printed only where they are exactly what is installed),
so the first call is fast too. ``ALIGNKIT_NO_HELP_CACHE=1`` turns both off. Any other call
(``--help`` together with other arguments, ``--print_config``) builds the parser as always.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
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
    """The ``alignkit`` program. ``alignkit`` alone and ``alignkit --help`` print the command overview, ``alignkit
    plugins`` lists the plugins and ``alignkit <command> --help`` prints the command's options (from the help cache
    when it has them), without importing Lightning; every other call goes to :func:`alignkit.cli.main`."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in HELP_FLAGS:
        from alignkit.commands import targets

        print(overview(targets()))
        return
    if len(args) == 2 and args[1] in HELP_FLAGS:
        from alignkit.commands import targets

        if args[0] in TRAINER_COMMANDS or args[0] in targets():
            command_help(args, argv)
    if args[0] == "plugins":  # reads the plugins' sources: neither torch nor Lightning
        from alignkit.commands import run

        run("plugins", args[1:])
        return
    from alignkit.cli import main as cli_main

    cli_main(argv)


# ------------------------------------------------------------------------------------------------- the help cache

HELP_FLAGS = ("-h", "--help")
NO_CACHE_ENV = "ALIGNKIT_NO_HELP_CACHE"
#: Bump when the cache file's layout changes.
CACHE_FORMAT = 1
#: Environment variables whose values may change a help text (besides ``COLUMNS``, read through the terminal size).
ENV_PREFIXES = ("ALIGNKIT_", "JSONARGPARSE_", "PL_", "LIGHTNING_")
ENV_NAMES = ("NO_COLOR", "FORCE_COLOR", "PYTHON_COLORS", "TERM")
#: The entry point groups whose plugins shape the commands' help (``alignkit.commands.COMMAND_GROUP`` the second).
PLUGIN_GROUPS = ("alignkit", "alignkit.commands")
#: Cache files kept (the newest); older ones are removed when a new one is written.
CACHE_KEEP = 200


def command_help(args: list[str], argv: list[str] | None) -> None:
    """Print ``alignkit <command> --help`` (``args``) from the help cache, or build it, cache it and print it; exits
    like the parser does (``SystemExit(0)``)."""
    enabled = os.environ.get(NO_CACHE_ENV, "") in ("", "0")
    cache = cache_file(args) if enabled else None
    text = read_cache(cache, args) if cache is not None else None
    if text is None and enabled:
        from alignkit.shipped_help import shipped_help

        text = shipped_help(args)
    if text is None:
        try:
            text, code = render_help(args, argv)
        except Exception:  # e.g. a plugin command that fails to import: alignkit.cli reports it as it always did
            from alignkit.cli import main as cli_main

            cli_main(argv)
            raise
        if code not in (0, None):
            sys.stdout.write(text)
            raise SystemExit(code)
        if cache is not None:
            write_cache(cache, args, text)
    sys.stdout.write(text)
    sys.stdout.flush()
    raise SystemExit(0)


def render_help(args: list[str], argv: list[str] | None) -> tuple[str, Any]:
    """The text ``alignkit <command> --help`` prints, and its exit code. A function command's parser is built
    directly (:func:`alignkit.commands.run`); ``fit``/``validate`` go through :func:`alignkit.cli.main`."""
    buffer = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(buffer):
        try:
            if args[0] in TRAINER_COMMANDS:
                from alignkit.cli import main as cli_main

                cli_main(argv)
            else:
                from alignkit.commands import run

                run(args[0], args[1:])
        except SystemExit as exc:
            code = exc.code
    return buffer.getvalue(), code


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/alignkit/help`` (``~/.cache/alignkit/help`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignkit" / "help"


def cache_file(args: list[str]) -> Path | None:
    """The cache file of ``args``' help text: named by the hash of :func:`cache_key`; None when the key cannot be
    computed (the help is then built every time)."""
    try:
        key = cache_key(args)
    except Exception:  # a strange sys.path entry, an unreadable folder: no cache rather than no help
        return None
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def cache_key(args: list[str]) -> str:
    """Everything a command's help text can depend on (see the module docstring), as one JSON string."""
    import shutil

    stdout = sys.__stdout__
    tty = bool(stdout and stdout.isatty())
    env = {k: v for k, v in os.environ.items() if k != NO_CACHE_ENV and (k.startswith(ENV_PREFIXES) or k in ENV_NAMES)}
    distributions = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            for item in os.scandir(entry or "."):
                if item.name.endswith((".dist-info", ".egg-info")):
                    distributions.append((os.path.abspath(item.path), item.stat().st_mtime_ns))
    plugins = installed_entry_points()
    key = {"format": CACHE_FORMAT, "args": args, "columns": shutil.get_terminal_size().columns, "tty": tty,
           "python": [sys.executable, sys.prefix, sys.version], "env": sorted(env.items()),
           "distributions": sorted(distributions), "plugins": plugins,
           "sources": {top: package_files(top) for top in plugin_packages(plugins)}}
    return json.dumps(key, sort_keys=True)


def installed_entry_points() -> list[list[str]]:
    """``[group, name, target]`` of every installed entry point of :data:`PLUGIN_GROUPS`, sorted."""
    from importlib.metadata import entry_points

    return sorted([group, ep.name, ep.value] for group in PLUGIN_GROUPS for ep in entry_points(group=group))


def plugin_packages(points: list[list[str]]) -> list[str]:
    """``alignkit`` and the top-level packages of the entry points ``points`` (``[group, name, target]``)."""
    return sorted({"alignkit", *(target.partition(":")[0].split(".")[0] for _, _, target in points)})


def package_paths(top: str) -> list[tuple[str, str]]:
    """``(root, path)`` of every file of the top-level package ``top`` (its ``__pycache__`` and dot folders left
    out), in a stable order, found without importing it: ``root`` is the package's folder (or its module file)."""
    spec = importlib.util.find_spec(top)
    if spec is None:
        return []
    roots = list(spec.submodule_search_locations or []) or ([spec.origin] if spec.origin else [])
    paths = []
    for root in roots:
        if os.path.isfile(root):
            paths.append((root, root))
            continue
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d != "__pycache__" and not d.startswith("."))
            paths += [(root, os.path.join(folder, name)) for name in sorted(names)]
    return paths


def package_files(top: str) -> list[tuple[str, int, int]]:
    """Path, modification time and size of every file of the top-level package ``top`` (:func:`package_paths`)."""
    files = []
    for _, path in package_paths(top):
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            files.append((os.path.abspath(path), stat.st_mtime_ns, stat.st_size))
    return files


def read_cache(path: Path, args: list[str]) -> str | None:
    """The help text cached in ``path``; None when there is none or the file is damaged (it is then rebuilt)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        text = record["text"]
        if (record["format"] != CACHE_FORMAT or record["args"] != args or not isinstance(text, str)
                or record["sha256"] != hashlib.sha256(text.encode()).hexdigest()):
            return None
        return text
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cache(path: Path, args: list[str], text: str) -> None:
    """Keep ``text`` in ``path`` (atomically); the oldest cache files beyond :data:`CACHE_KEEP` are removed. A
    failure (a read-only home, a full disk) only means no cache."""
    from alignkit.io import atomic_write_text

    record = {"format": CACHE_FORMAT, "args": args, "text": text, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    try:
        atomic_write_text(path, json.dumps(record))
        files = sorted(path.parent.glob("*.json"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
        for old in files[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except Exception:
        pass
