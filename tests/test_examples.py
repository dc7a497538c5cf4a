"""The example plugin packages under ``docs/examples/`` (alignkit-rloo, alignkit-simpo), installed for real
with ``pip install --no-deps -e`` exactly as a user installs an outside plugin: ``alignkit plugins`` lists
them with their hooks, each recipe runs end to end on the tiny model, and the packages' own tests pass.
These tests fail when a change to the plugin API breaks an outside package.

The install is skipped when the installed distribution already points at the example's folder with the
version and entry points its ``pyproject.toml`` declares, so only the first run pays for pip.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from urllib.parse import unquote, urlparse

import lightning as L
import pytest
import tomllib
import torch
from conftest import QUIET, REPO, TINY_MODEL, preference_rows, run_cli, write_jsonl

import alignkit.cli  # noqa: F401  (imported before any test captures output: lightning's log handler binds it)
from alignkit.manager import PluginError, discover, implemented_hooks
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.plugin import Reward, RewardOutput, hookimpl
from alignkit.rollout import SamplingConfig
from alignkit.types import PromptBatch, Rollout

EXAMPLES = REPO / "docs" / "examples"
PACKAGES = {"alignkit-rloo": "alignkit_rloo", "alignkit-simpo": "alignkit_simpo"}  # distribution -> import name
TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))


def declared(folder: Path) -> tuple[str, dict[str, str]]:
    project = tomllib.loads((folder / "pyproject.toml").read_text())["project"]
    return project["version"], project["entry-points"]["alignkit"]


def up_to_date(name: str, folder: Path) -> bool:
    """The distribution is installed, editable, from ``folder``, with the declared version and entry points."""
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    source = Path(unquote(urlparse(direct.get("url", "")).path))
    version, entry_points = declared(folder)
    installed = {ep.name: ep.value for ep in dist.entry_points if ep.group == "alignkit"}
    return (direct.get("dir_info", {}).get("editable", False) and source.resolve() == folder.resolve()
            and dist.version == version and installed == entry_points)


@pytest.fixture(scope="module")
def examples():
    """Install each example package (once), and make it importable in this process too: an editable install
    takes effect through a ``.pth`` file, which Python reads only at start-up."""
    for name, module in PACKAGES.items():
        folder = EXAMPLES / name
        if not up_to_date(name, folder):
            # offline when setuptools is installed here; otherwise pip fetches it into an isolated build env
            offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
            done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *offline, "--quiet", "-e",
                                   str(folder)], capture_output=True, text=True)
            assert done.returncode == 0, f"pip install -e {folder} failed:\n{done.stdout}\n{done.stderr}"
            importlib.invalidate_caches()
            assert up_to_date(name, folder)
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        assert Path(importlib.import_module(module).__file__).is_relative_to(folder)
    yield {name: EXAMPLES / name for name in PACKAGES}


# ------------------------------------------------------------------------------------------ discovery

def test_plugins_lists_the_examples_with_their_hooks(examples, capsys):
    from alignkit_rloo import RLOO
    from alignkit_simpo import SimPO

    infos = {p.name: p for p in discover()}
    expected = {"rloo": (RLOO, "alignkit-rloo", "alignkit_rloo:RLOO"),
                "simpo": (SimPO, "alignkit-simpo", "alignkit_simpo:SimPO")}
    run_cli(["plugins", "--kind", "algorithm"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name, (cls, dist, target) in expected.items():
        info = infos[name]
        assert (info.kind, info.distribution, info.target) == ("algorithm", dist, target)
        assert info.hooks == implemented_hooks(cls)
        listed = rows[name].split(None, 5)[-1]  # the hooks column
        assert listed == ", ".join(h.removeprefix("alignkit_") for h in info.hooks)
    assert infos["rloo"].hooks == ("alignkit_experience", "alignkit_loss", "alignkit_metrics", "alignkit_minibatches")
    assert infos["simpo"].hooks == ("alignkit_loss",)


# ------------------------------------------------------------------------------------------ recipes

def assert_finished(run_dir: Path, algorithm: str) -> dict:
    """A finished run: metrics.json names the algorithm and step count; the model loads with transformers."""
    from transformers import AutoModelForCausalLM

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["algorithm"] == algorithm and metrics["global_step"] == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert model.config.hidden_size == 32
    return metrics


def test_rloo_recipe_runs_end_to_end(examples, tmp_path):
    run_dir = tmp_path / "run"
    run_cli(["fit", "--config", examples["alignkit-rloo"] / "recipe.yaml", *TINY_MODEL, *QUIET,
             "--trainer.max_steps=2", "--data.init_args.task.init_args.num_train_prompts=32",
             "--data.init_args.batch_size=2", "--model.algorithm.init_args.sampling.max_new_tokens=8",
             "--model.completions_per_step=8", "--run_dir", run_dir])
    metrics = assert_finished(run_dir, "RLOO")
    final = metrics["final"]
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "policy/approxkl", "train/loss"):
        assert key in final, f"{key} missing from {sorted(final)}"
    # num_minibatches: 2 -> max_steps=2 is one online step, sampled by the initial policy: the reference itself
    assert final["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert final["objective/rlhf_reward"] == pytest.approx(final["objective/scores"], abs=1e-5)
    # 2 prompts × 4 samples, grouped by prompt
    rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts[:4])) == 1 and len(set(prompts[4:])) == 1 and prompts[0] != prompts[4]


def test_simpo_recipe_runs_end_to_end(examples, tmp_path):
    data = write_jsonl(tmp_path / "preferences.jsonl", preference_rows(24))
    run_dir = tmp_path / "run"
    run_cli(["fit", "--config", examples["alignkit-simpo"] / "recipe.yaml", "--model.policy.name_or_path=tiny",
             *TINY_MODEL, *QUIET, f"--data.init_args.path={data}", "--data.init_args.batch_size=8",
             "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--run_dir", run_dir])
    final = assert_finished(run_dir, "SimPO")["final"]
    for key in ("train/loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert key in final, f"{key} missing from {sorted(final)}"
    assert final["rewards/chosen"] == pytest.approx(2.0 * final["logps/chosen"], rel=1e-4)  # β = 2


def package_tests() -> list:
    """``(file, function)`` of every test in the packages' own ``tests/`` folders (plain functions)."""
    cases = []
    for name in PACKAGES:
        for path in sorted((EXAMPLES / name / "tests").glob("test_*.py")):
            cases += [pytest.param(path, node.name, id=f"{name}/{path.name}::{node.name}")
                      for node in ast.parse(path.read_text()).body
                      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return cases


@functools.cache
def load_tests(path: Path):
    spec = importlib.util.spec_from_file_location(f"_example_tests_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_package_has_tests():
    counts = {name: sum(1 for case in package_tests() if case.id.startswith(name + "/")) for name in PACKAGES}
    assert all(n >= 3 for n in counts.values()), counts


@pytest.mark.parametrize("path, function", package_tests())
def test_example_package_tests(examples, path, function):
    """The packages' own tests, run in this process (no second interpreter start-up); they take no fixtures,
    so ``cd docs/examples/<package> && pytest`` runs exactly the same functions."""
    getattr(load_tests(path), function)()


# ------------------------------------------------------------------------------------------ RLOO and the rollout engine

class RecordingEngine:
    """A replacement rollout engine (as a vLLM plugin would be): records the prompt batches it is asked for
    and answers with a hand-made two-token response per row."""

    def __init__(self, fail: bool = False):
        self.asked: list[PromptBatch] = []
        self.fail = fail

    @hookimpl
    def alignkit_rollout(self, module, batch: PromptBatch) -> Rollout:
        if self.fail:
            raise RuntimeError("engine out of memory")
        self.asked.append(batch)
        n, width = len(batch.prompts), 2
        ones = torch.ones(n, width, dtype=torch.long)
        return Rollout(sequences=torch.cat([batch.input_ids, ones], 1),
                       attention_mask=torch.cat([batch.attention_mask, ones], 1),
                       response_mask=ones, logprobs=torch.zeros(n, width), ended=torch.ones(n, dtype=torch.bool),
                       prompt_length=batch.input_ids.shape[1], prompts=list(batch.prompts), responses=["x"] * n)


class RecordingReward(Reward):
    """Scores every response 0 and records the prompts of the rollout it is given."""

    def __init__(self):
        super().__init__()
        self.prompts: list[list[str]] = []

    def score(self, prompts, responses, rollout):
        self.prompts.append(list(prompts))
        return RewardOutput(self.reward_name, torch.zeros(len(responses)))


def prompt_batch() -> PromptBatch:
    return PromptBatch(input_ids=torch.tensor([[5, 6], [7, 8]]), attention_mask=torch.ones(2, 2, dtype=torch.long),
                       prompts=["a", "b"], index=torch.tensor([0, 1]))


def one_online_step(module: AlignModule, root: Path) -> None:
    """One online step through Lightning: RLOO's single minibatch makes it one optimiser step."""
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([prompt_batch()], batch_size=None))
    assert trainer.global_step == 1


def test_prompt_batch_repeat_interleave_puts_the_copies_of_a_prompt_in_a_row():
    grouped = prompt_batch().repeat_interleave(3)
    assert grouped.prompts == ["a", "a", "a", "b", "b", "b"]
    assert grouped.input_ids.tolist() == [[5, 6]] * 3 + [[7, 8]] * 3
    assert grouped.attention_mask.shape == (6, 2) and grouped.index.tolist() == [0, 0, 0, 1, 1, 1]


def test_a_replacement_engine_receives_k_copies_of_each_prompt_from_the_host(examples, tmp_path):
    from alignkit_rloo import RLOO

    assert "alignkit_rollout" not in implemented_hooks(RLOO)  # the host groups the prompts, not the plugin
    engine, reward = RecordingEngine(), RecordingReward()
    module = AlignModule(algorithm=RLOO(samples_per_prompt=3, sampling=SamplingConfig(max_new_tokens=2)), policy=TINY,
                         rewards=[reward], plugins=[engine])
    one_online_step(module, tmp_path)
    [batch] = engine.asked
    assert batch.prompts == ["a", "a", "a", "b", "b", "b"]
    assert batch.input_ids.tolist() == [[5, 6]] * 3 + [[7, 8]] * 3 and batch.index.tolist() == [0, 0, 0, 1, 1, 1]
    assert reward.prompts == [batch.prompts]  # the rewards score all B·k responses, in groups


def test_the_builtin_engine_samples_k_responses_per_prompt(examples, tmp_path):
    from alignkit_rloo import RLOO

    reward = RecordingReward()
    module = AlignModule(algorithm=RLOO(samples_per_prompt=2, sampling=SamplingConfig(max_new_tokens=2)), policy=TINY,
                         rewards=[reward])
    one_online_step(module, tmp_path)
    assert reward.prompts == [["a", "a", "b", "b"]]


def test_a_failing_engine_behind_rloo_is_named(examples):
    from alignkit_rloo import RLOO

    module = AlignModule(algorithm=RLOO(), policy=TINY, rewards=[RecordingReward()],
                         plugins=[RecordingEngine(fail=True)])
    with pytest.raises(PluginError) as info:
        module.online_step(prompt_batch())  # the rollout is the first hook of the step: no trainer needed
    message = str(info.value)
    assert f"{__name__}.RecordingEngine" in message and "alignkit_rollout" in message and "out of memory" in message


# ------------------------------------------------------------------------------------------ broken packages

def test_a_broken_outside_package_is_named_and_hides_no_other(examples, tmp_path, monkeypatch, capsys):
    """An installed package whose entry point cannot be imported is listed as broken, with its error, and
    the working outside packages are still listed."""
    info = tmp_path / "alignkit_broken_example-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: alignkit-broken-example\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[alignkit]\nbroken_example = alignkit_no_such_module_xyz:Algo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    infos = {p.name: p for p in discover()}
    broken = infos["broken_example"]
    assert (broken.kind, broken.distribution, broken.target) == ("broken", "alignkit-broken-example",
                                                                 "alignkit_no_such_module_xyz:Algo")
    assert "alignkit_no_such_module_xyz" in " ".join(broken.hooks)
    assert infos["rloo"].kind == infos["simpo"].kind == "algorithm"
    run_cli(["plugins"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["broken_example"].split()[1] == "broken" and "alignkit_no_such_module_xyz" in rows["broken_example"]
    assert {"rloo", "simpo", "sft"} <= set(rows)
