"""The help texts alignkit ships, so that the first ``alignkit <command> --help`` needs neither torch nor Lightning.

Building ``fit``'s parser imports Lightning's ``Trainer`` (10 s on a 2-core machine) and the other commands' parsers
import torch-backed types, so :mod:`alignkit.help` keeps each text in the user's cache after the first call. This
module covers that first call: ``alignkit/help_texts/`` holds every built-in command's ``--help`` text, rendered at 80
columns, and a ``manifest.json`` naming everything the texts were made from: the Python version; the version of every
distribution whose modules building the parsers imported (Lightning, jsonargparse, torch, transformers, ...; one that
only an extra installs, such as bitsandbytes, may also be absent: an install without the extras printed the same
texts); the
``alignkit`` and ``alignkit.commands`` entry points installed; a SHA-256 of the ``.py`` files of the packages that
provide them (``alignkit``, ``alignkit_plugins``, ``alignkit_benchmarks``). A shipped text is printed only when all of
these are what is installed now (the README's install pins every version in ``constraints.txt``), no environment
variable that can change a help text is set (``ALIGNKIT_*``, ``JSONARGPARSE_*``, ``PL_*``, ``LIGHTNING_*``, colour)
and the terminal is at least 80 columns wide; otherwise the parser is built as before. :func:`mismatch` says why a
manifest does not apply (``python -m alignkit.shipped_help --check``).

After changing a ``.py`` file of those packages (or the pins), run ``python -m alignkit.shipped_help --write``: it
renders each command in a fresh process (so that one command's imports cannot change another's text) and rewrites the
folder. ``tests/test_shipped_help.py`` fails while the texts are not current.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, entry_points, packages_distributions, requires, version
from pathlib import Path
from typing import Any

import alignkit.help as help_cache
from alignkit.help import PLUGIN_GROUPS, installed_entry_points, package_paths, plugin_packages

#: Where the shipped texts and their manifest live (package data of ``alignkit``).
FOLDER = Path(__file__).with_name("help_texts")
MANIFEST = "manifest.json"
#: Bump when the manifest's layout changes.
FORMAT = 1
#: The terminal width the texts are rendered at; narrower terminals get a freshly built text.
COLUMNS = 80
#: Variables that can change a help text: those the user's help cache keys on, but ``TERM`` (set in every terminal;
#: the parsers do not read it), and ``ALIGNKIT_NO_HELP_CACHE`` (which turns the shipped texts off altogether).
ENV_NAMES = tuple(name for name in help_cache.ENV_NAMES if name != "TERM")


def shipped_help(args: list[str], folder: Path = FOLDER) -> str | None:
    """The shipped text of ``alignkit <command> --help`` (``args``: ``[command, "--help" or "-h"]``), or None when
    there is none or it may differ from what the parser would print here (:func:`mismatch`)."""
    if len(args) != 2 or args[1] not in ("-h", "--help"):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        record = manifest["commands"].get(args[0])
        if record is None or mismatch(manifest) is not None:
            return None
        text = (folder / record["file"]).read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return text if hashlib.sha256(text.encode()).hexdigest() == record["sha256"] else None


def mismatch(manifest: dict[str, Any]) -> str | None:
    """Why the texts of ``manifest`` may differ from what the parsers would print here, in one line; None when they
    were made from exactly what is installed and set now."""
    import shutil

    if manifest.get("format") != FORMAT:
        return f"manifest format {manifest.get('format')!r}, not {FORMAT}"
    if manifest["python"] != platform.python_version():
        return f"Python {platform.python_version()}, not {manifest['python']}"
    columns = shutil.get_terminal_size().columns
    if columns < manifest["columns"]:
        return f"a terminal {columns} columns wide, narrower than {manifest['columns']}"
    env = help_environment()
    if env:
        return f"{env[0]} is set"
    optional = set(manifest["optional"])
    for name, expected in manifest["distributions"].items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != expected and not (installed is None and name in optional):
            return f"{name} {installed or '(not installed)'} is installed, not {expected}"
    points = installed_entry_points()
    if points != manifest["entry_points"]:
        extra = sorted(set(map(tuple, points)) ^ set(map(tuple, manifest["entry_points"])))
        return f"other alignkit plugins are installed ({' '.join(map(str, extra[0]))}, ...)"
    if sources_digest(points) != manifest["sources"]:
        return "the sources of alignkit or its plugins changed since the texts were made"
    return None


def help_environment() -> list[str]:
    """The environment variables set now that can change a help text (by name, sorted)."""
    return sorted(k for k in os.environ if k != help_cache.NO_CACHE_ENV
                  and (k.startswith(help_cache.ENV_PREFIXES) or k in ENV_NAMES))


def own_entry_points() -> list[list[str]]:
    """``[group, name, target]`` of the entry points of :data:`~alignkit.help.PLUGIN_GROUPS` alignkit's own
    distribution declares."""
    from importlib.metadata import distribution

    return sorted([ep.group, ep.name, ep.value] for ep in distribution("alignkit").entry_points
                  if ep.group in PLUGIN_GROUPS)


def sources_digest(points: list[list[str]]) -> str:
    """SHA-256 over the relative path and bytes of every ``.py`` file of ``alignkit`` and of the top-level packages
    the entry points ``points`` name (the same in a checkout and in an installed wheel)."""
    digest = hashlib.sha256()
    for top in plugin_packages(points):
        files = [(root, path) for root, path in package_paths(top) if path.endswith(".py")]
        digest.update(f"package {top} {len(files)}\n".encode())
        for root, path in files:
            digest.update(f"{Path(path).relative_to(root).as_posix()}\n".encode())
            digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- making the texts

def commands() -> list[str]:
    """Every built-in command that has a ``--help``: ``fit``, ``validate`` and the function commands."""
    from alignkit.commands import targets
    from alignkit.help import TRAINER_COMMANDS

    return [*TRAINER_COMMANDS, *sorted(targets())]


def render_environment() -> dict[str, str]:
    """The environment a text is rendered in: this one without the variables that could change it, 80 columns, no
    help cache."""
    env = {k: v for k, v in os.environ.items() if k not in help_environment()}
    env.update(COLUMNS=str(COLUMNS), LINES="24", ALIGNKIT_NO_HELP_CACHE="1")
    return env


def render(command: str) -> dict[str, Any]:
    """Build ``command``'s parser in this process, which must be a fresh one, and return its help text, exit code
    and the distributions (name → version) whose modules are imported afterwards."""
    from alignkit.help import render_help

    sys.argv = ["alignkit", command, "--help"]  # the parsers take their program name from sys.argv[0]
    text, code = render_help([command, "--help"], None)
    return {"text": text, "code": code, "distributions": imported_distributions()}


def imported_distributions() -> dict[str, str]:
    """Name → version of every installed distribution (alignkit's own left out: its sources are hashed) that provides a
    module imported in this process."""
    owners = packages_distributions()
    names = {dist for module in list(sys.modules) for dist in owners.get(module.partition(".")[0], [])}
    found = {}
    for name in sorted(names - {"alignkit"}):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def required_distributions(root: str = "alignkit") -> set[str]:
    """The (canonical) names of the distributions a plain ``pip install alignkit`` installs: ``root``'s requirements
    without extras, and theirs, with the extras each requirement asks for (``jsonargparse[signatures,ruyaml]``)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(root, frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            lines = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in (extras or {""})):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return {name for name, _ in seen}


def render_in_subprocess(command: str) -> dict[str, Any]:
    """:func:`render` in a fresh Python process."""
    done = subprocess.run([sys.executable, "-m", "alignkit.shipped_help", "--render", command], capture_output=True,
                          text=True, env=render_environment(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rendering `alignkit {command} --help` failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.splitlines()[-1])  # the last line: a library may have printed before


def make(folder: Path = FOLDER, jobs: int = 2, only: list[str] | None = None) -> dict[str, Any]:
    """Render every command's help text (or those in ``only``) and write them with their manifest into ``folder``;
    returns the manifest. Refuses a text that holds a path of this machine (it would be wrong on any other)."""
    names = only or commands()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rendered = dict(zip(names, pool.map(render_in_subprocess, names)))
    local = [p for p in {str(Path(__file__).resolve().parents[1]), os.path.expanduser("~"), sys.prefix} if len(p) > 1]
    distributions: dict[str, str] = {}
    for name, result in rendered.items():
        if result["code"] not in (0, None):
            raise RuntimeError(f"`alignkit {name} --help` exited with {result['code']}")
        for path in local:
            if path in result["text"]:
                raise RuntimeError(f"`alignkit {name} --help` shows the local path {path}; make that default portable")
        distributions.update(result["distributions"])
    from packaging.utils import canonicalize_name

    points = own_entry_points()
    required = required_distributions()
    manifest = {"format": FORMAT, "python": platform.python_version(), "columns": COLUMNS,
                "distributions": dict(sorted(distributions.items())),
                "optional": sorted(name for name in distributions if canonicalize_name(name) not in required),
                "entry_points": points,
                "sources": sources_digest(points)}
    texts: dict[str, dict[str, str]] = {}
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.txt"):
        old.unlink()
    for name, result in rendered.items():
        (folder / f"{name}.txt").write_text(result["text"], encoding="utf-8")
        texts[name] = {"file": f"{name}.txt",
                       "sha256": hashlib.sha256(result["text"].encode()).hexdigest()}
    manifest["commands"] = texts
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """``python -m alignkit.shipped_help --write`` remakes the shipped texts; ``--check`` says whether they apply
    here (exit 1 when not); ``--render COMMAND`` is the worker :func:`make` runs for each command."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alignkit.shipped_help", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true", help="remake alignkit/help_texts/")
    group.add_argument("--check", action="store_true", help="say whether the shipped texts apply here")
    group.add_argument("--render", metavar="COMMAND", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        result = render(args.render)
        sys.stdout = sys.__stdout__
        print(json.dumps(result))
    elif args.write:
        own = own_entry_points()
        others = sorted({point.dist.name for group in PLUGIN_GROUPS for point in entry_points(group=group)
                         if [group, point.name, point.value] not in own and point.dist is not None})
        if others:
            raise SystemExit(f"other alignkit plugins are installed; the shipped texts are alignkit's alone: "
                             f"pip uninstall -y {' '.join(others)}, then run --write again")
        manifest = make()
        print(f"wrote {len(manifest['commands'])} help texts and {MANIFEST} to {FOLDER}")
    else:
        try:
            reason = mismatch(json.loads((FOLDER / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError) as exc:
            reason = f"no readable {FOLDER / MANIFEST} ({exc})"
        print(f"the shipped help texts {'apply' if reason is None else 'do not apply: ' + reason}")
        raise SystemExit(0 if reason is None else 1)


if __name__ == "__main__":
    main()
