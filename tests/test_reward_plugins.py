"""Reward plugins: reward model, ensemble, function and gold rewards, with tiny reward models saved to
tmp folders (no hub). Reward-model scores are checked against a direct ``sequence_scores`` on
hand-tokenised ids; function rewards against hand-computed values."""

from pathlib import Path

import pytest
import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.testing import assert_close
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.manager import PluginError
from alignkit.models.loading import ModelConfig, load_model, sequence_scores
from alignkit.models.tiny import TinyModelConfig
from alignkit.plugin import Reward
from alignkit.rewards import ENSEMBLE_METHODS, aggregate_ensemble, combine_rewards
from alignkit.types import Rollout
from alignkit_plugins.rewards import FunctionReward, RewardEnsemble, RewardModelReward
from alignkit_plugins.tasks import SentimentTask

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["review : the pizza at the diner on monday", "review : the soup at the cafe on friday"]
RESPONSES = ["the pizza was great", "the soup was cold and the service was slow but the price was good"]


def instantiate(parser: ArgumentParser, cfg):
    return parser.instantiate(cfg) if hasattr(parser, "instantiate") else parser.instantiate_classes(cfg)


def parse_reward(yaml: str) -> Reward:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=Reward)
    return instantiate(parser, parser.parse_string(yaml)).reward


@pytest.fixture(scope="module")
def rm_runs(tmp_path_factory) -> list[Path]:
    """Three distinct tiny reward models, each saved as a stage would: ``<run>/model/``."""
    runs = []
    for k in range(3):
        tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=k)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(k)  # the classifier is initialised from the global RNG
            model, tokenizer = load_model(ModelConfig(name_or_path="tiny", tiny=tiny), "sequence_classification")
        run = tmp_path_factory.mktemp(f"rm_{k}")
        model.save_pretrained(run / "model")
        tokenizer.save_pretrained(run / "model")
        runs.append(run)
    return runs


@pytest.fixture(scope="module")
def rm_dirs(rm_runs) -> list[str]:
    return [str(run / "model") for run in rm_runs]


# ------------------------------------------------------------------------------------ RewardModelReward

def test_reward_model_equals_direct_sequence_scores(rm_dirs):
    reward = RewardModelReward(rm_dirs[0], name="rm", weight=0.5)
    out = reward.score(PROMPTS, RESPONSES, None)
    assert out.name == "rm" and out.stats == {} and out.scores.shape == (2,)
    assert not out.scores.requires_grad
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.model.training

    tokenizer = AutoTokenizer.from_pretrained(rm_dirs[0])
    model = AutoModelForSequenceClassification.from_pretrained(rm_dirs[0], num_labels=1).eval()
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        ids = (tokenizer(prompt, add_special_tokens=False)["input_ids"]
               + tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        with torch.no_grad():
            direct = sequence_scores(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
        assert_close(out.scores[i], direct[0], atol=1e-5, rtol=1e-5)


def test_reward_model_independent_of_batch_and_padding(rm_dirs):
    reward = RewardModelReward(rm_dirs[1])
    alone = reward.score(PROMPTS[:1], RESPONSES[:1], None).scores  # no padding
    padded = reward.score(PROMPTS, RESPONSES, None).scores  # RESPONSES[0] padded to the longer one
    assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    reward.batch_size = 1
    assert_close(reward.score(PROMPTS, RESPONSES, None).scores, padded, atol=1e-5, rtol=1e-5)
    reversed_order = reward.score(PROMPTS[::-1], RESPONSES[::-1], None).scores
    assert_close(reversed_order.flip(0), padded, atol=1e-5, rtol=1e-5)


def test_reward_model_accepts_run_dir_and_stays_eval(rm_runs, rm_dirs):
    from_run = RewardModelReward(str(rm_runs[2]))
    assert_close(from_run.score(PROMPTS, RESPONSES, None).scores,
                 RewardModelReward(rm_dirs[2]).score(PROMPTS, RESPONSES, None).scores)
    from_run.train()
    assert not from_run.model.training


def test_reward_model_truncates_like_training(rm_dirs):
    reward = RewardModelReward(rm_dirs[0], max_length=8, max_prompt_length=4)
    rows = reward.encode(PROMPTS, RESPONSES)
    full = RewardModelReward(rm_dirs[0]).encode(PROMPTS, RESPONSES)
    assert all(len(r) <= 8 for r in rows) and any(len(r) > 8 for r in full)
    assert reward.score(PROMPTS, RESPONSES, None).scores.shape == (2,)


# ------------------------------------------------------------------------------------ RewardEnsemble

@pytest.fixture(scope="module")
def member_scores(rm_dirs) -> torch.Tensor:
    """(3, 2): each member scored on its own."""
    return torch.stack([RewardModelReward(d).score(PROMPTS, RESPONSES, None).scores for d in rm_dirs])


@pytest.mark.parametrize("method", ENSEMBLE_METHODS)
def test_ensemble_equals_aggregate_of_members(rm_dirs, member_scores, method):
    members = member_scores
    assert not torch.allclose(members[0], members[1])  # distinct members
    ensemble = RewardEnsemble(rm_dirs, method=method, uncertainty_coef=0.5, name="ens")
    out = ensemble.score(PROMPTS, RESPONSES, None)
    assert out.name == "ens"
    assert_close(out.scores, aggregate_ensemble(members, method, 0.5), atol=1e-5, rtol=1e-5)
    for k in range(3):
        assert out.stats[f"member_{k}"] == pytest.approx(float(members[k].mean()), abs=1e-5)
    assert out.stats["std"] == pytest.approx(float(members.std(dim=0, unbiased=False).mean()), abs=1e-5)


def test_ensemble_rejects_bad_options(rm_dirs):
    with pytest.raises(ValueError, match="method 'median' is unknown"):
        RewardEnsemble(rm_dirs, method="median")
    with pytest.raises(ValueError, match="at least one"):
        RewardEnsemble([])
    with pytest.raises(ValueError, match="uncertainty_coef"):
        RewardEnsemble(rm_dirs, uncertainty_coef=-1.0)


# ------------------------------------------------------------------------------------ FunctionReward

def test_function_reward_from_yaml():
    reward = parse_reward("""
reward:
  class_path: alignkit_plugins.rewards.FunctionReward
  init_args:
    function: alignkit_plugins.rewards.function.length_penalty
    kwargs: {target: 3, coef: 0.5}
    weight: 2.0
""")
    assert isinstance(reward, FunctionReward) and reward.reward_name == "length_penalty" and reward.weight == 2.0
    out = reward.score(["p"] * 3, ["a b c", "a", "a b c d e f"], None)
    # words 3, 1, 6 vs target 3: −0.5·0, −0.5·2, −0.5·3
    assert_close(out.scores, torch.tensor([0.0, -1.0, -1.5]))


def test_function_reward_colon_path_and_contains():
    reward = FunctionReward("alignkit_plugins.rewards.function:contains", kwargs={"word": "great"}, name="great")
    out = reward.score(["p"] * 3, ["The pizza was GREAT!", "greatest pizza", "no"], None)
    assert out.name == "great"
    assert_close(out.scores, torch.tensor([1.0, 0.0, 0.0]))


@pytest.mark.parametrize("path, message", [
    ("alignkit_plugins.rewards.function.nope", "has no attribute 'nope'"),
    ("no_such_package.module.function", "could not be imported"),
    ("alignkit_plugins.rewards.function.__name__", "not a callable"),
    ("length_penalty", "not a dotted path"),
])
def test_function_reward_bad_path_is_one_line(path, message):
    with pytest.raises(PluginError, match=message) as info:
        FunctionReward(path)
    assert path in str(info.value) and "\n" not in str(info.value)


def test_function_reward_bad_path_from_yaml():
    with pytest.raises(PluginError, match="no_such_package.f"):
        parse_reward("reward:\n  class_path: alignkit_plugins.rewards.FunctionReward\n"
                     "  init_args: {function: no_such_package.f}\n")


def test_function_reward_wrong_length_is_one_line():
    reward = FunctionReward("alignkit_plugins.rewards.function.length_penalty")
    reward.function = lambda prompts, responses: [1.0]
    with pytest.raises(PluginError, match="returned 1 scores for 2 responses") as info:
        reward.score(["p", "q"], ["a", "b"], None)
    assert "\n" not in str(info.value)
    reward.function = lambda prompts, responses: torch.ones(2, 2)
    with pytest.raises(PluginError, match=r"shape \(2, 2\)"):
        reward.score(["p", "q"], ["a", "b"], None)


# ------------------------------------------------------------------------------------ GoldReward

def test_gold_reward_equals_task_gold():
    reward = parse_reward("""
reward:
  class_path: alignkit_plugins.rewards.GoldReward
  init_args:
    task: {class_path: alignkit_plugins.tasks.SentimentTask, init_args: {num_train_prompts: 8, num_eval_prompts: 2}}
""")
    task = SentimentTask(num_train_prompts=8, num_eval_prompts=2)
    out = reward.score(PROMPTS, RESPONSES, None)
    assert out.name == "gold"
    assert_close(out.scores, torch.tensor([task.gold_reward(p, r) for p, r in zip(PROMPTS, RESPONSES)]))


# ------------------------------------------------------------------------------------ combination

def test_weighted_combination_of_two_plugins():
    length = FunctionReward("alignkit_plugins.rewards.function.length_penalty", kwargs={"target": 2, "coef": 1.0},
                            weight=0.5)
    great = FunctionReward("alignkit_plugins.rewards.function.contains", kwargs={"word": "great"}, weight=2.0)
    responses = ["great", "it was great", "it was bad indeed"]
    outputs = [r.score(["p"] * 3, responses, None) for r in (length, great)]
    total, parts = combine_rewards({o.name: o.scores for o in outputs}, {"length_penalty": 0.5, "contains": 2.0})
    # length: |1−2|, |3−2|, |4−2| → −1, −1, −2, ×0.5 → −0.5, −0.5, −1; contains: 1, 1, 0, ×2 → 2, 2, 0
    assert_close(parts["length_penalty"], torch.tensor([-0.5, -0.5, -1.0]))
    assert_close(parts["contains"], torch.tensor([2.0, 2.0, 0.0]))
    assert_close(total, torch.tensor([1.5, 1.5, -1.0]))


def test_host_combines_plugins_through_hooks(rm_dirs):
    from alignkit.module import AlignModule
    from alignkit_plugins.sft import SFT

    tiny = TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    rm = RewardModelReward(rm_dirs[0], name="rm", weight=0.5)
    length = FunctionReward("alignkit_plugins.rewards.function.length_penalty", kwargs={"target": 4}, weight=2.0)
    module = AlignModule(SFT(), policy=ModelConfig(name_or_path="tiny", tiny=tiny), rewards=[rm, length])
    dummy = torch.zeros(2, 1, dtype=torch.long)
    rollout = Rollout(sequences=dummy, attention_mask=dummy, response_mask=dummy, logprobs=dummy.float(),
                      ended=torch.ones(2, dtype=torch.bool), prompt_length=0, prompts=PROMPTS, responses=RESPONSES)
    combined, stats = module.score(rollout)
    expected = (0.5 * rm.score(PROMPTS, RESPONSES, None).scores
                + 2.0 * length.score(PROMPTS, RESPONSES, None).scores)
    assert_close(combined, expected, atol=1e-5, rtol=1e-5)
    assert {"objective/scores/rm", "objective/scores/length_penalty", "objective/scores"} <= set(stats)


# ------------------------------------------------------------------------------------ ensemble recipe

def test_reward_ensemble_pipeline_recipe_parses():
    from alignkit.commands import pipeline

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(pipeline, as_group=False)
    cfg = parser.parse_args(["--config", str(ROOT / "recipes/reward_ensemble.yaml"),
                             "--set+=--model.policy.name_or_path=sft/model", "--set+=--data.init_args.path=p.jsonl"])
    init = instantiate(parser, cfg)
    assert [s.name for s in init.stages] == ["rm_0", "rm_1", "rm_2"]
    assert all(s.command == "fit" and s.recipe == "reward_model.yaml" for s in init.stages)
    seeds = [tuple(a for a in s.args if "seed" in a) for s in init.stages]
    assert len(set(seeds)) == 3 and all(len(s) == 2 for s in seeds)
    assert init.set == ["--model.policy.name_or_path=sft/model", "--data.init_args.path=p.jsonl"]
