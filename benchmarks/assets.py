"""What every framework reads: the saved policy and reward model, and synthetic data of the sentiment task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignkit_benchmarks.sizes import Size, Workload, tiny_config


def synthetic_preferences(num_pairs: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preference pairs on the sentiment task: two template reviews per train prompt (random slot words),
    labelled by the task's simulated annotator (Bradley–Terry on the gold reward, label noise)."""
    import random

    from alignkit.task import SimulatedAnnotator, preference_records
    from alignkit_plugins.tasks import sentiment

    task = sentiment.SentimentTask(seed=seed, num_train_prompts=num_pairs, num_eval_prompts=0)
    rng = random.Random(f"bench:{seed}")
    words = sentiment.POSITIVE_WORDS + sentiment.NEGATIVE_WORDS + sentiment.NEUTRAL_WORDS

    def review(prompt: str) -> str:
        aspect, other = rng.sample(sentiment.ASPECTS, 2)
        slots = {f"a{i}": rng.choice(words) for i in (1, 2, 3)}
        return rng.choice(sentiment.TEMPLATES).format(item=sentiment.review_item(prompt), aspect=aspect,
                                                      other=other, **slots)

    prompts = task.train_prompts()
    first = [review(p) for p in prompts]
    second = [review(p) for p in prompts]
    pairs = SimulatedAnnotator(seed=seed).label(task, prompts, first, second)
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in preference_records(pairs)]


def prepare_assets(root: Path, size: Size, workload: Workload, seed: int = 0) -> dict[str, str]:
    """Write what every framework reads: the policy (causal LM) and the reward model (sequence classifier,
    one scalar) built from the tiny model at ``size`` and saved with ``save_pretrained``, the preference pairs
    (``preferences.jsonl``), the prompts (``prompts.jsonl``) and the demonstrations (``demonstrations.jsonl``)
    of the sentiment task."""
    import torch
    from transformers import LlamaForSequenceClassification

    from alignkit.models import build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    policy, tokenizer = build_tiny_model(tiny_config(size, workload.max_length + workload.max_new_tokens, seed))
    if size.pad_vocab_to and size.pad_vocab_to > policy.config.vocab_size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy.resize_token_embeddings(size.pad_vocab_to, mean_resizing=False)
    paths = {"policy": str(root / "policy"), "rm": str(root / "rm"), "preferences": str(root / "preferences.jsonl"),
             "prompts": str(root / "prompts.jsonl"), "demonstrations": str(root / "demonstrations.jsonl")}
    policy.save_pretrained(paths["policy"])
    tokenizer.save_pretrained(paths["policy"])
    config = policy.config.to_dict()
    config.pop("id2label", None), config.pop("label2id", None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        rm = LlamaForSequenceClassification(policy.config.__class__(**{**config, "num_labels": 1}))
    rm.config.pad_token_id = tokenizer.pad_token_id
    rm.save_pretrained(paths["rm"])
    tokenizer.save_pretrained(paths["rm"])
    pairs = synthetic_preferences(workload.num_pairs, seed)
    _write_jsonl(Path(paths["preferences"]), pairs)
    _write_jsonl(Path(paths["prompts"]), [{"prompt": r["prompt"]} for r in pairs])
    _write_jsonl(Path(paths["demonstrations"]), [{"prompt": r["prompt"], "response": r["chosen"]} for r in pairs])
    return paths


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
