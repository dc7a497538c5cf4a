"""``alignkit`` explains itself: the overview lists every command (the trainer's and every built-in or plugin
command) with its one-line summary, each command answers ``--help``, and ``alignkit plugins`` lists the commands
that plugins add (kind ``command``) beside the algorithms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)
from alignkit.commands import targets
from alignkit.help import docstring_summary, main, module_source


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_the_overview_lists_every_command_with_its_summary(argv, capsys):
    main(argv)
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    expected = {"fit", "validate", "pipeline", "plugins", "collect", "eval", "compare", "study", "bench", "iterate",
                "cai-revise", "cai-feedback", "cai-compliance"}
    assert expected <= set(lines) and set(targets()) | {"fit", "validate"} == set(lines)
    assert all(len(line.split(maxsplit=1)) == 2 for line in lines.values()), "a command without a summary"
    assert "Sample two responses per train prompt" in lines["collect"]


def test_summaries_are_read_without_importing_the_command():
    """Reading a plugin command's summary must not import its package (whose ``__init__`` may import torch)."""
    code = ("import sys; from alignkit.help import docstring_summary; "
            "s = docstring_summary('alignkit_plugins.constitutional.commands:critique_revise'); "
            "assert s.startswith('SL-CAI'), s; "
            "assert 'torch' not in sys.modules and 'alignkit_plugins.constitutional' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert module_source("alignkit.no_such_module") is None and docstring_summary("alignkit.commands:nope") == ""


@pytest.mark.parametrize("name", sorted(targets()))
def test_every_command_answers_help(name, capsys):
    from alignkit.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main([name, "--help"])
    assert info.value.code == 0
    assert f"alignkit {name}" in capsys.readouterr().out


def test_plugins_lists_command_plugins(capsys):
    main(["plugins", "--kind", "command"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert {"cai-revise", "cai-feedback", "cai-compliance", "iterate", "bench"} <= {r[0] for r in rows}
    assert all(r[1] == "command" for r in rows)


@pytest.mark.parametrize(("args", "message"), [
    (["--trainer.max_steps=-5"], "max_steps` must be a non-negative integer or -1"),
    (["--resume", "true"], "--resume true needs --run_dir"),
])
def test_mistakes_get_one_line(args, message, tmp_path, monkeypatch, capsys):
    """A setting Lightning refuses, or a resume with no run to continue: one ``alignkit: error:`` line, no
    traceback, exit 2, nothing written."""
    from conftest import QUIET, SFT_RECIPE, run_cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", SFT_RECIPE, *QUIET, *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("alignkit: error:")]
    assert message in line and "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("model"))


def test_known_library_noise_is_filtered_at_its_source():
    """alignkit.quiet drops the listed messages from their loggers and ignores the listed library warnings; other
    messages of the same loggers, and other warnings, still come through."""
    import logging
    import warnings

    from alignkit.quiet import quiet

    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    handler = Collect()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet()
            logger.warning("💡 Tip: For seamless cloud logging ... try installing [litlogger](...)")
            logger.warning("`Trainer.fit` stopped: `max_steps=2` reached.")
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("Total length of `list` across ranks is zero. Please make sure this was your intention.",
                          UserWarning, stacklevel=1)
            warnings.warn("a warning about the run itself", UserWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert seen == ["`Trainer.fit` stopped: `max_steps=2` reached."]
    assert [str(w.message) for w in caught] == ["a warning about the run itself"]


def test_plugins_are_named_as_alignkit_plugins_prints_them():
    from alignkit.cli import resolve_plugin_names

    argv = ["fit", "--config", "recipes/dpo.yaml", "--model.algorithm=dpo", "--data.init_args.task", "sentiment",
            "--model.rewards=[gold_reward, {class_path: my.Reward}]", "--model.policy.tiny.task=reverse",
            "--model.algorithm.init_args.beta=0.2", "--task=alignkit_plugins.tasks.ReverseTask"]
    out = resolve_plugin_names(argv)
    assert out[3] == "--model.algorithm=alignkit_plugins.dpo.DPO"
    assert out[4:6] == ["--data.init_args.task", "alignkit_plugins.tasks.SentimentTask"]
    assert out[6] == ('--model.rewards=[{"class_path": "alignkit_plugins.rewards.GoldReward"}, '
                      '{"class_path": "my.Reward"}]')
    assert out[7:] == argv[7:]  # a task's own name, other options and class paths stay as they are


def test_a_run_selects_its_algorithm_by_name(tmp_path):
    from conftest import QUIET, SFT_RECIPE, TINY_MODEL, run_cli

    run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--model.algorithm=sft", "--trainer.max_steps=1",
             "--data.init_args.task.init_args.num_train_prompts=20", "--run_dir", tmp_path / "run"])
    import yaml

    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model"]["algorithm"]["class_path"] == "alignkit_plugins.sft.SFT"


def test_a_pipelines_stages_share_one_wandb_group(tmp_path, monkeypatch):
    """Each fit stage of a pipeline gets --experiment=<pipeline>/<timestamp> (its wandb group; runs are named
    <group>/<stage>), unless the stage or --set names one; a pipeline file's runs go to runs/<its name>/<time>."""
    import yaml

    import alignkit.fitting
    from alignkit.cli import main as cli_main

    calls: list[list[str]] = []
    monkeypatch.setattr(alignkit.fitting, "fit", lambda argv: calls.append(list(argv)))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.yaml").write_text("seed_everything: 0\n")
    stages = {"stages": [{"name": "first", "recipe": "a.yaml"},
                         {"name": "second", "recipe": "a.yaml", "args": ["--experiment=mine"]}]}
    (tmp_path / "mypipe.yaml").write_text(yaml.safe_dump(stages))
    cli_main(["pipeline", "--config", "mypipe.yaml"])
    first, second = calls
    (group,) = [a for a in first if a.startswith("--experiment=")]
    root = Path(first[first.index("--run_dir") + 1]).parent
    assert root.parent == Path("runs") / "mypipe" and group == f"--experiment=mypipe/{root.name}"
    assert [a for a in second if a.startswith("--experiment")] == ["--experiment=mine"]


# ------------------------------------------------------------------ alignkit plugins from the sources, no torch


def test_plugins_lists_the_same_from_the_sources_as_by_importing():
    """``alignkit plugins`` reads kinds and hooks with ast; importing every plugin gives the same rows."""
    from alignkit.discovery import describe_source, discover

    by_source, by_import = discover(load=False), discover(load=True)
    assert by_source == by_import
    assert {p.kind for p in by_source} >= {"algorithm", "reward", "task", "other"}
    for info in by_source:  # every installed plugin answered from its source, none by the fallback import
        if info.distribution == "alignkit":
            assert describe_source(info.target) == (info.kind, info.hooks)


def test_plugins_listing_imports_neither_torch_nor_lightning():
    code = ("import sys; from alignkit.help import main; main(['plugins']); "
            "heavy = [m for m in ('torch', 'lightning', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "alignkit_plugins.ppo:PPO" in out


SOURCES = {
    "base.py": '''
from alignkit import Algorithm, hookimpl
import alignkit


class Mixin:
    @hookimpl
    def alignkit_metrics(self, **kw):
        return {}


class Base(alignkit.OnlineAlgorithm):
    @hookimpl(tryfirst=True)
    def alignkit_loss(self, **kw):
        pass

    @hookimpl
    def alignkit_configure(self, **kw):
        pass
''',
    "algos.py": '''
import functools

from alignkit.plugin import Reward as R
from plain_pkg.base import Base, Mixin


class Plain(Mixin, Base):
    def alignkit_configure(self, **kw):  # overrides the hook without the marker: no longer a hook
        pass


class Scorer(R):
    def score(self, prompts, responses, rollout):
        pass


class Other:
    pass


class Wrapped(Base):
    @functools.lru_cache
    def alignkit_experience(self, **kw):
        pass
''',
    "missing.py": "import no_such_dependency_xyz\nfrom plain_pkg.base import Base\n\n\nclass Broken(Base):\n    pass\n",
}


@pytest.fixture
def plain_pkg(tmp_path, monkeypatch):
    from alignkit.discovery import forget

    package = tmp_path / "plain_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in SOURCES.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    forget()
    yield "plain_pkg"
    forget()
    for name in [m for m in sys.modules if m.startswith("plain_pkg")]:
        del sys.modules[name]


@pytest.mark.parametrize(("target", "answered"), [
    ("plain_pkg.algos:Plain", True), ("plain_pkg.algos:Scorer", True), ("plain_pkg.algos:Other", True),
    ("plain_pkg.algos:Wrapped", False), ("plain_pkg.missing:Broken", False), ("plain_pkg.algos:Nope", False),
])
def test_a_plugin_is_read_from_its_source_or_else_imported(plain_pkg, target, answered):
    """Inherited and overridden hooks, aliased bases and alignkit's lazy names are read from the source; what the
    source cannot settle (another decorator, a missing dependency, a missing name) is imported instead, and the
    answer is the import's either way."""
    import importlib

    from alignkit.discovery import Unanswered, describe, describe_loaded, describe_source

    module, _, name = target.partition(":")

    def load():
        return getattr(importlib.import_module(module), name)

    expected = describe_loaded(load)
    assert describe(target, load) == expected
    if answered:
        assert describe_source(target) == expected
    else:
        with pytest.raises(Unanswered):
            describe_source(target)
    if target.endswith(":Plain"):
        assert expected == ("algorithm", ("alignkit_loss", "alignkit_metrics"))
    if target.endswith(":Broken"):
        assert expected[0] == "broken" and "no_such_dependency_xyz" in expected[1][0]


# ------------------------------------------------------------------------------------------------ the help cache

HELLO = '''
def hello(name: str = "world") -> None:
    """{summary}

    Args:
        name: who is greeted.
    """
'''


@pytest.fixture
def hello_command(tmp_path, monkeypatch):
    """A command ``hello`` of a plugin package (``hello_pkg``, distribution ``hello-pkg 1.0``) in ``tmp_path``, and an
    empty help cache there."""
    package = tmp_path / "site" / "hello_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cmd.py").write_text(HELLO.format(summary="Say hello."))
    dist = tmp_path / "site" / "hello_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hello-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[alignkit.commands]\nhello = hello_pkg.cmd:hello\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("ALIGNKIT_NO_HELP_CACHE", raising=False)
    yield package
    sys.modules.pop("hello_pkg.cmd", None)
    sys.modules.pop("hello_pkg", None)


def run_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_is_cached_and_the_cache_follows_the_sources(hello_command, monkeypatch, capsys):
    import os

    import alignkit.help as help_module
    from alignkit.help import cache_dir

    first = run_help(["hello", "--help"], capsys)
    assert "usage: alignkit hello" in first and "Say hello" in first and "who is greeted" in first
    (cached,) = cache_dir().glob("*.json")

    built = []
    render = help_module.render_help
    monkeypatch.setattr(help_module, "render_help", lambda *a: built.append(a) or render(*a))
    assert run_help(["hello", "--help"], capsys) == first and built == []  # the second time: from the cache

    # a changed source file (new text, new time) is a new key: rebuilt, never the stale text
    (hello_command / "cmd.py").write_text(HELLO.format(summary="Say goodbye."))
    os.utime(hello_command / "cmd.py", ns=(cached.stat().st_mtime_ns + 10**9,) * 2)
    sys.modules.pop("hello_pkg.cmd", None)
    second = run_help(["hello", "--help"], capsys)
    assert "Say goodbye" in second and len(built) == 1
    assert run_help(["hello", "--help"], capsys) == second and len(built) == 1

    # another version of an installed distribution, another terminal width, -h: each its own text
    dist = hello_command.parent / "hello_pkg-1.0.dist-info"
    dist.rename(dist.with_name("hello_pkg-1.1.dist-info"))
    run_help(["hello", "--help"], capsys)
    monkeypatch.setenv("COLUMNS", "61")
    narrow = run_help(["hello", "--help"], capsys)
    assert max(len(line) for line in narrow.splitlines()) <= 61
    run_help(["hello", "-h"], capsys)
    assert len(built) == 4 and len(list(cache_dir().glob("*.json"))) == 5


@pytest.mark.parametrize("damage", ["garbage", "empty", "wrong text", "list"])
def test_a_damaged_help_cache_file_is_ignored_and_rewritten(hello_command, capsys, damage):
    import json

    from alignkit.help import cache_dir

    first = run_help(["hello", "--help"], capsys)
    (cached,) = cache_dir().glob("*.json")
    record = json.loads(cached.read_text())
    cached.write_text({"garbage": '{"format": 1, "te\x00', "empty": "", "list": "[1, 2]",
                       "wrong text": json.dumps({**record, "text": "usage: stale\n"})}[damage])
    assert run_help(["hello", "--help"], capsys) == first
    assert json.loads(cached.read_text())["text"] == first  # rewritten


def test_the_help_cache_can_be_turned_off(hello_command, monkeypatch, capsys):
    from alignkit.help import cache_dir

    monkeypatch.setenv("ALIGNKIT_NO_HELP_CACHE", "1")
    assert "Say hello" in run_help(["hello", "--help"], capsys)
    assert not cache_dir().exists()


@pytest.mark.parametrize("args, silenced", [([], True), (["--verbose"], False), (["--quiet=false"], False)])
def test_verbose_keeps_the_library_noise(args, silenced, monkeypatch, capsys, tmp_path):
    """Every command is quiet by default; ``--verbose`` (or ``--quiet false``) leaves the libraries' messages be:
    a function command, and ``fit``."""
    from conftest import QUIET, SFT_RECIPE, TINY_MODEL, run_cli

    import alignkit.quiet
    from alignkit.commands import run

    calls = []
    monkeypatch.setattr(alignkit.quiet, "quiet", lambda: calls.append("quiet"))
    run("plugins", ["--kind", "command", *args])
    assert "cai-revise" in capsys.readouterr().out
    assert calls == (["quiet"] if silenced else [])
    run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--trainer.max_steps=1", *args,
             "--data.init_args.task.init_args.num_train_prompts=20", "--run_dir", tmp_path / "run"])
    assert calls == (["quiet", "quiet"] if silenced else [])


def test_validate_takes_verbose_as_every_command_does(capsys):
    """``--verbose`` is alignkit's switch on ``validate`` too (Trainer.validate's own ``verbose``, which prints the
    results table, keeps its default)."""
    from conftest import SFT_RECIPE, run_cli

    with pytest.raises(SystemExit) as info:
        run_cli(["validate", "--config", SFT_RECIPE, "--verbose", "--print_config"])
    assert info.value.code in (0, None)
    assert "verbose: true" in capsys.readouterr().out
