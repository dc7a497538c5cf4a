"""Constitutional AI as pipeline commands (Bai et al. 2022), each a typed function whose parameters are its
options:

- :func:`critique_revise` (SL-CAI data, ``cai-revise``): the policy answers train prompts; for a principle
  drawn from the constitution the feedback model critiques the answer and revises it, for one or more
  rounds. Writes ``revisions.jsonl`` (every round) and ``sft.jsonl`` (prompt / final revision rows for
  ``alignkit.data.SFTData``).
- :func:`ai_feedback` (RL-CAI labels, ``cai-feedback``): the policy samples two responses per prompt; the
  feedback model gives P(a better) under a drawn principle. Writes ``judgements.jsonl`` (every soft label)
  and ``preferences.jsonl`` (prompt / chosen / rejected rows for ``alignkit.data.PreferenceData``: the
  chosen response is the one with P > 0.5, ties are left out, the probability is written as ``soft_label``,
  which the reward-model stage trains on).
- :func:`compliance` (``cai-compliance``): the fraction of each policy's responses to the evaluation
  prompts that follow each principle, by the judge, next to the task's gold reward.

Every command writes ``metrics.json`` last, so a pipeline skips a finished stage.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from alignkit import (
    METRICS_FILE,
    PREFERENCES_FILE,
    DataError,
    ModelConfig,
    SamplingConfig,
    Task,
    atomic_write_json,
    check_fresh,
    default_run_dir,
    fixed_seed,
    load_model,
    sample_pairs,
    sample_texts,
    write_jsonl,
)
from alignkit_plugins.constitutional.constitution import Constitution, load_constitution
from alignkit_plugins.constitutional.feedback import Feedback

REVISIONS_FILE = "revisions.jsonl"
SFT_FILE = "sft.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"


@dataclass(frozen=True)
class RevisionStep:
    """One critique-and-revision round of one prompt (a row of ``revisions.jsonl``)."""

    prompt: str
    round: int
    """1 for the policy's own response, 2 for the revision of the first revision, and so on."""
    principle: str
    response: str
    """The text critiqued in this round."""
    critique: str
    revision: str
    """The feedback model's revision, recorded as generated (possibly empty)."""


@dataclass(frozen=True)
class Judgement:
    """One AI comparison (a row of ``judgements.jsonl``)."""

    prompt: str
    a: str
    b: str
    principle: str
    p_a: float
    """The judge's P(a follows the principle better than b)."""
    gold_a: float
    gold_b: float


# ------------------------------------------------------------------------------------------ pure helpers


def mean(values: list[float]) -> float:
    """Arithmetic mean; 0.0 for no values (a metric over nothing)."""
    return sum(values) / len(values) if values else 0.0


def preference_rows(judgements: list[Judgement]) -> list[dict]:
    """Hard preference rows from soft judgements: the chosen response is the one the judge gives more
    than 0.5; exact ties (0.5) carry no preference and are left out. Each row keeps the soft label as
    ``soft_label`` (the judge's probability for the chosen side, >= 0.5; the reward model trains on it),
    the principle and the gold rewards."""
    rows = []
    for j in judgements:
        if j.p_a == 0.5:
            continue
        a_wins = j.p_a > 0.5
        rows.append({
            "prompt": j.prompt, "chosen": j.a if a_wins else j.b, "rejected": j.b if a_wins else j.a,
            "soft_label": j.p_a if a_wins else 1.0 - j.p_a,
            "principle": j.principle,
            "gold_chosen": j.gold_a if a_wins else j.gold_b, "gold_rejected": j.gold_b if a_wins else j.gold_a,
        })
    return rows


def gold_agreement(rows: list[dict]) -> tuple[float, int]:
    """(fraction of preference rows whose chosen response has the higher gold reward, among rows whose
    gold rewards differ; number of rows with equal gold)."""
    decided = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in decided)
    return (agree / len(decided) if decided else 0.0), len(rows) - len(decided)


def compliance_rates(feedback: Feedback, constitution: Constitution, prompts: list[str],
                     responses: list[str]) -> dict[str, float]:
    """Fraction of responses that follow each principle by the judge (``compliance/<name>``) and every
    principle at once (``compliance/all``). Raises ValueError for a judge that only compares."""
    verdicts = {p.name: [feedback.complies(q, r, p) for q, r in zip(prompts, responses, strict=True)]
                for p in constitution.principles}
    if any(v is None for values in verdicts.values() for v in values):
        raise ValueError(f"{type(feedback).__name__} only compares responses; compliance needs a judge that "
                         f"implements complies() (e.g. RuleFeedback)")
    rates = {f"compliance/{name}": mean([float(v) for v in values]) for name, values in verdicts.items()}
    rates["compliance/all"] = mean([float(all(v)) for v in zip(*verdicts.values())]) if responses else 0.0
    return rates


def principle_counts(names: list[str], constitution: Constitution) -> dict[str, int]:
    """How often each principle of the constitution was drawn (``principles/<name>``)."""
    return {f"principles/{n}": names.count(n) for n in constitution.names}


# ------------------------------------------------------------------------------------------ sampling


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_policy(policy: str):
    model, tokenizer = load_model(ModelConfig(name_or_path=policy), "causal_lm")
    return model.to(_device()).eval(), tokenizer


def _task_sampling(sampling: SamplingConfig, task: Task) -> SamplingConfig:
    """``sampling`` with the task's stop string added (if it has one)."""
    if task.stop and task.stop not in sampling.stop_strings:
        return replace(sampling, stop_strings=[*sampling.stop_strings, task.stop])
    return sampling


def sample_responses(model, tokenizer, prompts: list[str], sampling: SamplingConfig, batch_size: int,
                     seed: int) -> list[str]:
    """One response per prompt, from a generator seeded with ``seed`` on the model's device (the same
    draws as ``alignkit eval`` with the same settings)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return [r for ro in sample_texts(model, tokenizer, prompts, sampling, batch_size, generator) for r in ro.responses]


def _train_prompts(task: Task, num_prompts: int) -> list[str]:
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    return task.train_prompts()[:num_prompts]


# ------------------------------------------------------------------------------------------ SL-CAI


def critique_revise(policy: str, task: Task, feedback: Feedback, constitution: str | None = None,
                    num_prompts: int = 2000, rounds: int = 1,
                    sampling: SamplingConfig = SamplingConfig(max_new_tokens=24), batch_size: int = 64,
                    seed: int = 0, run_dir: str | None = None) -> Path:
    """SL-CAI data: the policy answers train prompts, the feedback model critiques and revises each answer
    under a principle drawn at random (a new one every round), and the final revisions become an SFT set.

    Writes ``revisions.jsonl`` (prompt, round, principle, response, critique, revision), ``sft.jsonl``
    (prompt, response = final revision; an empty revision keeps the text it was meant to revise) and
    ``metrics.json``: gold reward before / after, the judge's compliance rates before / after (when it can
    judge single responses), the judge's mean P(revision better than the text it revises).

    Args:
        policy: model directory (e.g. an SFT stage's ``model/``) or HF name of the policy that answers.
        task: the task whose train prompts and gold reward are used.
        feedback: the critic and reviser (e.g. ``alignkit_plugins.constitutional.RuleFeedback`` or
            ``LMFeedback`` with ``--feedback.model=<dir or name>``).
        constitution: YAML file of principles; null (the default): the shipped ``constitution.yaml``.
        num_prompts: how many train prompts to answer (at most the task's number of train prompts);
            prompts whose answer is empty are left out.
        rounds: critique-and-revision rounds per answer.
        sampling: sampling settings of the policy's answers.
        batch_size: prompts per generation batch.
        seed: seed of the sampling and of the principle draws; an LMFeedback's seed left unset derives from it.
        run_dir: output folder (default: runs/cai-revise/<timestamp>).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out = Path(run_dir) if run_dir else default_run_dir("cai-revise")
    check_fresh(out)
    feedback.use_run_seed(seed)
    feedback.use_task(task)
    rules = load_constitution(constitution)
    prompts = _train_prompts(task, num_prompts)
    model, tokenizer = _load_policy(policy)
    answers = sample_responses(model, tokenizer, prompts, _task_sampling(sampling, task), batch_size, seed)
    del model
    kept = [(p, a) for p, a in zip(prompts, answers) if a.strip()]
    prompts, initial = [k[0] for k in kept], [k[1] for k in kept]
    if not prompts:
        raise DataError(f"policy {policy} gave an empty answer to every one of the {len(answers)} prompts")

    rng = random.Random(seed)
    current, steps, p_better = list(initial), [], []
    for round_ in range(1, rounds + 1):
        principles = [rules.sample(rng) for _ in prompts]
        critiques = feedback.critiques(prompts, current, principles)
        revised = feedback.revisions(prompts, current, critiques, principles)
        steps += [RevisionStep(p, round_, pr.name, r, c, v)
                  for p, pr, r, c, v in zip(prompts, principles, current, critiques, revised)]
        usable = [i for i, v in enumerate(revised) if v.strip()]
        p_better += feedback.comparisons([prompts[i] for i in usable], [revised[i] for i in usable],
                                         [current[i] for i in usable], [principles[i] for i in usable])
        current = [v if v.strip() else r for r, v in zip(current, revised)]

    write_jsonl(out / REVISIONS_FILE, [asdict(s) for s in steps])
    write_jsonl(out / SFT_FILE, [{"prompt": p, "response": r} for p, r in zip(prompts, current)])
    summary = {
        "task": task.name, "policy": policy, "feedback": type(feedback).__name__, "constitution": rules.source,
        "prompts": len(prompts), "rounds": rounds, "empty_answers_left_out": len(answers) - len(prompts),
        "gold/before": mean(task.gold_rewards(prompts, initial)),
        "gold/after": mean(task.gold_rewards(prompts, current)),
        "revisions/changed": mean([float(a != b) for a, b in zip(initial, current)]),
        "revisions/empty": sum(not s.revision.strip() for s in steps),
        "judge/p_revision_better": mean(p_better),
        **principle_counts([s.principle for s in steps], rules),
    }
    if feedback.complies(prompts[0], initial[0], rules.principles[0]) is not None:
        before = compliance_rates(feedback, rules, prompts, initial)
        after = compliance_rates(feedback, rules, prompts, current)
        summary.update({k.replace("compliance/", "compliance/before/"): v for k, v in before.items()})
        summary.update({k.replace("compliance/", "compliance/after/"): v for k, v in after.items()})
    atomic_write_json(out / METRICS_FILE, summary)
    print(f"[cai-revise] {len(prompts)} answers, {rounds} round(s) -> {out / SFT_FILE} "
          f"(gold {summary['gold/before']:.3f} -> {summary['gold/after']:.3f})")
    return out


# ------------------------------------------------------------------------------------------ RL-CAI


def ai_feedback(policy: str, task: Task, feedback: Feedback, constitution: str | None = None,
                num_prompts: int = 2000, sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
                batch_size: int = 64, seed: int = 0, run_dir: str | None = None) -> Path:
    """RL-CAI labels: the policy samples two responses per train prompt (pairs with an empty or two
    identical responses are left out) and the feedback model judges, under a principle drawn at random
    per pair, the probability that the first is better.

    Writes ``judgements.jsonl`` (prompt, a, b, principle, p_a, gold_a, gold_b), ``preferences.jsonl``
    (prompt, chosen, rejected, soft_label, principle, gold_chosen, gold_rejected; chosen = the response
    with P > 0.5, ties left out) and ``metrics.json`` (label counts, agreement of the AI labels with the
    gold reward, the judge's compliance rates of the sampled responses).

    Args:
        policy: model directory (e.g. the SL-CAI stage's ``model/``) or HF name of the policy that samples.
        task: the task whose train prompts and gold reward are used.
        feedback: the judge (e.g. ``alignkit_plugins.constitutional.RuleFeedback`` or ``LMFeedback``).
        constitution: YAML file of principles; null (the default): the shipped ``constitution.yaml``.
        num_prompts: how many train prompts to sample pairs for.
        sampling: sampling settings of the two responses.
        batch_size: prompts per generation batch.
        seed: seed of the sampling and of the principle draws; an LMFeedback's seed left unset derives from it.
        run_dir: output folder (default: runs/cai-feedback/<timestamp>).
    """
    out = Path(run_dir) if run_dir else default_run_dir("cai-feedback")
    check_fresh(out)
    feedback.use_run_seed(seed)
    feedback.use_task(task)
    rules = load_constitution(constitution)
    prompts = _train_prompts(task, num_prompts)
    model, tokenizer = _load_policy(policy)
    prompts, first, second = sample_pairs(model, tokenizer, prompts, _task_sampling(sampling, task), batch_size, seed)
    del model
    if not prompts:
        raise DataError(f"policy {policy} gave no pair of two different non-empty responses")

    rng = random.Random(seed)
    principles = [rules.sample(rng) for _ in prompts]
    p_a = feedback.comparisons(prompts, first, second, principles)
    gold_a, gold_b = task.gold_rewards(prompts, first), task.gold_rewards(prompts, second)
    judgements = [Judgement(*row) for row in zip(prompts, first, second, [p.name for p in principles], p_a,
                                                 gold_a, gold_b)]
    rows = preference_rows(judgements)
    if not rows:
        raise DataError(f"the judge tied all {len(judgements)} pairs (P = 0.5): no preference to write")
    write_jsonl(out / JUDGEMENTS_FILE, [asdict(j) for j in judgements])
    write_jsonl(out / PREFERENCES_FILE, rows)
    agree, gold_ties = gold_agreement(rows)
    summary = {
        "task": task.name, "policy": policy, "feedback": type(feedback).__name__, "constitution": rules.source,
        "pairs": len(judgements), "pairs/judge_ties": len(judgements) - len(rows), "preferences": len(rows),
        "labels/mean_soft_label": mean([r["soft_label"] for r in rows]), "labels/agree_with_gold": agree,
        "labels/gold_ties": gold_ties, "gold/mean": mean(gold_a + gold_b),
        **principle_counts([j.principle for j in judgements], rules),
    }
    if feedback.complies(prompts[0], first[0], rules.principles[0]) is not None:
        summary.update(compliance_rates(feedback, rules, prompts + prompts, first + second))
    atomic_write_json(out / METRICS_FILE, summary)
    print(f"[cai-feedback] {len(rows)} AI-labelled pairs ({summary['pairs/judge_ties']} ties left out) -> "
          f"{out / PREFERENCES_FILE} (labels agree with gold on {agree:.1%})")
    return out


# ------------------------------------------------------------------------------------------ compliance


def compliance_table(results: dict[str, dict[str, float]], names: list[str]) -> str:
    """A plain-text table: one row per policy, gold reward then one compliance column per principle."""
    columns = ["gold", *names, "all"]
    width = max(len("policy"), *(len(n) for n in results))
    cells = [max(len(c), 6) for c in columns]
    lines = [f"{'policy':<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(columns, cells))]
    for name, row in results.items():
        values = [f"{row['gold_reward']:.3f}", *(f"{row[f'compliance/{n}']:.1%}" for n in [*names, "all"])]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(values, cells)))
    return "\n".join(lines)


@fixed_seed  # measured on the evaluation prompts with eval's draws: a yardstick, like `alignkit eval`
def compliance(policies: dict[str, str], task: Task, feedback: Feedback, constitution: str | None = None,
               num_prompts: int | None = None, sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
               batch_size: int = 64, seed: int = 0, run_dir: str | None = None) -> dict[str, dict[str, float]]:
    """Principle compliance by the judge: every policy samples one response per evaluation prompt (the same
    seeded draws as ``alignkit eval`` with the same settings) and is reported on the fraction of responses
    that follow each principle, and all of them, with the task's mean gold reward. Writes ``metrics.json``
    and prints a table; returns the rates by policy name.

    Args:
        policies: name -> model directory or HF name, reported in this order.
        task: the task whose evaluation prompts and gold reward are used.
        feedback: a judge that rates single responses (``complies``), e.g. RuleFeedback.
        constitution: YAML file of principles; null (the default): the shipped ``constitution.yaml``.
        num_prompts: use the first this many evaluation prompts (None: all).
        sampling: sampling settings shared by all policies.
        batch_size: prompts per generation batch.
        seed: seed of the sampling, the same for every policy.
        run_dir: output folder (default: runs/cai-compliance/<timestamp>).
    """
    if not policies:
        raise ValueError("policies is empty: give at least one name -> model directory / HF name")
    out = Path(run_dir) if run_dir else default_run_dir("cai-compliance")
    check_fresh(out)
    feedback.use_task(task)
    rules = load_constitution(constitution)
    prompts = task.eval_prompts()[:num_prompts] if num_prompts is not None else task.eval_prompts()
    if not prompts:
        raise ValueError(f"task {task.name!r} has no evaluation prompts")
    sampling = _task_sampling(sampling, task)
    results = {}
    for name, path in policies.items():
        model, tokenizer = _load_policy(path)
        responses = sample_responses(model, tokenizer, prompts, sampling, batch_size, seed)
        del model
        results[name] = {"gold_reward": mean(task.gold_rewards(prompts, responses)),
                         "words": mean([float(len(r.split())) for r in responses]),
                         **compliance_rates(feedback, rules, prompts, responses)}
    atomic_write_json(out / METRICS_FILE, {
        "settings": {"task": task.name, "feedback": type(feedback).__name__, "constitution": rules.source,
                     "num_prompts": len(prompts), "sampling": asdict(sampling), "seed": seed,
                     "policies": dict(policies)},
        "policies": results,
    })
    print(compliance_table(results, rules.names))
    print(f"[cai-compliance] {len(results)} policies on {len(prompts)} {task.name} prompts -> {out / METRICS_FILE}")
    return results
