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
