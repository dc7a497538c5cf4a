"""The help texts alignkit ships (``alignkit/help_texts/``): current, exactly what the parsers print, and used only
where they were made from what is installed."""

import json
import shutil

import pytest

import alignkit.help as help_module
from alignkit.help import main
from alignkit.shipped_help import (
    FOLDER,
    MANIFEST,
    make,
    mismatch,
    own_entry_points,
    shipped_help,
    sources_digest,
)

MANIFEST_DATA = json.loads((FOLDER / MANIFEST).read_text())
REMAKE = "remake them: python -m alignkit.shipped_help --write"


@pytest.fixture
def clean_env(monkeypatch):
    """No variable set that can change a help text, an 80-column terminal, and only alignkit's own plugins
    installed (tests/test_examples.py installs two more)."""
    import alignkit.shipped_help as module

    for name in module.help_environment():
        monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(module, "installed_entry_points", own_entry_points)


def same_versions() -> None:
    """Skip when the installed versions are not the pinned ones the texts were made from (``.ci/newest``)."""
    reason = mismatch({**MANIFEST_DATA, "entry_points": own_entry_points(),
                       "sources": sources_digest(own_entry_points())})
    if reason is not None:
        pytest.skip(f"the shipped help texts do not apply here: {reason}")


def test_the_shipped_help_texts_are_current():
    """Fails after a change to alignkit's or its plugins' files until the texts are remade."""
    assert own_entry_points() == MANIFEST_DATA["entry_points"], f"the entry points changed; {REMAKE}"
    assert sources_digest(MANIFEST_DATA["entry_points"]) == MANIFEST_DATA["sources"], f"the sources changed; {REMAKE}"
    from alignkit.shipped_help import commands

    assert sorted(MANIFEST_DATA["commands"]) == sorted(commands()), f"the commands changed; {REMAKE}"


def test_a_shipped_text_is_what_the_parser_prints_in_a_fresh_process(tmp_path, clean_env):
    """Two commands rendered again here (another checkout path than the one that made them, on CI) give the shipped
    texts byte for byte: ``cai-revise`` once showed the checkout's absolute path as a default."""
    same_versions()  # the example plugins tests/test_examples.py installs do not change these two texts
    made = make(tmp_path, only=["cai-revise", "pipeline"])
    for name, record in made["commands"].items():
        assert (tmp_path / record["file"]).read_text() == (FOLDER / record["file"]).read_text(), name
    # Packages of another environment may be imported too (CI's Python has boto3 and trio, which the manifest cannot
    # know of): they leave the texts as they are. Those the manifest records are imported here at its versions.
    recorded, here = MANIFEST_DATA["distributions"], made["distributions"]
    shared = recorded.keys() & here.keys()
    assert {name: here[name] for name in shared} == {name: recorded[name] for name in shared}


def test_the_first_help_comes_from_the_shipped_text_without_building_the_parser(tmp_path, monkeypatch, capsys,
                                                                             clean_env):
    same_versions()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))

    def built(*args):
        raise AssertionError("the parser was built")

    monkeypatch.setattr(help_module, "render_help", built)
    with pytest.raises(SystemExit) as info:
        main(["fit", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out == (FOLDER / "fit.txt").read_text()
    assert not (tmp_path / "empty-cache").exists()  # nothing to cache: the shipped text is always there


def test_no_help_cache_turns_the_shipped_texts_off_too(tmp_path, monkeypatch, capsys, clean_env):
    monkeypatch.setenv("ALIGNKIT_NO_HELP_CACHE", "1")
    calls = []
    monkeypatch.setattr(help_module, "render_help", lambda *a: calls.append(a) or ("usage: built\n", 0))
    with pytest.raises(SystemExit):
        main(["pipeline", "--help"])
    assert capsys.readouterr().out == "usage: built\n" and len(calls) == 1


@pytest.fixture
def shipped_copy(tmp_path, clean_env):
    """A copy of the shipped folder whose manifest says what is installed here (whatever the versions)."""
    folder = tmp_path / "help_texts"
    shutil.copytree(FOLDER, folder)
    from importlib.metadata import version

    manifest = {**MANIFEST_DATA, "distributions": {"jsonargparse": version("jsonargparse")},
                "python": __import__("platform").python_version(),
                "entry_points": own_entry_points(), "sources": sources_digest(own_entry_points())}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_a_matching_manifest_serves_its_text(shipped_copy):
    assert shipped_help(["eval", "--help"], shipped_copy) == (FOLDER / "eval.txt").read_text()
    assert shipped_help(["eval", "-h"], shipped_copy) == (FOLDER / "eval.txt").read_text()
    assert shipped_help(["eval", "--help", "--x"], shipped_copy) is None
    assert shipped_help(["no-such-command", "--help"], shipped_copy) is None


@pytest.mark.parametrize("change, reason", [
    ({"python": "3.99.0"}, "Python"),
    ({"distributions": {"jsonargparse": "0.0.1"}}, "jsonargparse"),
    ({"distributions": {"no-such-distribution-xyz": "1.0"}}, "not installed"),
    ({"entry_points": [["alignkit", "extra", "somewhere:Extra"]]}, "other alignkit plugins"),
    ({"sources": "0" * 64}, "sources"),
    ({"format": 0}, "format"),
])
def test_a_manifest_made_from_something_else_is_not_used(shipped_copy, change, reason):
    manifest = edit_manifest(shipped_copy, **change)
    assert reason in mismatch(manifest)
    assert shipped_help(["eval", "--help"], shipped_copy) is None


def test_a_changed_environment_or_a_narrow_terminal_or_a_damaged_text_is_not_served(shipped_copy, monkeypatch):
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "1")
    assert "JSONARGPARSE_DEBUG is set" in mismatch(json.loads((shipped_copy / MANIFEST).read_text()))
    assert shipped_help(["eval", "--help"], shipped_copy) is None
    monkeypatch.delenv("JSONARGPARSE_DEBUG")
    monkeypatch.setenv("COLUMNS", "60")
    assert "60 columns" in mismatch(json.loads((shipped_copy / MANIFEST).read_text()))
    monkeypatch.setenv("COLUMNS", "120")  # wider is fine: the 80-column text fits
    assert shipped_help(["eval", "--help"], shipped_copy) is not None
    (shipped_copy / "eval.txt").write_text("usage: stale\n")
    assert shipped_help(["eval", "--help"], shipped_copy) is None
    (shipped_copy / MANIFEST).write_text("{")
    assert shipped_help(["compare", "--help"], shipped_copy) is None


def test_a_changed_source_file_changes_the_digest(tmp_path, monkeypatch):
    """The digest covers every ``.py`` file of the packages the entry points name, by content and path."""
    package = tmp_path / "site" / "digest_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugin.py").write_text("class P: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    points = [["alignkit", "p", "digest_pkg.plugin:P"]]
    first = sources_digest(points)
    assert first != sources_digest([])
    (package / "plugin.py").write_text("class P: pass\n")
    second = sources_digest(points)
    assert second != first
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"x")
    (package / "notes.txt").write_text("not code")
    assert sources_digest(points) == second
    (package / "plugin.py").rename(package / "renamed.py")
    assert sources_digest(points) != second
