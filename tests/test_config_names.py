"""Plugin names as ``alignkit plugins`` prints them, in YAML files too (#21 item 6): a recipe or ``--config`` file
may say ``class_path: dpo``, ``algorithm: dpo``, ``rewards: [gold_reward]`` or ``task: sentiment``."""

from __future__ import annotations

import pytest
import yaml
from conftest import RECIPES, run_cli

from alignkit.cli import resolve_config_names


def test_names_in_a_loaded_config_become_class_paths_and_nothing_else_changes():
    config = {"model": {"algorithm": {"class_path": "dpo", "init_args": {"beta": 0.2}},
                        "rewards": ["gold_reward", {"class_path": "my.Reward"}, {"class_path": "function_reward"}],
                        "policy": {"name_or_path": "sft", "tiny": {"task": "reverse"}}},
              "data": {"class_path": "alignkit.data.PromptData", "init_args": {"task": "sentiment"}},
              "trainer": {"callbacks": [{"class_path": "NotAPlugin"}]}}
    assert resolve_config_names(config) == {
        "model": {"algorithm": {"class_path": "alignkit_plugins.dpo.DPO", "init_args": {"beta": 0.2}},
                  "rewards": [{"class_path": "alignkit_plugins.rewards.GoldReward"}, {"class_path": "my.Reward"},
                              {"class_path": "alignkit_plugins.rewards.FunctionReward"}],
                  "policy": {"name_or_path": "sft", "tiny": {"task": "reverse"}}},  # a model and a task's own name
        "data": {"class_path": "alignkit.data.PromptData",
                 "init_args": {"task": "alignkit_plugins.tasks.SentimentTask"}},
        "trainer": {"callbacks": [{"class_path": "NotAPlugin"}]}}
    assert resolve_config_names({"model": {"algorithm": "grpo"}}) == {
        "model": {"algorithm": "alignkit_plugins.pg.GRPO"}}


def test_a_config_file_selects_plugins_by_name(tmp_path, capsys):
    named = tmp_path / "named.yaml"
    named.write_text("model:\n  algorithm:\n    class_path: dpo\n    init_args: {beta: 0.3}\n"
                     "data:\n  init_args:\n    task: sentiment\n")
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", RECIPES / "dpo.yaml", "--config", named, "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["algorithm"]["class_path"] == "alignkit_plugins.dpo.DPO"
    assert config["model"]["algorithm"]["init_args"]["beta"] == 0.3
    assert config["data"]["init_args"]["task"]["class_path"] == "alignkit_plugins.tasks.SentimentTask"
