"""The SFT and reward-model recipes end to end on the tiny model, ``--print_config``, and the
``pipeline`` command (run, then resumed with every stage skipped)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import QUIET, RECIPES, RM_RECIPE, SFT_RECIPE, TINY_MODEL, run_cli

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_run_dir(run_dir: Path) -> dict:
    """The layout every finished fit run has; returns its metrics.json."""
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "model" / "config.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".model.")], "temporary export left behind"
    return read_json(run_dir / "metrics.json")


def print_config(capsys, argv: list) -> dict:
    with pytest.raises(SystemExit) as info:
        run_cli([*argv, "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ SFT

def test_sft_run_directory(sft_run):
    metrics = assert_run_dir(sft_run)
    assert metrics["algorithm"] == "SFT" and metrics["global_step"] == 24
    assert metrics["data"]["examples"] == 200 and metrics["data"]["dropped"] == 0
    assert Path(metrics["model"]) == sft_run / "model"
    config = yaml.safe_load((sft_run / "config.yaml").read_text())
    assert config["model"]["algorithm"]["class_path"] == "alignkit_plugins.sft.SFT"
    assert config["model"]["policy"]["tiny"]["hidden_size"] == 32


def test_sft_train_loss_goes_down(sft_run):
    metrics = read_json(sft_run / "metrics.json")
    first, final = metrics["first"]["train/loss"], metrics["final"]["train/loss"]
    assert final < first - 0.3, (first, final)
    assert "val/loss" in metrics["final"]


def test_sft_model_loads_with_plain_transformers(sft_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(sft_run / "model")
    tok = AutoTokenizer.from_pretrained(sft_run / "model")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.chat_template
    prompt = "review : the pizza at the diner on monday"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0]), str)


# ------------------------------------------------------------------------------------------ reward model

def test_reward_model_recipe(sft_run, preferences_file, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir = tmp_path / "rm"
    run_cli(["fit", "--config", RM_RECIPE, *QUIET, f"--model.policy.name_or_path={sft_run / 'model'}",
             f"--data.init_args.path={preferences_file}", "--data.init_args.batch_size=8",
             "--trainer.max_steps=6", "--run_dir", run_dir])
    metrics = assert_run_dir(run_dir)
    assert metrics["algorithm"] == "RewardModel"
    assert 0.0 <= metrics["final"]["val/rewards/accuracies"] <= 1.0
    assert "rewards/accuracies" in metrics["first"] and "val/loss" in metrics["final"]
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    assert model.config.num_labels == 1
    batch = tok(["the pizza was great", "the pizza was cold"], add_special_tokens=False, return_tensors="pt",
                padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ print_config

def test_print_config_sft(capsys, tmp_path):
    config = print_config(capsys, ["fit", "--config", SFT_RECIPE, *TINY_MODEL, "--run_dir", tmp_path / "run"])
    algorithm = config["model"]["algorithm"]
    assert algorithm["class_path"] == "alignkit_plugins.sft.SFT"
    assert algorithm["init_args"] == {"label_smoothing": 0.0, "loss_aggregation": "token-mean"}
    policy = config["model"]["policy"]
    assert policy["name_or_path"] == "tiny" and policy["tiny"]["hidden_size"] == 32
    assert {"vocab_size", "num_layers", "num_heads", "intermediate_size", "task"} <= set(policy["tiny"])
    assert {"dtype", "lora"} <= set(policy)
    assert config["model"]["optimizer"]["lr"] == pytest.approx(3e-3)
    assert config["data"]["class_path"] == "alignkit.data.SFTData"
    assert config["data"]["init_args"]["task"]["class_path"] == "alignkit_plugins.tasks.SentimentTask"
    assert config["trainer"]["max_epochs"] == 4 and config["seed_everything"] == 0
    assert not (tmp_path / "run").exists()


def test_print_config_reward_model(capsys, tmp_path):
    config = print_config(capsys, ["fit", "--config", RM_RECIPE, "--model.algorithm.init_args.center_coef=0.5"])
    algorithm = config["model"]["algorithm"]
    assert algorithm["class_path"] == "alignkit_plugins.reward_model.RewardModel"
    assert algorithm["init_args"] == {
        "use_margin": True, "center_coef": 0.5, "use_soft_labels": True, "shared_prompt": True,
    }
    assert config["data"]["class_path"] == "alignkit.data.PreferenceData"


@pytest.mark.parametrize("recipe", ["sft.yaml", "ppo_rlhf.yaml"])
def test_print_config_comments_documents_every_key(capsys, recipe):
    """The README's ``--print_config=comments`` (it needs ruamel.yaml: jsonargparse's ``ruyaml`` extra, a dependency):
    the same YAML as ``--print_config``, each key after a comment giving its help, type and default."""
    with pytest.raises(SystemExit) as info:
        run_cli(["fit", "--config", RECIPES / recipe, "--print_config=comments"])
    assert info.value.code in (0, None)
    text = capsys.readouterr().out
    lines = text.splitlines()
    undocumented = [lines[i + 1].strip() for i, line in enumerate(lines[:-1]) if line.strip().startswith("#  (type")]
    assert undocumented == []
    assert "Peak learning rate" in text and "HF hub name or local directory" in text
    config = yaml.safe_load(text)
    assert config["model"]["algorithm"]["class_path"].startswith("alignkit_plugins.")
    trainer = yaml.safe_load((RECIPES / recipe).read_text())["trainer"]
    assert {key: config["trainer"][key] for key in trainer} == trainer


# ------------------------------------------------------------------------------------------ pipeline

def test_pipeline_runs_then_skips_finished_stages(tmp_path, capsys):
    pipeline = {
        "stages": [
            {"name": "sft", "recipe": str(SFT_RECIPE),
             "args": [*TINY_MODEL, "--data.init_args.task.init_args.num_train_prompts=100"]},
            {"name": "collect", "command": "collect",
             "args": ["--policy=${sft}/model", "--task=alignkit_plugins.tasks.SentimentTask",
                      "--task.num_train_prompts=100", "--num_prompts=48", "--sampling.max_new_tokens=12"]},
            {"name": "rm", "recipe": str(RM_RECIPE),
             "args": ["--model.policy.name_or_path=${sft}/model",
                      "--data.init_args.path=${collect}/preferences.jsonl", "--data.init_args.batch_size=8"]},
        ],
        "set": [*QUIET, "--trainer.max_steps=3"],
    }
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(pipeline))
    root = tmp_path / "runs"
    run_cli(["pipeline", "--config", config, "--run_dir", root])
    out = capsys.readouterr().out
    for stage in ("sft", "collect", "rm"):
        assert f"[pipeline] {stage}:" in out
        assert (root / stage / "metrics.json").is_file()
    assert read_json(root / "sft" / "metrics.json")["global_step"] == 3
    assert (root / "collect" / "preferences.jsonl").stat().st_size > 0
    rm_config = yaml.safe_load((root / "rm" / "config.yaml").read_text())
    assert rm_config["model"]["policy"]["name_or_path"] == str(root / "sft" / "model")
    assert rm_config["data"]["init_args"]["path"] == str(root / "collect" / "preferences.jsonl")
    assert read_json(root / "rm" / "metrics.json")["algorithm"] == "RewardModel"

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    run_cli(["pipeline", "--config", config, "--run_dir", root])
    out = capsys.readouterr().out
    for stage in ("sft", "collect", "rm"):
        assert f"[pipeline] {stage}: already finished" in out
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps


def test_reverse_rlvr_recipe_runs_end_to_end(tmp_path, capsys):
    """The verifiable-reward pipeline (SFT → PPO on the task's checker → eval), shrunk to a few steps."""
    recipe = yaml.safe_load((RECIPES / "reverse_rlvr.yaml").read_text())
    for stage in recipe["stages"]:
        if "recipe" in stage:
            stage["recipe"] = str(RECIPES / stage["recipe"])
            stage["args"] = [*stage["args"], *TINY_MODEL, "--trainer.max_steps=3", "--trainer.max_epochs=1"]
    recipe["stages"][-1]["args"].append("--num_prompts=8")
    recipe["set"] = QUIET
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(recipe))
    run_cli(["pipeline", "--config", config, "--run_dir", tmp_path / "runs"])
    summary = read_json(tmp_path / "runs" / "eval" / "metrics.json")
    assert set(summary["policies"]) == {"sft", "ppo"}
    assert read_json(tmp_path / "runs" / "ppo" / "metrics.json")["algorithm"] == "PPO"
    sft_config = yaml.safe_load((tmp_path / "runs" / "sft" / "config.yaml").read_text())
    assert sft_config["data"]["init_args"]["task"]["class_path"] == "alignkit_plugins.tasks.ReverseTask"
