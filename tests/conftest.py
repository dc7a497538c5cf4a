"""Shared fixtures: command-line overrides that shrink the tiny model for speed, one SFT run shared by
the tests that need a trained model, a small preference file and the tiny tokenizer."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

# Never talk to wandb's servers or the hub, whatever a test selects.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

# Tiny models on a shared 2-core machine: one intra-op thread is ~10x faster than two that contend with
# other processes (thread oversubscription).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SFT_RECIPE = RECIPES / "sft.yaml"
RM_RECIPE = RECIPES / "reward_model.yaml"

#: The shape of the tiny policy in every end-to-end test (hidden 32, 2 layers).
TINY_MODEL = [
    "--model.policy.tiny.hidden_size=32",
    "--model.policy.tiny.num_layers=2",
    "--model.policy.tiny.num_heads=2",
    "--model.policy.tiny.intermediate_size=64",
]
#: Quiet, fast trainer settings; no wandb.
QUIET = ["--wandb=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.log_every_n_steps=1"]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, and with no global seed left by an earlier test's
    ``seed_everything`` (seeds left unset derive from it: ``alignkit.seeds``)."""
    import numpy as np

    os.environ.pop("PL_GLOBAL_SEED", None)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """CLI overrides for a fast recipe run (append ``--run_dir``): a small tiny model, few steps."""
    return [*TINY_MODEL, *QUIET, "--trainer.max_steps=4"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test inside its tmp_path, so no default ``runs/`` folder lands in the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(argv: list[str]) -> None:
    """``alignkit <argv>`` in-process."""
    from alignkit.cli import main

    main([str(a) for a in argv])


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory) -> Path:
    """The SFT recipe, run once on a 200-prompt slice of the sentiment task; its run directory."""
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run_cli([
        "fit", "--config", SFT_RECIPE, *TINY_MODEL, *QUIET,
        "--data.init_args.task.init_args.num_train_prompts=200",
        "--trainer.max_steps=24", "--run_dir", run_dir,
    ])
    return run_dir


def preference_rows(n: int = 48) -> list[dict]:
    """Explicit pairs over the sentiment task's vocabulary: positive reviews beat negative ones."""
    items = ["pizza", "burger", "pasta", "salad", "soup", "steak", "sushi", "taco"]
    good = ["great", "tasty", "fresh", "lovely"]
    bad = ["bland", "cold", "stale", "soggy"]
    rows = []
    for i in range(n):
        item = items[i % len(items)]
        rows.append({
            "prompt": f"review : the {item} at the diner on monday",
            "chosen": f"the {item} was {good[i % 4]} and {good[(i + 1) % 4]}",
            "rejected": f"the {item} was {bad[i % 4]} and {bad[(i + 1) % 4]}",
        })
    return rows


def make_data(cls, tokenizer, **kwargs):
    """A data module with its tokenizer attached and its examples built (no validation split by default)."""
    kwargs.setdefault("val_fraction", 0.0)
    data = cls(**kwargs)
    data.attach(tokenizer)
    data.setup()
    return data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def preferences_file(tmp_path) -> Path:
    """A small preference data set (explicit prompt/chosen/rejected rows)."""
    return write_jsonl(tmp_path / "preferences.jsonl", preference_rows())


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The tiny model's tokenizer (BPE trained on the sentiment corpus, with a chat template)."""
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))[1]


def word_count_reward():
    """A reward plugin for online tests: the number of words in each response."""
    from alignkit.plugin import Reward, RewardOutput

    class WordCount(Reward):
        def score(self, prompts, responses, rollout):
            return RewardOutput(self.reward_name, torch.tensor([float(len(r.split())) for r in responses]))

    return WordCount()
