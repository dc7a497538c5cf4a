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


#: Tests (or every case of a parametrized test) marked ``slow``: each takes, with its module fixture, more than ~10 s
#: on the shared 2-core machine (``--durations``); with tests/test_distributed.py (marked ``distributed``) they are left
#: out of the unit tier, ``python -m pytest -m "not slow and not distributed"``. CI runs everything. Listed here rather
#: than decorated in place so that files other people are editing are not touched; a decorator works as well.
SLOW = {
    "tests/test_study.py::test_smoke_study_local",  # module fixture smoke_study (a whole study)
    "tests/test_study.py::test_smoke_study_resumes_on_ray",
    "tests/test_resume.py::test_resumed_run_logs_to_the_same_wandb_run",
    "tests/test_resume.py::test_killed_run_resumes_to_the_same_result",
    "tests/test_run_directory.py::test_sigterm_checkpoints_at_the_step_exits_75_and_resumes_exactly",
    "tests/test_run_directory.py::test_crashed_ppo_run_keeps_metrics_rows_in_logger_steps_and_never_loses_them",
    "tests/test_run_directory.py::test_checkpoints_are_verified_and_a_damaged_one_falls_back_or_stops_in_one_line",
    "tests/test_run_directory.py::test_resume_refuses_a_changed_configuration_unless_told_and_then_applies_it",
    "tests/test_seeds.py::test_one_seed_drives_every_stage_of_a_pipeline",
    "tests/test_iterative.py::test_resume_does_not_redo_round_1",  # module fixture two_rounds
    "tests/test_iterative.py::test_labels_accumulate_across_rounds",
    "tests/test_iterative.py::test_round_2_warm_starts_the_rm_and_anchors_ppo_to_sft",
    "tests/test_iterative.py::test_per_round_metrics_and_curves",
    # module fixture ppo_runs
    "tests/test_gold_eval.py::test_ppo_trajectory_is_logged_at_the_start_every_multiple_and_the_end",
    "tests/test_gold_eval.py::test_training_is_bit_identical_with_and_without_gold_eval",
    "tests/test_gold_eval.py::test_resumed_run_trims_the_trajectory_and_continues_it",
    "tests/test_data_formats.py::test_json_files_do_not_import_datasets",
    "tests/test_cpu_memory.py::test_freed_memory_is_reused_without_page_faults",
    "tests/test_cpu_memory.py::test_users_malloc_variables_win",
    "tests/test_docs.py::test_reference_is_up_to_date",
    "tests/test_evaluation.py::test_evaluate_through_the_cli",
    "tests/test_ppo_plugin.py::test_ppo_run_changes_weights_and_raises_the_proxy_reward",
    "tests/test_recipes.py::test_reverse_rlvr_recipe_runs_end_to_end",
    "tests/test_bench.py::test_smoke_bench_reports_every_stage",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("[", 1)[0] in SLOW:
            item.add_marker(pytest.mark.slow)


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
