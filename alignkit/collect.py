"""``alignkit collect``: sample response pairs from a policy on a task's prompts and label them with the
task's simulated annotator, writing a preference data set (``preferences.jsonl``) that the reward-model
and DPO recipes read — the simulated stand-in for a round of human labelling."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from alignkit.io import atomic_write_json, write_jsonl
from alignkit.models.loading import ModelConfig, load_model
from alignkit.rollout import SamplingConfig, sample_texts
from alignkit.seeds import ANNOTATOR, derive_seed
from alignkit.task import PreferencePair, SimulatedAnnotator, Task, preference_records

PREFERENCES_FILE = "preferences.jsonl"


def sample_pairs(model, tokenizer, prompts: list[str], sampling: SamplingConfig, batch_size: int,
                 seed: int) -> tuple[list[str], list[str], list[str]]:
    """Two independent samples per prompt; pairs whose two responses are identical are left out (they
    carry no preference)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    first = [
        r for ro in sample_texts(model, tokenizer, prompts, sampling, batch_size, generator) for r in ro.responses
    ]
    second = [
        r for ro in sample_texts(model, tokenizer, prompts, sampling, batch_size, generator) for r in ro.responses
    ]
    kept = [(p, a, b) for p, a, b in zip(prompts, first, second) if a.strip() and b.strip() and a != b]
    return [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]


def label_summary(pairs: list[PreferencePair]) -> dict[str, float]:
    decided = [p for p in pairs if p.gold_chosen != p.gold_rejected]  # gold ties have no right answer
    agree = sum(p.gold_chosen > p.gold_rejected for p in decided) / max(len(decided), 1)
    gold = [g for p in pairs for g in (p.gold_chosen, p.gold_rejected)]
    return {
        "pairs": len(pairs),
        "pairs/gold_ties": len(pairs) - len(decided),
        "labels/agree_with_gold": agree,
        "labels/mean_gold": sum(gold) / max(len(gold), 1),
    }


def collect(policy: str, task: Task, annotator: SimulatedAnnotator = SimulatedAnnotator(),
            num_prompts: int = 1000, sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
            batch_size: int = 64, seed: int = 0, run_dir: str | None = None) -> Path:
    """Sample two responses per train prompt from ``policy`` and label each pair with the annotator.

    Args:
        policy: the policy's model directory (e.g. an SFT stage's ``model/``) or HF name.
        task: the task whose train prompts, gold reward and annotator semantics are used.
        annotator: the simulated labeller (Bradley–Terry on gold, temperature, label-flip probability; its
            seed, when not given, is ``derive_seed(seed, "annotator")``).
        num_prompts: how many train prompts to label (at most the task's number of train prompts).
        sampling: sampling settings for the two responses.
        batch_size: prompts per generation batch.
        seed: seed of the pair sampling, and the run's seed the annotator's derives from; both are recorded in
            metrics.json.
        run_dir: output folder (default: runs/collect/<timestamp>); gets preferences.jsonl and metrics.json.
    """
    from alignkit.run import METRICS_FILE, check_fresh, default_run_dir  # Lightning: not for ``collect --help``

    out = Path(run_dir) if run_dir else default_run_dir("collect")
    check_fresh(out)
    model, tokenizer = load_model(ModelConfig(name_or_path=policy), "causal_lm")
    prompts = task.train_prompts()[:num_prompts]
    prompts, first, second = sample_pairs(model, tokenizer, prompts, sampling, batch_size, seed)
    # a fresh stream every call: the labels depend on the arguments only, never on an earlier call's draws
    annotator = replace(annotator, seed=derive_seed(seed, ANNOTATOR) if annotator.seed is None else annotator.seed)
    pairs = annotator.label(task, prompts, first, second)
    write_jsonl(out / PREFERENCES_FILE, preference_records(pairs))
    summary = {**label_summary(pairs), "task": task.name, "policy": policy, "seed": seed,
               "annotator_seed": annotator.seed}
    atomic_write_json(out / METRICS_FILE, summary)
    print(f"[collect] {len(pairs)} labelled pairs -> {out / PREFERENCES_FILE} "
          f"(labels agree with gold on {summary['labels/agree_with_gold']:.1%})")
    return out
