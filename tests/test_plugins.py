"""Plugins from outside alignkit: an algorithm defined only here (in a module this test writes), selected
by ``class_path`` in a recipe, registered through a fake distribution's entry point and listed by
``alignkit plugins``; and the errors a faulty plugin raises."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import yaml
from conftest import QUIET, SFT_RECIPE, TINY_MODEL, run_cli

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)
from alignkit.manager import PluginError, build_manager, call_each, call_first, discover, implemented_hooks
from alignkit.plugin import Algorithm, hookimpl
from alignkit.types import LossOutput

MODULE = "alignkit_outside_plugin_test"
DIST = "alignkit-outside-plugin"
VERSION = "1.2.3"

PLUGIN_SOURCE = '''
"""An alignment algorithm published by "another package": SFT whose loss is multiplied by ``scale``."""

from alignkit.plugin import Algorithm, hookimpl
from alignkit.types import LossOutput
from alignkit_plugins.sft import sft_loss


class ScaledSFT(Algorithm):
    data_kind = "sft"

    def __init__(self, scale: float = 2.0):
        """
        Args:
            scale: factor applied to the SFT loss.
        """
        super().__init__()
        self.scale = scale

    @hookimpl
    def alignkit_loss(self, module, batch):
        logits = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids).logits
        loss, count = sft_loss(logits, batch.labels)
        return LossOutput(self.scale * loss, {"unscaled_loss": loss.detach(), "tokens/trained": count.float()})


class Exploding(ScaledSFT):
    @hookimpl
    def alignkit_loss(self, module, batch):
        raise RuntimeError("the outside plugin exploded")
'''


@pytest.fixture
def outside_plugin(tmp_path, monkeypatch):
    """A plugin module and a ``*.dist-info`` folder declaring its entry point, on ``sys.path``."""
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = site / f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text(f"[alignkit]\nscaled_sft = {MODULE}:ScaledSFT\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(MODULE, None)


def write_recipe(tmp_path, algorithm: dict):
    recipe = yaml.safe_load(SFT_RECIPE.read_text())
    recipe["model"]["algorithm"] = algorithm
    path = tmp_path / "outside.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ------------------------------------------------------------------------------------------ outside algorithm

def test_outside_algorithm_runs_a_recipe_end_to_end(outside_plugin, tmp_path):
    recipe = write_recipe(tmp_path, {"class_path": f"{MODULE}.ScaledSFT", "init_args": {"scale": 3.0}})
    run_dir = tmp_path / "run"
    run_cli(["fit", "--config", recipe, *TINY_MODEL, *QUIET, "--data.init_args.task.init_args.num_train_prompts=50",
             "--trainer.max_steps=3", "--run_dir", run_dir])
    metrics = yaml.safe_load((run_dir / "metrics.json").read_text())
    assert metrics["algorithm"] == "ScaledSFT" and metrics["global_step"] == 3
    final = metrics["final"]
    assert final["train/loss"] == pytest.approx(3.0 * final["unscaled_loss"], rel=1e-4)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["algorithm"] == {"class_path": f"{MODULE}.ScaledSFT", "init_args": {"scale": 3.0}}
    assert (run_dir / "model" / "config.json").is_file()


def test_outside_algorithm_selected_on_the_command_line(outside_plugin, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", SFT_RECIPE, f"--model.algorithm={MODULE}.ScaledSFT",
                 "--model.algorithm.init_args.scale=0.5", "--print_config"])
    assert info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm"] == {"class_path": f"{MODULE}.ScaledSFT", "init_args": {"scale": 0.5}}


def test_outside_entry_point_is_discovered_and_listed(outside_plugin, capsys):
    infos = {p.name: p for p in discover()}
    info = infos["scaled_sft"]
    assert (info.kind, info.distribution, info.version) == ("algorithm", DIST, VERSION)
    assert info.target == f"{MODULE}:ScaledSFT" and info.hooks == ("alignkit_loss",)
    run_cli(["plugins"])
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("scaled_sft ")]
    assert line.split()[1] == "algorithm"
    assert f"{DIST} {VERSION}" in line and f"{MODULE}:ScaledSFT" in line and line.rstrip().endswith("loss")
    run_cli(["plugins", "--kind", "algorithm"])
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert "scaled_sft" in names and "sft" in names and "sentiment" not in names


def test_plugin_failing_in_a_run_names_plugin_and_hook(outside_plugin, tmp_path, capsys):
    recipe = write_recipe(tmp_path, {"class_path": f"{MODULE}.Exploding"})
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", recipe, *TINY_MODEL, *QUIET, "--data.init_args.task.init_args.num_train_prompts=50",
                 "--trainer.max_steps=2", "--run_dir", run_dir])
    assert info.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit: error:")]
    assert "PluginError" in line and f"{MODULE}.Exploding" in line and "alignkit_loss" in line
    assert "the outside plugin exploded" in line
    assert not (run_dir / "model").exists()


# ------------------------------------------------------------------------------------------ built-ins

def test_builtin_plugins_are_listed(capsys):
    run_cli(["plugins"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["name", "kind"]
    rows = {line.split()[0]: line for line in lines[1:]}
    expected = {"sft": ("algorithm", "alignkit_plugins.sft:SFT"),
                "reward_model": ("algorithm", "alignkit_plugins.reward_model:RewardModel"),
                "sentiment": ("task", "alignkit_plugins.tasks:SentimentTask"),
                "reverse": ("task", "alignkit_plugins.tasks:ReverseTask")}
    for name, (kind, target) in expected.items():
        assert name in rows, f"{name} not listed:\n" + "\n".join(lines)
        assert rows[name].split()[1] == kind and target in rows[name] and "alignkit" in rows[name]
    assert rows["sft"].rstrip().endswith("loss")


# ------------------------------------------------------------------------------------------ hook errors

class Raising(Algorithm):
    @hookimpl
    def alignkit_loss(self, module, batch):
        raise ValueError("bad batch shape")


class WrongType(Algorithm):
    @hookimpl
    def alignkit_loss(self, module, batch):
        return 1.5


class WrongMetrics(Algorithm):
    @hookimpl
    def alignkit_metrics(self, module, rollout, experience):
        return [("kl", 0.1)]


class Misspelled(Algorithm):
    @hookimpl
    def alignkit_los(self, module, batch):
        return None


class WrongArgument(Algorithm):
    @hookimpl
    def alignkit_loss(self, module, minibatch):
        return None


class Silent(Algorithm):
    pass


def test_hook_that_raises_names_plugin_and_hook():
    pm = build_manager([Raising()])
    with pytest.raises(PluginError) as info:
        call_first(pm, "alignkit_loss", LossOutput, module=None, batch=None)
    message = str(info.value)
    assert f"{__name__}.Raising" in message and "alignkit_loss" in message
    assert "ValueError" in message and "bad batch shape" in message
    assert isinstance(info.value.__cause__, ValueError)


def test_hook_returning_the_wrong_type_names_plugin_and_hook():
    pm = build_manager([WrongType()])
    with pytest.raises(PluginError) as info:
        call_first(pm, "alignkit_loss", LossOutput, module=None, batch=None)
    message = str(info.value)
    assert f"{__name__}.WrongType" in message and "alignkit_loss" in message
    assert "float" in message and "LossOutput" in message
    with pytest.raises(PluginError, match=r"WrongMetrics returned list from hook alignkit_metrics, expected dict"):
        call_each(build_manager([WrongMetrics()]), "alignkit_metrics", dict, module=None, rollout=None, experience=None)


def test_misspelled_hook_fails_at_manager_build():
    assert implemented_hooks(Misspelled) == ("alignkit_los",)
    with pytest.raises(PluginError, match="alignkit_los") as info:
        build_manager([Misspelled()])
    assert "Misspelled" in str(info.value)


def test_hook_with_a_wrong_argument_fails_at_manager_build():
    with pytest.raises(PluginError, match="WrongArgument") as info:
        build_manager([WrongArgument()])
    assert "minibatch" in str(info.value)


def test_missing_loss_hook_is_named():
    pm = build_manager([Silent()])
    with pytest.raises(PluginError, match="alignkit_loss"):
        call_first(pm, "alignkit_loss", LossOutput, module=None, batch=None)


#: Every call the wrapper and the plain counter below saw: ("wrapper", result type) / ("plain", None).
SEEN: list[tuple[str, str | None]] = []


class LossWatcher:
    """A plugin that only watches: a ``wrapper=True`` implementation around every ``alignkit_loss`` call, and a
    plain ``tryfirst`` one that counts the calls and returns None (so the algorithm still answers)."""

    @hookimpl(wrapper=True)
    def alignkit_loss(self, module, batch):
        result = yield
        SEEN.append(("wrapper", type(result).__name__))
        return result


class LossCounter:
    @hookimpl(tryfirst=True)
    def alignkit_loss(self, module, batch):
        SEEN.append(("plain", None))


def test_a_wrapper_plugin_sees_every_loss_call(tmp_path):
    """Hooks are called through pluggy, so a ``@hookimpl(wrapper=True)`` plugin given in ``model.plugins`` wraps
    each ``alignkit_loss`` call of a run (4 training steps) and sees its LossOutput."""
    SEEN.clear()
    run_cli(["fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET, "--data.init_args.task.init_args.num_train_prompts=50",
             "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
             f"--model.plugins=[{{class_path: {__name__}.LossWatcher}}, {{class_path: {__name__}.LossCounter}}]",
             "--run_dir", tmp_path / "run"])
    wrapped = [kind for who, kind in SEEN if who == "wrapper"]
    assert wrapped == ["LossOutput"] * 4
    assert len([who for who, _ in SEEN if who == "plain"]) == 4
    assert SEEN[0] == ("plain", None) and SEEN[1] == ("wrapper", "LossOutput")  # the wrapper is outside the call


def test_a_wrapper_may_not_hand_the_host_a_wrong_type():
    class Replacing(Algorithm):
        @hookimpl
        def alignkit_loss(self, module, batch):
            return LossOutput(loss=torch.zeros(()), stats={})

    class Spoiler:
        @hookimpl(wrapper=True)
        def alignkit_loss(self, module, batch):
            yield
            return 1.0

    pm = build_manager([Replacing(), Spoiler()])
    with pytest.raises(PluginError, match=r"returned float from hook alignkit_loss, expected LossOutput"):
        call_first(pm, "alignkit_loss", LossOutput, module=None, batch=None)
