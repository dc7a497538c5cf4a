"""One seed per cell (issue #20): ``alignkit.seeds`` derives every internal seed from the run's seed, the CLI
records the derived seeds in config.yaml, objects built in Python derive the same values, and a whole
``alignkit pipeline --seed`` (SFT → collect → RM → DPO → PPO) changes every stage's result with the seed
and repeats it bit for bit with the same seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import QUIET, RECIPES, RM_RECIPE, SFT_RECIPE, TINY_MODEL, make_data, run_cli
from jsonargparse import Namespace
from safetensors.torch import load_file

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)
from alignkit.commands import Stage, stage_seed_args
from alignkit.seeds import ALGORITHM, ANNOTATOR, DATA, MAX_SEED, MODEL_INIT, derive_seed, fill_seeds, fixed_seed

# ------------------------------------------------------------------------------------------ derive_seed


def test_derive_seed_is_stable_across_processes():
    # Pinned values: a change of the derivation changes every run's numbers, so it must be deliberate.
    assert derive_seed(0, "data.seed") == 1128960195
    assert derive_seed(1, "data.seed") == 108277156
    assert derive_seed(0, "model.policy.tiny.seed") == 2038518034
    # ... and not Python's per-process string hash: another interpreter with another hash seed agrees.
    code = "from alignkit.seeds import derive_seed; print(derive_seed(1, 'data.seed'))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "123"},
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == 108277156


def test_derive_seed_separates_roles_and_seeds():
    roles = [MODEL_INIT, DATA, ALGORITHM, ANNOTATOR, "collect", "model.rewards.0.seed"]
    values = [derive_seed(seed, role) for seed in range(20) for role in roles]
    assert len(set(values)) == len(values)  # no two (seed, role) share a stream
    assert all(0 <= v <= MAX_SEED == 2**31 - 1 for v in values)
    assert derive_seed(2**32 - 1, DATA) <= MAX_SEED
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            derive_seed(bad, DATA)


def test_fill_seeds_fills_only_unset_seeds_by_dotted_role():
    config = Namespace(
        seed_everything=3,
        data=Namespace(class_path="SFTData", init_args=Namespace(
            seed=None, task=Namespace(class_path="SentimentTask", init_args=Namespace(seed=0)))),
        model=Namespace(algorithm=Namespace(class_path="PPO", init_args=Namespace(seed=11)),
                        policy=Namespace(tiny=Namespace(seed=None)),
                        rewards=[Namespace(class_path="R", init_args=Namespace(seed=None))]))
    filled = fill_seeds(config, 3)
    assert filled == {DATA: derive_seed(3, DATA), MODEL_INIT: derive_seed(3, MODEL_INIT),
                      "model.rewards.0.seed": derive_seed(3, "model.rewards.0.seed")}
    assert config.data.init_args.seed == derive_seed(3, "data.seed")
    assert config.model.policy.tiny.seed == derive_seed(3, "model.policy.tiny.seed")
    assert config.model.algorithm.init_args.seed == 11  # explicit: kept
    assert config.data.init_args.task.init_args.seed == 0  # the task is the yardstick: never derived


# ------------------------------------------------------------------------------------------ CLI and Python


def build_cli(args: list[str]):
    """``alignkit fit`` parsed and instantiated, not run."""
    from alignkit.cli import AlignCLI

    return AlignCLI(args=[*args, *TINY_MODEL, *QUIET], run=False)


def test_cli_fills_derived_seeds_and_keeps_explicit_ones(tmp_path):
    base = ["--config", str(SFT_RECIPE), "--data.init_args.task.init_args.num_train_prompts=40",
            "--run_dir", str(tmp_path / "a")]
    derived = build_cli([*base, "--seed_everything=3"])
    assert derived.config.data.init_args.seed == derive_seed(3, DATA) == derived.datamodule.seed
    assert derived.config.model.policy.tiny.seed == derive_seed(3, MODEL_INIT)
    assert derived.config.data.init_args.task.init_args.seed == 0

    explicit = build_cli([*base, "--seed_everything=3", "--data.init_args.seed=7", "--model.policy.tiny.seed=5"])
    assert explicit.config.data.init_args.seed == 7 == explicit.datamodule.seed
    assert explicit.config.model.policy.tiny.seed == 5
    other = build_cli([*base, "--seed_everything=4"])
    first = dict(derived.model.policy.named_parameters())
    assert any(not torch.equal(p, first[n]) for n, p in other.model.policy.named_parameters())  # model init
    assert derived.model.tokenizer.get_vocab() == other.model.tokenizer.get_vocab()  # the vocabulary is fixed

    ppo = build_cli(["--config", str(RECIPES / "ppo_rlhf.yaml"), "--model.policy.name_or_path=tiny",
                     "--model.rewards=null", "--seed_everything=3", "--run_dir", str(tmp_path / "b")])
    assert ppo.config.model.algorithm.init_args.seed == derive_seed(3, ALGORITHM)


def test_python_objects_with_unset_seeds_match_the_cli(tmp_path, tiny_tokenizer):
    from alignkit.data import SFTData
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model
    from alignkit_plugins.ppo import PPO
    from alignkit_plugins.tasks import SentimentTask

    cli = build_cli(["--config", str(SFT_RECIPE), "--data.init_args.task.init_args.num_train_prompts=40",
                     "--seed_everything=3", "--run_dir", str(tmp_path / "run")])
    cli.datamodule.attach(cli.model.tokenizer)
    cli.datamodule.setup()

    L.seed_everything(3)  # what the CLI does; Python-built objects then derive from it
    data = make_data(SFTData, tiny_tokenizer, task=SentimentTask(num_train_prompts=40), val_fraction=0.05,
                     batch_size=32, max_length=64, max_prompt_length=16)
    assert data.seed == cli.datamodule.seed == derive_seed(3, DATA)
    assert data.train_set == cli.datamodule.train_set and data.val_set == cli.datamodule.val_set
    model, _ = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), cli.model.policy.parameters(), strict=True))
    ppo = PPO()
    assert ppo.seed is None
    ppo.alignkit_configure(module=cli.model)
    assert ppo.seed == derive_seed(3, ALGORITHM)


def test_annotator_and_feedback_seeds_derive_from_their_command_seed(tmp_path):
    from alignkit.seeds import FEEDBACK
    from alignkit.task import SimulatedAnnotator
    from alignkit_plugins.constitutional import LMFeedback
    from alignkit_plugins.iterative import AnnotatorLabeller, LabelContext
    from alignkit_plugins.tasks import SentimentTask

    task = SentimentTask(num_train_prompts=8, num_eval_prompts=0)
    prompts = task.train_prompts() * 4
    good, bad = ["the food was great and fresh"] * len(prompts), ["the food was cold"] * len(prompts)

    def labels(annotator: SimulatedAnnotator) -> list[str]:
        return [p.chosen for p in annotator.label(task, prompts, good, bad)]

    L.seed_everything(3)  # used on its own, an annotator without a seed derives it from the global seed
    assert labels(SimulatedAnnotator(flip_prob=0.5)) == labels(SimulatedAnnotator(flip_prob=0.5,
                                                                                  seed=derive_seed(3, ANNOTATOR)))
    # iterate's labeller: from the run's seed in the label context, plus the round
    labeller = AnnotatorLabeller(SimulatedAnnotator(flip_prob=0.5))
    by_seed = {seed: [p.chosen for p in labeller.label(prompts, good, bad, LabelContext(task, 1, tmp_path, seed))]
               for seed in (1, 2)}
    assert by_seed[1] != by_seed[2]
    assert by_seed[1] == labels(SimulatedAnnotator(flip_prob=0.5, seed=derive_seed(1, ANNOTATOR) + 1))

    feedback = LMFeedback(model="unused")
    feedback.use_run_seed(4)
    assert feedback.seed == derive_seed(4, FEEDBACK)
    explicit = LMFeedback(model="unused", seed=9)
    explicit.use_run_seed(4)
    assert explicit.seed == 9


def test_pipeline_seed_reaches_each_kind_of_stage():
    @fixed_seed
    def yardstick(seed: int = 0) -> None:
        """A plugin's evaluation-like command."""

    def sampler(seed: int = 0) -> None:
        """A plugin's sampling command."""

    def no_seed(policy: str = "") -> None:
        """A command without randomness."""

    from alignkit.commands import available

    commands = {**available(), "yardstick": yardstick, "sampler": sampler, "no_seed": no_seed}
    assert stage_seed_args(Stage("sft", "sft.yaml"), 5, commands) == [f"--seed_everything={derive_seed(5, 'sft')}"]
    assert (stage_seed_args(Stage("rm_b", "rm.yaml"), 5, commands)
            != stage_seed_args(Stage("rm", "rm.yaml"), 5, commands))
    assert stage_seed_args(Stage("collect", command="collect"), 5, commands) == [f"--seed={derive_seed(5, 'collect')}"]
    assert stage_seed_args(Stage("pairs", command="sampler"), 5, commands) == [f"--seed={derive_seed(5, 'pairs')}"]
    assert stage_seed_args(Stage("eval", command="eval"), 5, commands) == []
    assert stage_seed_args(Stage("judge", command="yardstick"), 5, commands) == []
    assert stage_seed_args(Stage("x", command="no_seed"), 5, commands) == []


# ------------------------------------------------------------------------------------------ a whole pipeline


def pipeline_file(tmp_path: Path) -> Path:
    """SFT → collect → RM → DPO → PPO → eval on the tiny model, a few steps each."""
    task = ["--task=alignkit_plugins.tasks.SentimentTask", "--task.num_train_prompts=64"]
    prefs = "--data.init_args.path=${collect}/preferences.jsonl"
    small = ["--data.init_args.batch_size=8", "--trainer.max_steps=2"]
    stages = [
        {"name": "sft", "recipe": str(SFT_RECIPE),
         "args": ["--data.init_args.task.init_args.num_train_prompts=64", "--trainer.max_steps=3"]},
        {"name": "collect", "command": "collect",
         "args": ["--policy=${sft}/model", *task, "--num_prompts=32", "--sampling.max_new_tokens=12",
                  "--annotator.temperature=0.5"]},
        {"name": "rm", "recipe": str(RM_RECIPE), "args": ["--model.policy.name_or_path=${sft}/model", prefs, *small]},
        {"name": "dpo", "recipe": str(RECIPES / "dpo.yaml"),
         "args": ["--model.policy.name_or_path=${sft}/model", prefs, *small]},
        {"name": "ppo", "recipe": str(RECIPES / "ppo_rlhf.yaml"),
         "args": ["--model.policy.name_or_path=${sft}/model",
                  "--model.rewards=[{class_path: alignkit_plugins.rewards.RewardModelReward, "
                  "init_args: {path: ${rm}/model}}]",
                  "--data.init_args.task.init_args.num_train_prompts=64",
                  "--model.algorithm.init_args.sampling.max_new_tokens=8",
                  *small]},
        {"name": "eval", "command": "eval",
         "args": ["--policies={sft: ${sft}/model, dpo: ${dpo}/model}", *task, "--num_prompts=4",
                  "--sampling.max_new_tokens=8"]},
    ]
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"stages": stages, "set": [*TINY_MODEL, *QUIET, "--trainer.limit_val_batches=0"]}))
    return path


def outputs(root: Path) -> dict[str, object]:
    """Every stage's result: the trained weights, the labelled pairs."""
    weights = {stage: load_file(root / stage / "model" / "model.safetensors") for stage in ("sft", "rm", "dpo", "ppo")}
    return {**weights, "collect": (root / "collect" / "preferences.jsonl").read_text()}


def same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a == b


def test_one_seed_drives_every_stage_of_a_pipeline(tmp_path, capsys):
    config = pipeline_file(tmp_path)
    for name, seed in (("one", 1), ("two", 2), ("one_again", 1)):
        run_cli(["pipeline", "--config", config, "--seed", seed, "--run_dir", tmp_path / name])
    out = capsys.readouterr().out
    assert f"[pipeline] collect: collect --seed={derive_seed(1, 'collect')} " in out
    assert f"[pipeline] sft: fit --seed_everything={derive_seed(2, 'sft')} " in out
    eval_line = next(line for line in out.splitlines() if line.startswith("[pipeline] eval: "))
    assert "--seed" not in eval_line and eval_line.endswith("(seed 1: none derived)")  # eval: a yardstick

    one, two, again = (outputs(tmp_path / name) for name in ("one", "two", "one_again"))
    for stage in one:
        assert not same(one[stage], two[stage]), f"{stage}: seeds 1 and 2 gave the same result"
        assert same(one[stage], again[stage]), f"{stage}: seed 1 twice gave different results"

    # config.yaml records the run's seed and every seed derived from it
    sft = yaml.safe_load((tmp_path / "two" / "sft" / "config.yaml").read_text())
    run_seed = derive_seed(2, "sft")  # the stage's seed, derived from the pipeline's by its name
    assert sft["seed_everything"] == run_seed
    assert sft["model"]["policy"]["tiny"]["seed"] == derive_seed(run_seed, MODEL_INIT)
    assert sft["data"]["init_args"]["seed"] == derive_seed(run_seed, DATA)
    assert sft["data"]["init_args"]["task"]["init_args"]["seed"] == 0  # the task stays the yardstick
    ppo = yaml.safe_load((tmp_path / "two" / "ppo" / "config.yaml").read_text())
    assert ppo["model"]["algorithm"]["init_args"]["seed"] == derive_seed(derive_seed(2, "ppo"), ALGORITHM)
    collect = json.loads((tmp_path / "two" / "collect" / "metrics.json").read_text())
    assert collect["seed"] == derive_seed(2, "collect")
    assert collect["annotator_seed"] == derive_seed(collect["seed"], ANNOTATOR)
    # eval is the yardstick: the same sampling seed and task (prompts) for every seed of the pipeline
    settings = [json.loads((tmp_path / name / "eval" / "metrics.json").read_text())["settings"]
                for name in ("one", "two")]
    assert settings[0]["seed"] == settings[1]["seed"] == 0 and settings[0]["task_seed"] == settings[1]["task_seed"] == 0
