"""pyproject.toml lists every package folder (plugins/ installs as ``alignkit_plugins``) and every
entry point of the ``alignkit`` group loads."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

import pytest
import tomllib
from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# folder -> import name
ROOTS = {"alignkit": "alignkit", "plugins": "alignkit_plugins", "benchmarks": "alignkit_benchmarks"}


def package_folders() -> list[str]:
    """Import names of every folder under alignkit/ and plugins/ that holds an ``__init__.py``."""
    names = []
    for folder, name in ROOTS.items():
        for init in sorted((REPO / folder).rglob("__init__.py")):
            parts = init.parent.relative_to(REPO / folder).parts
            if "__pycache__" in parts:
                continue
            names.append(".".join((name, *parts)))
    return names


def declared_entry_points() -> dict[str, str]:
    return PYPROJECT["project"]["entry-points"]["alignkit"]


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = package_folders()
    assert {"alignkit", "alignkit.data", "alignkit.models", "alignkit_plugins"} <= set(found)
    missing = sorted(set(found) - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(listed - set(found))
    assert not stale, f"listed in pyproject.toml but no such package folder: {stale}"


def test_package_dir_maps_plugins_to_alignkit_plugins():
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"alignkit": "alignkit", "alignkit_plugins": "plugins",
                                                              "alignkit_benchmarks": "benchmarks"}
    assert importlib.import_module("alignkit_plugins").__file__.startswith(str(REPO / "plugins"))


@pytest.mark.parametrize("name", sorted(declared_entry_points()))
def test_declared_entry_point_loads(name):
    target = declared_entry_points()[name]
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, type), f"{name} = {target} is not a class"


def test_installed_entry_points_match_pyproject_and_load():
    installed = {ep.name: ep for ep in entry_points(group="alignkit") if ep.dist and ep.dist.name == "alignkit"}
    declared = declared_entry_points()
    assert {name: ep.value for name, ep in installed.items()} == declared, \
        "the installed metadata is stale: reinstall with `pip install -e .`"
    for ep in installed.values():
        assert isinstance(ep.load(), type)


def test_console_script():
    assert PYPROJECT["project"]["scripts"]["alignkit"] == "alignkit.help:main"
    from alignkit.cli import main as cli_main
    from alignkit.help import main

    assert callable(main) and callable(cli_main)
