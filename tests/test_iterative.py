"""Iterative RLHF (``alignkit_plugins.iterative``): round bookkeeping read from the folders, labellers
(simulated, AI judge, human file with pause/resume), and two rounds end to end on the tiny model — run as
rounds=1, then resumed with rounds=2 in the same run_dir."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import QUIET, REPO

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)
from alignkit.data.formats import DataError
from alignkit.rollout import SamplingConfig
from alignkit.run import RunExistsError
from alignkit.seeds import derive_seed
from alignkit.task import SimulatedAnnotator
from alignkit_plugins.iterative import (
    AnnotatorLabeller,
    FileLabeller,
    JudgeLabeller,
    LabelContext,
    LabelsPending,
    RoundState,
    iterate,
)
from alignkit_plugins.iterative import rounds as rounds_module
from alignkit_plugins.iterative.labellers import TO_LABEL_FILE
from alignkit_plugins.iterative.rounds import (
    Plan,
    check_settings,
    fit_step_args,
    kl_reference,
    label_records,
    policy_after,
    rm_start,
    round_metrics,
    round_prompts,
)
from alignkit_plugins.tasks import SentimentTask

TASK = SentimentTask(num_train_prompts=64, num_eval_prompts=8)
#: Few, small steps for every training stage of the end-to-end runs.
FIT_ARGS = [*QUIET, "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=8"]
PPO_ARGS = ["--trainer.max_steps=1", "--model.algorithm.init_args.update_epochs=1",
            "--model.algorithm.init_args.num_minibatches=1", "--model.algorithm.init_args.sampling.max_new_tokens=8",
            "--data.init_args.task.init_args.num_train_prompts=64"]
FAST = dict(prompts_per_round=12, eval_prompts=6, sampling=SamplingConfig(max_new_tokens=8), fit_args=FIT_ARGS,
            ppo_args=PPO_ARGS, rm_recipe=str(REPO / "recipes/reward_model.yaml"),
            ppo_recipe=str(REPO / "recipes/ppo_rlhf.yaml"), dpo_recipe=str(REPO / "recipes/dpo.yaml"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------ bookkeeping


def test_round_prompts_are_fresh_each_round_and_wrap_around():
    prompts = [f"p{i}" for i in range(10)]
    assert round_prompts(prompts, 1, 4) == ["p0", "p1", "p2", "p3"]
    assert round_prompts(prompts, 2, 4) == ["p4", "p5", "p6", "p7"]
    assert round_prompts(prompts, 3, 4) == ["p8", "p9", "p0", "p1"]
    with pytest.raises(ValueError, match=r"prompts_per_round must lie in \[1, 10\]"):
        round_prompts(prompts, 1, 11)


def test_round_state_is_read_from_the_folders(tmp_path):
    state = RoundState.read(tmp_path, 2, "rm_ppo")
    assert state.path == tmp_path / "round_2" and state.done == () and not state.finished
    assert state.pending == ("sample", "label", "rm", "ppo", "eval")
    round_2 = tmp_path / "round_2"
    (round_2 / "rm").mkdir(parents=True)
    (round_2 / "samples.jsonl").write_text("")
    (round_2 / "all_labels.jsonl").write_text("")
    (round_2 / "rm" / "checkpoints").mkdir()  # an interrupted rm attempt: no metrics.json, not finished
    state = RoundState.read(tmp_path, 2, "rm_ppo")
    assert state.done == ("sample", "label") and state.pending == ("rm", "ppo", "eval")
    assert RoundState.read(tmp_path, 2, "dpo").pending == ("dpo", "eval")
    (round_2 / "rm" / "metrics.json").write_text("{}")
    assert RoundState.read(tmp_path, 2, "rm_ppo").pending == ("ppo", "eval")
    (round_2 / "samples.jsonl").unlink()  # a later step finished while an earlier one is missing
    with pytest.raises(RunExistsError, match="step 'sample' is unfinished but later steps"):
        RoundState.read(tmp_path, 2, "rm_ppo")


def test_round_inputs_follow_rm_init_and_kl_anchor(tmp_path):
    assert policy_after(tmp_path, 0, "sft", "rm_ppo") == "sft"
    assert policy_after(tmp_path, 2, "sft", "rm_ppo") == str(tmp_path / "round_2/ppo/model")
    assert policy_after(tmp_path, 2, "sft", "dpo") == str(tmp_path / "round_2/dpo/model")
    assert rm_start(tmp_path, 1, "sft", "warm_start") == "sft"
    assert rm_start(tmp_path, 3, "sft", "warm_start") == str(tmp_path / "round_2/rm/model")
    assert rm_start(tmp_path, 3, "sft", "retrain") == "sft"
    assert kl_reference("sft", 1, "sft") is None  # round 1 starts from the SFT model: the default copy is it
    assert kl_reference("sft", 2, "sft") == "sft"
    assert kl_reference("sft", 2, "previous") is None


def make_plan(run_dir: Path, method: str = "rm_ppo", kl_anchor: str = "sft", dpo_data: str = "all") -> Plan:
    return Plan(run_dir, "/sft", TASK, AnnotatorLabeller(), method, "warm_start", kl_anchor, dpo_data, 8,
                {"rm": "rm.yaml", "ppo": "ppo.yaml", "dpo": "dpo.yaml"},
                {"rm": ["--rm_extra"], "ppo": ["--ppo_extra"], "dpo": []}, ["--shared"], SamplingConfig(), None,
                8, 0, "grp", False)


def test_fit_step_args(tmp_path):
    r2 = tmp_path / "round_2"
    # every fit step is seeded from the run's seed (0 here), by its own role, before the user's fit_args
    assert fit_step_args(make_plan(tmp_path), 2, "rm") == [
        "--config", "rm.yaml", f"--model.policy.name_or_path={tmp_path / 'round_1/rm/model'}",
        f"--data.init_args.path={r2 / 'all_labels.jsonl'}", f"--seed_everything={derive_seed(0, 'round_2.rm')}",
        "--experiment=grp", "--wandb=false", "--shared", "--rm_extra", "--run_dir", str(r2 / "rm")]
    assert fit_step_args(make_plan(tmp_path), 2, "ppo") == [
        "--config", "ppo.yaml", f"--model.policy.name_or_path={tmp_path / 'round_1/ppo/model'}",
        "--model.rewards=[{class_path: alignkit_plugins.rewards.RewardModelReward, init_args: "
        f"{{path: {r2 / 'rm/model'}}}}}]", "--model.reference.name_or_path=/sft",
        f"--seed_everything={derive_seed(0, 'round_2.ppo')}", "--experiment=grp",
        "--wandb=false", "--shared", "--ppo_extra", "--run_dir", str(r2 / "ppo")]
    dpo = fit_step_args(make_plan(tmp_path, "dpo", "previous", "round"), 2, "dpo")
    assert dpo[2:4] == [f"--model.policy.name_or_path={tmp_path / 'round_1/dpo/model'}",
                        f"--data.init_args.path={r2 / 'labels.jsonl'}"]
    assert not any(a.startswith("--model.reference") for a in dpo)  # previous policy = the default copy


def test_round_metrics_gap():
    evaluation = {"policies": {
        "sft": {"metrics": {"eval/gold_reward": 0.1, "eval/proxy_reward": -0.2, "eval/kl": 0.0}},
        "policy": {"metrics": {"eval/gold_reward": 0.3, "eval/proxy_reward": 0.9, "eval/kl": 2.5,
                               "eval/win_rate": 0.6}}}}
    labels = [{"prompt": "p", "chosen": "a", "rejected": "b", "gold_chosen": 1.0, "gold_rejected": 0.0,
               "p_chosen": None}, {"prompt": "p", "chosen": "b", "rejected": "a", "gold_chosen": 0.0,
                                   "gold_rejected": 1.0, "p_chosen": 0.3}]
    m = round_metrics(2, evaluation, labels, labels * 3, {"rm": 1.234})
    assert m["round"] == 2 and m["labels/pairs"] == 2 and m["labels/total"] == 6
    assert m["labels/agree_with_gold"] == 0.5
    assert m["eval/gold_reward"] == 0.3 and m["eval/kl"] == 2.5 and m["eval/sft_gold_reward"] == 0.1
    assert m["eval/proxy_gold_gap"] == pytest.approx((0.9 + 0.2) - (0.3 - 0.1))
    assert m["time"] == {"rm_s": 1.23}
    del evaluation["policies"]["policy"]["metrics"]["eval/proxy_reward"]
    assert "eval/proxy_gold_gap" not in round_metrics(1, evaluation, labels, labels, {})


def test_settings_are_recorded_and_changes_refused(tmp_path):
    settings = {k: 1 for k in rounds_module.RESUME_KEYS} | {"rounds": 1}
    first = check_settings(tmp_path, settings)
    assert first["wandb_id"].startswith("iterate-")
    assert check_settings(tmp_path, settings | {"rounds": 5})["wandb_id"] == first["wandb_id"]
    with pytest.raises(RunExistsError, match="method: 1 -> 'dpo'"):
        check_settings(tmp_path, settings | {"method": "dpo"})


# ------------------------------------------------------------------------------------------ labellers

PROMPTS = ["review : the pizza at the cafe on monday", "review : the soup at the pub on friday"]
GOOD = ["the pizza was great and fresh", "the soup was lovely and tasty"]
BAD = ["the pizza was bland", "it was cold and stale"]


def test_annotator_labeller_is_seeded_per_round(tmp_path):
    labeller = AnnotatorLabeller(SimulatedAnnotator(temperature=0.0, flip_prob=0.5, seed=3))
    context = LabelContext(TASK, 2, tmp_path)
    first = labeller.label(PROMPTS * 8, GOOD * 8, BAD * 8, context)
    labeller.label(PROMPTS, GOOD, BAD, LabelContext(TASK, 1, tmp_path))  # another round in between
    assert labeller.label(PROMPTS * 8, GOOD * 8, BAD * 8, context) == first  # same round: same labels
    flipped = [p.chosen in BAD for p in first]
    assert 0 < sum(flipped) < len(flipped)  # flip_prob 0.5 flips some, not all


class BiasedJudge:
    """Prefers positive words, plus a bias for whichever response comes first."""

    def __init__(self, bias: float):
        self.bias, self.calls = bias, []

    def compare(self, prompt: str, a: str, b: str, principle: str) -> float:
        self.calls.append(principle)
        score = lambda text: sum(w in text.split() for w in ("great", "fresh", "lovely", "tasty"))  # noqa: E731
        return 0.5 + 0.2 * (score(a) - score(b)) + self.bias


def test_judge_labeller_cancels_position_bias_and_drops_ties(tmp_path):
    context = LabelContext(TASK, 1, tmp_path)
    judge = BiasedJudge(bias=0.1)
    pairs = JudgeLabeller(judge, principle="be positive").label(PROMPTS + PROMPTS[:1], BAD + GOOD[:1],
                                                                GOOD + GOOD[:1], context)
    # both orders: the 0.1 first-position bias cancels; the identical pair is a tie and is left out
    assert [(p["chosen"], p["p_chosen"]) for p in pairs] == [(GOOD[0], pytest.approx(0.9)),
                                                              (GOOD[1], pytest.approx(0.9))]
    # the judge's probability is the reward model's soft target, and survives into the label rows
    assert [p["soft_label"] for p in pairs] == [pytest.approx(0.9)] * 2
    rows = label_records(pairs, TASK, 1, "JudgeLabeller")
    assert [r["soft_label"] for r in rows] == [pytest.approx(0.9)] * 2
    hard = JudgeLabeller(BiasedJudge(bias=0.0), soft_labels=False).label(PROMPTS, BAD, GOOD, context)
    assert all("soft_label" not in p for p in hard)
    assert all("soft_label" not in r for r in label_records(hard, TASK, 1, "JudgeLabeller"))
    assert judge.calls == ["be positive"] * 6
    one_order = JudgeLabeller(BiasedJudge(bias=0.1), both_orders=False).label(PROMPTS[:1], BAD[:1], GOOD[:1], context)
    assert one_order[0]["chosen"] == GOOD[0] and one_order[0]["p_chosen"] == pytest.approx(0.8)  # biased
    with pytest.raises(ValueError, match=r"returned 1.9, expected a probability"):
        JudgeLabeller(BiasedJudge(bias=1.0), both_orders=False).label(PROMPTS, GOOD, BAD, context)


def test_judge_labeller_from_the_command_line(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_function_arguments(iterate, as_group=False, skip={"sft", "task"})
    cfg = parser.parse_args(["--labeller=alignkit_plugins.iterative.JudgeLabeller",
                             f"--labeller.judge={BiasedJudge.__module__}.BiasedJudge", "--labeller.judge.bias=0.1",
                             "--labeller.principle=be positive"])
    labeller = parser.instantiate(cfg).labeller
    assert isinstance(labeller, JudgeLabeller) and labeller.judge.bias == 0.1 and labeller.principle == "be positive"
    assert labeller.label(PROMPTS[:1], BAD[:1], GOOD[:1], LabelContext(TASK, 1, tmp_path))[0]["chosen"] == GOOD[0]


def test_file_labeller_pauses_then_validates_every_line(tmp_path):
    labeller, context = FileLabeller(), LabelContext(TASK, 1, tmp_path)
    with pytest.raises(LabelsPending, match=r"fill the \"choice\" field .*to_label.jsonl.* run the same command"):
        labeller.label(PROMPTS, GOOD, BAD, context)
    path = tmp_path / TO_LABEL_FILE
    rows = read_jsonl(path)
    assert rows == [{"prompt": p, "a": a, "b": b, "choice": ""} for p, a, b in zip(PROMPTS, GOOD, BAD)]
    with pytest.raises(LabelsPending):  # run again before anything is filled: still waiting
        labeller.label(PROMPTS, GOOD, BAD, context)
    write_rows(path, [rows[0] | {"choice": "a"}, rows[1] | {"choice": "c"}])
    with pytest.raises(DataError, match=r"to_label.jsonl line 2: choice must be \"a\" or \"b\", got 'c'"):
        labeller.label(PROMPTS, GOOD, BAD, context)
    write_rows(path, [rows[0] | {"choice": "a"}, rows[1] | {"a": "edited", "choice": "b"}])
    with pytest.raises(DataError, match=r"line 2: 'a' differs from the sample"):
        labeller.label(PROMPTS, GOOD, BAD, context)
    path.write_text(json.dumps(rows[0] | {"choice": "a"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        labeller.label(PROMPTS, GOOD, BAD, context)
    write_rows(path, [rows[0], rows[1] | {"choice": "b"}])
    with pytest.raises(DataError, match=r"choice is empty on 1 line\(s\): 1;"):
        labeller.label(PROMPTS, GOOD, BAD, context)
    write_rows(path, [rows[0] | {"choice": "a"}, rows[1] | {"choice": " B "}])
    assert labeller.label(PROMPTS, GOOD, BAD, context) == [
        {"prompt": PROMPTS[0], "chosen": GOOD[0], "rejected": BAD[0]},
        {"prompt": PROMPTS[1], "chosen": BAD[1], "rejected": GOOD[1]}]


def test_recipe_parses_into_iterate_options():
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser()  # as alignkit.commands.run builds it
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(iterate, as_group=False)
    cfg = parser.parse_args(["--config", str(REPO / "recipes/iterative_rlhf.yaml"), "--sft=runs/qs1/sft/model"])
    init = parser.instantiate(cfg)
    assert isinstance(init.labeller, AnnotatorLabeller) and init.labeller.annotator.temperature == 0.5
    assert isinstance(init.task, SentimentTask) and init.task.num_train_prompts == 2000
    assert (init.rounds, init.prompts_per_round, init.rm_init, init.kl_anchor, init.method) == (
        3, 500, "warm_start", "sft", "rm_ppo")
    for recipe in (init.rm_recipe, init.ppo_recipe, init.dpo_recipe):
        assert (REPO / recipe).is_file()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory) -> str:
    """An untrained tiny model saved as the 'SFT' model (only the plumbing is under test)."""
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model

    path = tmp_path_factory.mktemp("iter_sft") / "model"
    model, tokenizer = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def two_rounds(tiny_sft, tmp_path_factory):
    """rounds=1, then the same command with rounds=2 (a run stopped after round 1, resumed); the fit calls
    of each invocation and round 1's files as they were before the resume."""
    run_dir = tmp_path_factory.mktemp("iter") / "run"
    calls: list[list[list[str]]] = []
    real_fit = rounds_module.fit

    def spy(args):
        calls[-1].append(args)
        return real_fit(args)

    options = dict(sft=tiny_sft, task=TASK, labeller=AnnotatorLabeller(), rm_init="warm_start", kl_anchor="sft",
                   run_dir=str(run_dir), wandb=True, **FAST)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rounds_module, "fit", spy)
        calls.append([])
        iterate(rounds=1, **options)
        before = {p: p.read_bytes() for p in (run_dir / "round_1").rglob("*.json*") if p.is_file()}
        import wandb

        # a run left open in the process (as Lightning's WandbLogger leaves a fit's run) must not swallow
        # the rounds' metrics: iterate finishes it before logging to its own run
        wandb.init(project="alignkit", dir=str(run_dir.parent), mode="offline", id="left-open")
        calls.append([])
        iterate(rounds=2, **options)
        assert wandb.run is None
    return run_dir, calls, before


def test_resume_does_not_redo_round_1(two_rounds):
    run_dir, calls, before = two_rounds
    run_dirs = [[args[args.index("--run_dir") + 1] for args in call] for call in calls]
    assert run_dirs == [[str(run_dir / "round_1/rm"), str(run_dir / "round_1/ppo")],
                        [str(run_dir / "round_2/rm"), str(run_dir / "round_2/ppo")]]
    assert before and all(path.read_bytes() == content for path, content in before.items())
    assert [RoundState.read(run_dir, k, "rm_ppo").finished for k in (1, 2, 3)] == [True, True, False]


def test_labels_accumulate_across_rounds(two_rounds):
    run_dir = two_rounds[0]
    round_1, round_2 = (read_jsonl(run_dir / f"round_{k}/labels.jsonl") for k in (1, 2))
    assert round_1 and round_2 and {r["round"] for r in round_1} == {1} and {r["round"] for r in round_2} == {2}
    assert read_jsonl(run_dir / "round_1/all_labels.jsonl") == round_1
    assert read_jsonl(run_dir / "round_2/all_labels.jsonl") == round_1 + round_2
    samples = read_jsonl(run_dir / "round_2/samples.jsonl")
    assert [r["prompt"] for r in round_2] == [s["prompt"] for s in samples]
    assert {s["prompt"] for s in samples} <= set(TASK.train_prompts()[12:24])  # round 2's fresh prompts
    for r in round_2:
        assert r["gold_chosen"] == TASK.gold_reward(r["prompt"], r["chosen"])


def test_round_2_warm_starts_the_rm_and_anchors_ppo_to_sft(two_rounds, tiny_sft):
    import yaml

    run_dir = two_rounds[0]
    rm = yaml.safe_load((run_dir / "round_2/rm/config.yaml").read_text())
    assert rm["model"]["policy"]["name_or_path"] == str(run_dir / "round_1/rm/model")
    assert rm["data"]["init_args"]["path"] == str(run_dir / "round_2/all_labels.jsonl")
    ppo = yaml.safe_load((run_dir / "round_2/ppo/config.yaml").read_text())
    assert ppo["model"]["policy"]["name_or_path"] == str(run_dir / "round_1/ppo/model")
    assert ppo["model"]["reference"]["name_or_path"] == tiny_sft
    assert ppo["model"]["rewards"][0]["init_args"]["path"] == str(run_dir / "round_2/rm/model")


def test_per_round_metrics_and_curves(two_rounds):
    run_dir = two_rounds[0]
    summaries = [json.loads((run_dir / f"round_{k}/metrics.json").read_text()) for k in (1, 2)]
    for k, m in enumerate(summaries, 1):
        evaluation = json.loads((run_dir / f"round_{k}/eval/metrics.json").read_text())
        policy = evaluation["policies"]["policy"]
        assert m["round"] == k and m["eval/gold_reward"] == policy["metrics"]["eval/gold_reward"]
        assert policy["path"] == str(run_dir / f"round_{k}/ppo/model")
        assert m["eval/proxy_gold_gap"] == pytest.approx(
            (m["eval/proxy_reward"] - m["eval/sft_proxy_reward"]) - (m["eval/gold_reward"] - m["eval/sft_gold_reward"]))
        assert evaluation["settings"]["reference"] == "sft" and evaluation["settings"]["num_prompts"] == 6
    assert summaries[1]["labels/total"] == summaries[0]["labels/pairs"] + summaries[1]["labels/pairs"]
    run_summary = json.loads((run_dir / "metrics.json").read_text())
    assert run_summary["rounds"] == 2 and run_summary["per_round"] == summaries
    assert run_summary["final"]["eval/gold_reward"] == summaries[1]["eval/gold_reward"]
    with (run_dir / "curves/metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert [float(r["eval/gold_reward"]) for r in rows] == [m["eval/gold_reward"] for m in summaries]
    gaps = [m["eval/proxy_gold_gap"] for m in summaries]
    assert [float(r["eval/proxy_gold_gap"]) for r in rows] == pytest.approx(gaps)
    wandb_id = json.loads((run_dir / "iterate.json").read_text())["wandb_id"]
    offline = sorted((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(offline) == 2  # one per invocation, the same run id: synced in order they form one run


def test_file_labeller_run_pauses_and_resumes_with_dpo(tiny_sft, tmp_path):
    options = dict(sft=tiny_sft, task=TASK, labeller=FileLabeller(), rounds=1, method="dpo",
                   run_dir=str(tmp_path / "run"), wandb=False, **FAST)
    round_1 = tmp_path / "run/round_1"
    with pytest.raises(LabelsPending, match="round_1/to_label.jsonl"):
        iterate(**options)
    assert RoundState.read(tmp_path / "run", 1, "dpo").pending == ("label", "dpo", "eval")
    assert not (tmp_path / "run/metrics.json").exists()  # paused: as a pipeline stage it is not finished
    rows = read_jsonl(round_1 / TO_LABEL_FILE)
    assert rows and all(r["choice"] == "" for r in rows)
    choices = ["a" if TASK.gold_reward(r["prompt"], r["a"]) >= TASK.gold_reward(r["prompt"], r["b"]) else "b"
               for r in rows]
    write_rows(round_1 / TO_LABEL_FILE, [r | {"choice": c} for r, c in zip(rows, choices)])
    iterate(**options)
    labels = read_jsonl(round_1 / "labels.jsonl")
    assert [lab["chosen"] for lab in labels] == [r[c] for r, c in zip(rows, choices)]
    assert all(lab["p_chosen"] is None and lab["labeller"] == "FileLabeller" for lab in labels)
    metrics = json.loads((round_1 / "metrics.json").read_text())
    decided = any(lab["gold_chosen"] != lab["gold_rejected"] for lab in labels)
    assert metrics["labels/agree_with_gold"] == (1.0 if decided else 0.0)
    assert "eval/proxy_gold_gap" not in metrics
    assert (round_1 / "dpo/model/config.json").is_file() and not (round_1 / "rm").exists()
