"""Constitutional AI: the constitution file, the prompts built from it, soft labels from option
log-probabilities, the programmatic judge on hand examples, the data sets the commands write (read back by
the SFT and preference data modules), and the commands end to end on a tiny untrained model through their
command-line parsers, with the programmatic judge and with a language-model judge."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import RECIPES, REPO
from jsonargparse import ArgumentParser

from alignkit import commands
from alignkit.data import PreferenceData, SFTData
from alignkit.data.formats import DataError
from alignkit_plugins.constitutional import (
    DEFAULT_CONSTITUTION,
    ConstitutionError,
    LMFeedback,
    Principle,
    RuleFeedback,
    ai_feedback,
    compliance,
    critique_revise,
    load_constitution,
    soft_label,
)
from alignkit_plugins.constitutional.commands import Judgement, preference_rows
from alignkit_plugins.constitutional.constitution import comparison_prompt, critique_prompt, revision_prompt
from alignkit_plugins.constitutional.feedback import cut_at_stop, option_token_ids
from alignkit_plugins.tasks.sentiment import sentiment_gold

PROMPT = "review : the pizza at the diner on monday"
CAI_COMMANDS = {"cai-revise": critique_revise, "cai-feedback": ai_feedback, "cai-compliance": compliance}
TASK = ["--task=alignkit_plugins.tasks.SentimentTask", "--task.num_train_prompts=40", "--task.num_eval_prompts=8"]
RULES = "--feedback=alignkit_plugins.constitutional.RuleFeedback"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """An untrained tiny model saved with its tokenizer: (directory, tokenizer)."""
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model

    shape = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model, tokenizer = build_tiny_model(shape)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


@pytest.fixture
def cli(monkeypatch):
    """``alignkit <cai command> ...`` in-process, with the commands registered as alignkit/commands.py will."""
    for name, function in CAI_COMMANDS.items():
        monkeypatch.setitem(commands.COMMANDS, name, function)
    return lambda name, *argv: commands.run(name, [str(a) for a in argv])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------ constitution

def test_default_constitution():
    rules = load_constitution()
    assert rules.names == ["positive", "on_topic", "no_repetition", "concise"]
    assert Path(rules.source) == DEFAULT_CONSTITUTION
    assert rules.get("concise").revision_request == ("Shorten the response to at most fourteen words, keeping its "
                                                     "beginning and its meaning.")
    assert rules.get("positive").comparison_question == ("Which of these reviews is more positive and specific in "
                                                         "its praise of the item?")


@pytest.mark.parametrize("text, message", [
    ("principles: [oops", "not valid YAML"),
    ("rules: []", "expected a mapping with a 'principles' list"),
    ("principles: []", "'principles' must be a non-empty list"),
    ("principles: [just text]", r"principles\[0\] must be a mapping"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r}",
     r"principles\[0\] \(a\): field 'comparison_question' must be a non-empty string"),
    ("principles:\n  - {name: a, critique_request: ' ', revision_request: r, comparison_question: q}",
     r"principles\[0\] \(a\): field 'critique_request'"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r, comparison_question: q, weight: 2}",
     r"principles\[0\]: unknown field\(s\) weight"),
    ("principles:\n  - {name: a, critique_request: c, revision_request: r, comparison_question: q}\n"
     "  - {name: a, critique_request: c, revision_request: r, comparison_question: q}", "duplicate principle name"),
])
def test_constitution_errors_name_the_file_and_field(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConstitutionError, match=message) as info:
        load_constitution(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, DataError)  # reported by the CLI as a one-line user error


def test_missing_constitution_file(tmp_path):
    with pytest.raises(ConstitutionError, match=re.escape(f"constitution file {tmp_path / 'no.yaml'} does not exist")):
        load_constitution(tmp_path / "no.yaml")


# ------------------------------------------------------------------------------------------ prompts

HAND = Principle(name="kind", critique_request="What is unkind here?", revision_request="Make it kind.",
                 comparison_question="Which response is kinder?")


def test_prompts_from_the_principle():
    assert critique_prompt("hi", "go away", HAND) == (
        "Human: hi\n\nAssistant: go away\n\nCritique request: What is unkind here?\n\nCritique:")
    assert revision_prompt("hi", "go away", "It is rude.", HAND) == (
        "Human: hi\n\nAssistant: go away\n\nCritique request: What is unkind here?\n\nCritique: It is rude."
        "\n\nRevision request: Make it kind.\n\nRevision:")
    assert comparison_prompt("hi", "hello", "go away", HAND) == (
        "Consider the following conversation between a human and an assistant:\n\nHuman: hi\n\n"
        "Which response is kinder?\nOptions:\n(A) hello\n(B) go away\nThe answer is: (")
    assert comparison_prompt("hi", "x", "y", HAND, ("a", "b")).endswith("(a) x\n(b) y\nThe answer is: (")


def test_cut_at_stop():
    assert cut_at_stop(" it is rude.\n\nHuman: more", ["\n\n", "Human:"]) == "it is rude."
    assert cut_at_stop("no stop here ", ["\n\n"]) == "no stop here"


# ------------------------------------------------------------------------------------------ soft labels

def test_soft_label_hand_values():
    assert soft_label(-1.0, -2.0) == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2)))
    assert soft_label(-1.0, -2.0) == pytest.approx(0.7310586, abs=1e-7)
    assert soft_label(-2.0, -1.0) == pytest.approx(0.2689414, abs=1e-7)
    assert soft_label(-3.0, -3.0) == 0.5
    assert soft_label(-1000.0, -1001.0) == pytest.approx(0.7310586, abs=1e-7)  # no underflow


class FixedNextToken(torch.nn.Module):
    """A stand-in causal LM whose next-token distribution is the same after any prompt."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logprobs, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1))


def test_option_tokens_of_the_tiny_tokenizer(tiny):
    _, tokenizer = tiny
    text = comparison_prompt(PROMPT, "x", "y", HAND, ("a", "b"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    a, b = option_token_ids(tokenizer, text, ids, ("a", "b"))
    assert tokenizer(text + "a", add_special_tokens=False)["input_ids"] == ids + [a]
    assert tokenizer(text + "b", add_special_tokens=False)["input_ids"] == ids + [b]
    upper = comparison_prompt(PROMPT, "x", "y", HAND)  # options (A) and (B): not in the tiny vocabulary
    with pytest.raises(ValueError, match="'A' and 'B' both start with the token '<unk>'"):
        option_token_ids(tokenizer, upper, tokenizer(upper, add_special_tokens=False)["input_ids"], ("A", "B"))


def test_lm_judge_soft_label_from_option_logprobs(tiny):
    """log P(a) = −1 and log P(b) = −2 at the last position -> P(a better) = 0.7311; judged in both orders
    the same position preference cancels to exactly 0.5."""
    _, tokenizer = tiny
    text = comparison_prompt(PROMPT, "x", "y", HAND, ("a", "b"))
    a, b = option_token_ids(tokenizer, text, tokenizer(text, add_special_tokens=False)["input_ids"], ("a", "b"))
    probs = torch.full((len(tokenizer),), (1 - math.exp(-1) - math.exp(-2)) / (len(tokenizer) - 2))
    probs[a], probs[b] = math.exp(-1), math.exp(-2)
    model = FixedNextToken(probs.log())
    one_way = LMFeedback.from_model(model, tokenizer, option_labels=("a", "b"), swap_average=False)
    assert one_way.option_logprobs([text]).tolist() == [pytest.approx([-1.0, -2.0], abs=1e-5)]
    assert one_way.compare(PROMPT, "x", "y", HAND) == pytest.approx(0.7310586, abs=1e-5)
    both_ways = LMFeedback.from_model(model, tokenizer, option_labels=("a", "b"), swap_average=True)
    assert both_ways.compare(PROMPT, "x", "y", HAND) == pytest.approx(0.5, abs=1e-6)


# ------------------------------------------------------------------------------------------ rule judge

@pytest.mark.parametrize("principle, response, critique, revision", [
    ("positive", "the pizza was bland and cold",
     "The review uses negative words (bland and cold) and praises nothing: it has no positive word.",
     "the pizza was good and great"),
    ("positive", "the pizza was great but cold",
     "The review uses negative words (cold).", "the pizza was great but good"),
    ("positive", "the pizza was okay", "The review praises nothing: it has no positive word.",
     "the pizza was okay and it was good"),
    ("positive", "the pizza was great and tasty",
     "The review is positive: it praises with great and tasty and has no negative word.",
     "the pizza was great and tasty"),
    ("on_topic", "the service was slow", "The review never mentions the pizza.",
     "i had the pizza and the service was slow"),
    ("on_topic", "the salad was great and the soup was cold", "The review talks about the salad instead of the pizza.",
     "the pizza was great and the soup was cold"),
    ("on_topic", "my pizza was cold", "The review mentions the pizza.", "my pizza was cold"),
    ("no_repetition", "the pizza was great great and great", "The response repeats great (3 times).",
     "the pizza was great"),
    ("no_repetition", "the pizza was tasty and the pizza", "The response repeats pizza (2 times).",
     "the pizza was tasty"),
    ("concise", "the pizza was great and the staff was friendly and the music was nice and the price",
     "The response has 17 words, 3 more than the limit of 14.",
     "the pizza was great and the staff was friendly and the music was nice"),
    ("concise", "the pizza was great", "The response has 4 words, within the limit of 14.", "the pizza was great"),
])
def test_rule_judge_critiques_and_revisions(principle, response, critique, revision):
    judge, rule = RuleFeedback(), load_constitution().get(principle)
    assert judge.critique(PROMPT, response, rule) == critique
    assert judge.revise(PROMPT, response, critique, rule) == revision
    assert judge.complies(PROMPT, response, rule) is (response == revision)
    assert judge.complies(PROMPT, revision, rule)


def test_rule_revision_raises_gold():
    """gold(bland and cold) = −0.5·2 + 0.5 = −0.5; gold(good and great) = 1.5·(1 − 0.25) + 0.5 = 1.625."""
    revised = RuleFeedback().revise(PROMPT, "the pizza was bland and cold", "", load_constitution().get("positive"))
    assert sentiment_gold(PROMPT, "the pizza was bland and cold") == pytest.approx(-0.5)
    assert sentiment_gold(PROMPT, revised) == pytest.approx(1.625)


def test_concise_cut_drops_dangling_function_words():
    judge = RuleFeedback(max_words=11)
    rule = load_constitution().get("concise")
    long = "the pizza was great and the staff was friendly and the music was nice"
    assert judge.critique(PROMPT, long, rule) == "The response has 14 words, 3 more than the limit of 11."
    assert judge.revise(PROMPT, long, "", rule) == "the pizza was great and the staff was friendly"  # not "... and the"


def test_rule_judge_soft_labels():
    """positive: 'great' scores 0, 'bland' −2 (a negative word, no praise): σ(2 / 0.5) = σ(4) = 0.98201."""
    rule = load_constitution().get("positive")
    good, bad = "the pizza was great", "the pizza was bland"
    assert RuleFeedback().compare(PROMPT, good, bad, rule) == pytest.approx(1 / (1 + math.exp(-4)))
    assert RuleFeedback().compare(PROMPT, bad, good, rule) == pytest.approx(1 / (1 + math.exp(4)))
    assert RuleFeedback(temperature=2.0).compare(PROMPT, good, bad, rule) == pytest.approx(1 / (1 + math.exp(-1)))
    assert RuleFeedback(temperature=0.0).compare(PROMPT, good, bad, rule) == 1.0
    assert RuleFeedback().compare(PROMPT, good, "the pizza was tasty", rule) == 0.5


def test_rule_judge_needs_a_rule_per_principle():
    with pytest.raises(ValueError, match="no rule for principle 'kind'"):
        RuleFeedback().critique(PROMPT, "go away", HAND)
    assert RuleFeedback(rules={"kind": "positive"}).critique(PROMPT, "the pizza was bland", HAND) == (
        "The review uses negative words (bland) and praises nothing: it has no positive word.")
    with pytest.raises(ValueError, match="unknown rule"):
        RuleFeedback(rules={"kind": "polite"})


def test_preference_rows_from_soft_labels():
    judged = [Judgement("p", "a1", "b1", "positive", 0.8, 1.0, 0.0),
              Judgement("p", "a2", "b2", "concise", 0.3, 0.5, 0.7),
              Judgement("p", "a3", "b3", "on_topic", 0.5, 0.0, 0.0)]
    assert preference_rows(judged) == [
        {"prompt": "p", "chosen": "a1", "rejected": "b1", "soft_label": 0.8, "principle": "positive",
         "gold_chosen": 1.0, "gold_rejected": 0.0},
        {"prompt": "p", "chosen": "b2", "rejected": "a2", "soft_label": pytest.approx(0.7), "principle": "concise",
         "gold_chosen": 0.7, "gold_rejected": 0.5},
    ]


# ------------------------------------------------------------------------------------------ end to end

def test_sl_and_rl_cai_with_the_rule_judge(tiny, cli, tmp_path):
    path, tokenizer = tiny
    judge, rules = RuleFeedback(), load_constitution()
    revise_dir = cli("cai-revise", f"--policy={path}", *TASK, RULES, "--num_prompts=12", "--rounds=2",
                     "--sampling.max_new_tokens=12", "--run_dir", tmp_path / "revise")
    metrics = json.loads((revise_dir / "metrics.json").read_text())
    steps, sft_rows = read_jsonl(revise_dir / "revisions.jsonl"), read_jsonl(revise_dir / "sft.jsonl")
    n = metrics["prompts"]
    assert n + metrics["empty_answers_left_out"] == 12 and len(sft_rows) == n and len(steps) == 2 * n
    for first, second, row in zip(steps[:n], steps[n:], sft_rows):  # round 2 revises round 1's revision
        assert (first["round"], second["round"]) == (1, 2) and first["prompt"] == second["prompt"] == row["prompt"]
        assert second["response"] == first["revision"] and row["response"] == second["revision"]
        for step in (first, second):
            rule = rules.get(step["principle"])
            assert step["critique"] == judge.critique(step["prompt"], step["response"], rule)
            assert step["revision"] == judge.revise(step["prompt"], step["response"], step["critique"], rule)
    gold_before = sum(sentiment_gold(s["prompt"], s["response"]) for s in steps[:n]) / n
    assert metrics["gold/before"] == pytest.approx(gold_before)
    assert metrics["gold/after"] == pytest.approx(sum(sentiment_gold(r["prompt"], r["response"]) for r in sft_rows) / n)
    assert metrics["gold/after"] > metrics["gold/before"]
    assert metrics["compliance/after/all"] >= metrics["compliance/before/all"]
    assert sum(metrics[f"principles/{name}"] for name in rules.names) == 2 * n

    sft = SFTData(path=str(revise_dir / "sft.jsonl"), val_fraction=0.25)
    sft.attach(tokenizer)
    sft.setup("fit")
    assert len(sft.train_set) + len(sft.val_set) == n and len(sft.val_set) == int(n * 0.25)

    feedback_dir = cli("cai-feedback", f"--policy={path}", *TASK, RULES, "--feedback.temperature=1.0",
                       "--num_prompts=40", "--sampling.max_new_tokens=12", "--run_dir", tmp_path / "feedback")
    metrics = json.loads((feedback_dir / "metrics.json").read_text())
    judged, prefs = read_jsonl(feedback_dir / "judgements.jsonl"), read_jsonl(feedback_dir / "preferences.jsonl")
    assert len(judged) == metrics["pairs"] and len(prefs) == metrics["preferences"] > 0
    assert metrics["pairs/judge_ties"] == sum(j["p_a"] == 0.5 for j in judged) == len(judged) - len(prefs)
    for j in judged:
        assert j["p_a"] == pytest.approx(RuleFeedback(temperature=1.0).compare(j["prompt"], j["a"], j["b"],
                                                                               rules.get(j["principle"])))
    assert all(r["soft_label"] > 0.5 for r in prefs)

    pairs = PreferenceData(path=str(feedback_dir / "preferences.jsonl"), val_fraction=0.0)
    pairs.attach(tokenizer)
    pairs.setup("fit")
    assert len(pairs.train_set) == len(prefs)
    batch = pairs.collate(pairs.train_set[:2])
    assert batch.input_ids.shape[0] == 2 * min(2, len(prefs))


def test_lm_judge_end_to_end_records_what_it_generates(tiny, cli, tmp_path):
    path, _ = tiny
    lm = ["--feedback=alignkit_plugins.constitutional.LMFeedback", f"--feedback.model={path}",
          "--feedback.option_labels=[a, b]", "--feedback.sampling.max_new_tokens=6"]
    revise_dir = cli("cai-revise", f"--policy={path}", *TASK, *lm, "--num_prompts=3",
                     "--sampling.max_new_tokens=8", "--run_dir", tmp_path / "revise")
    metrics = json.loads((revise_dir / "metrics.json").read_text())
    steps = read_jsonl(revise_dir / "revisions.jsonl")
    assert len(steps) == metrics["prompts"] > 0
    assert all(isinstance(s["critique"], str) and isinstance(s["revision"], str) for s in steps)
    assert any(s["critique"] for s in steps)  # untrained: not a real critique, but what the model wrote
    assert 0.0 < metrics["judge/p_revision_better"] < 1.0
    assert not any(k.startswith("compliance/") for k in metrics)  # an LM judge only compares

    feedback_dir = cli("cai-feedback", f"--policy={path}", *TASK, *lm, "--num_prompts=3",
                       "--sampling.max_new_tokens=8", "--run_dir", tmp_path / "feedback")
    judged = read_jsonl(feedback_dir / "judgements.jsonl")
    assert judged and all(0.0 < j["p_a"] < 1.0 for j in judged)


def test_compliance_command(tiny, cli, tmp_path, capsys):
    path, _ = tiny
    results = cli("cai-compliance", f"--policies={{one: {path}, two: {path}}}", *TASK, RULES, "--num_prompts=4",
                  "--sampling.max_new_tokens=8", "--run_dir", tmp_path / "compliance")
    assert list(results) == ["one", "two"] and results["one"] == results["two"]  # same seed, same samples
    assert set(results["one"]) == {"gold_reward", "words", "compliance/positive", "compliance/on_topic",
                                   "compliance/no_repetition", "compliance/concise", "compliance/all"}
    saved = json.loads((tmp_path / "compliance" / "metrics.json").read_text())
    assert saved["policies"] == results and saved["settings"]["num_prompts"] == 4
    assert capsys.readouterr().out.splitlines()[0].split() == [
        "policy", "gold", "positive", "on_topic", "no_repetition", "concise", "all"]
    with pytest.raises(ValueError, match="LMFeedback only compares"):
        cli("cai-compliance", f"--policies={{one: {path}}}", *TASK,
            "--feedback=alignkit_plugins.constitutional.LMFeedback", f"--feedback.model={path}",
            "--feedback.option_labels=[a, b]", "--num_prompts=2", "--sampling.max_new_tokens=4",
            "--run_dir", tmp_path / "compliance_lm")


# ------------------------------------------------------------------------------------------ recipe

def test_constitutional_ai_recipe(tmp_path, capsys):
    """Every stage reads only earlier stages, every fit recipe exists, the cai stages' arguments parse, and
    the SL-CAI stage trains on the revisions file instead of the task's demonstrations."""
    from alignkit.cli import main

    stages = yaml.safe_load((RECIPES / "constitutional_ai.yaml").read_text())["stages"]
    names = [s["name"] for s in stages]
    assert names == ["sft", "revise", "sl_cai", "feedback", "rm", "rl_cai", "rl_cai_dpo", "eval", "compliance"]
    outputs = {name: tmp_path / name for name in names}
    for i, stage in enumerate(stages):
        used = {m for a in stage.get("args", []) for m in re.findall(r"\$\{(\w+)\}", a)}
        assert used <= set(names[:i]), (stage["name"], used)
        args = [commands.substitute(a, outputs) for a in stage.get("args", [])]
        if stage.get("command", "fit") == "fit":
            assert (RECIPES / stage["recipe"]).is_file()
        elif stage["command"] in CAI_COMMANDS:
            parser = ArgumentParser()
            parser.add_function_arguments(CAI_COMMANDS[stage["command"]], as_group=False)
            parser.parse_args([*args, "--run_dir", str(tmp_path / stage["name"])])
        else:
            assert stage["command"] in commands.COMMANDS
    sl_cai = stages[names.index("sl_cai")]
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(RECIPES / sl_cai["recipe"]),
              *[commands.substitute(a, outputs) for a in sl_cai["args"]], "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    assert data["path"] == str(tmp_path / "revise" / "sft.jsonl") and data["task"] is None


def test_constitution_ships_inside_the_package():
    assert DEFAULT_CONSTITUTION == REPO / "plugins" / "constitutional" / "constitution.yaml"
    assert DEFAULT_CONSTITUTION.is_file()
