"""Durable runs: a run killed with SIGKILL and resumed with ``--resume true`` ends exactly like a run that
was never interrupted (CPU, deterministic): the same final weights (``torch.equal``), the same
``metrics.csv`` rows, the same ``metrics.json`` (but for wall time and paths) and, for PPO, the same sampled
completions.

The killed run is a real ``alignkit fit`` process. A test-only callback makes one of its checkpoint writes
block half-way, and the test sends SIGKILL then: the run dies past its last complete checkpoint and in the
middle of writing the next one, which must leave the complete one intact.
Also: the resumable train loader and ``--resume`` refusals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import QUIET, TINY_MODEL, preference_rows, run_cli, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = [*TINY_MODEL, *QUIET, "--trainer.deterministic=true"]


class Blocker:
    """Pickled into a checkpoint: writes ``marker`` and blocks, so the test can SIGKILL the run mid-write."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        self.marker.write_text("writing")
        time.sleep(600)


class KillWhileSaving(L.Callback):
    """Test-only: from optimiser step ``step`` on, the next checkpoint write blocks (see :class:`Blocker`), unless
    ``marker`` exists (the resumed run passes the same callback, as a resume must repeat the configuration)."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if trainer.global_step >= self.step and not self.marker.exists():
            checkpoint["blocker"] = Blocker(self.marker)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny policy and a small preference file."""
    from alignkit.models import TinyModelConfig, build_tiny_model

    folder = tmp_path_factory.mktemp("resume_inputs")
    config = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model, tokenizer = build_tiny_model(config)
    model.save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    return {"policy": folder / "policy", "prefs": write_jsonl(folder / "prefs.jsonl", preference_rows(48))}


SFT = ["--config", "recipes/sft.yaml", "--data.init_args.batch_size=8"]
#: name -> (arguments, the step of the last complete checkpoint: the run is killed writing the next one)
CASES = {
    # Every 2 steps; 60 train rows / 8 = 8 batches an epoch: the resumed part crosses an epoch end and its
    # validation. Killed while writing step 6.
    "sft": (lambda i: [*SFT, "--data.init_args.task.init_args.num_train_prompts=64", "--trainer.max_steps=12",
                       "--checkpoint_every=2"], 4),
    # The default: at each epoch's end (4 batches, then validation: saved after the next batch, steps 5 and 9).
    "sft_epochs": (lambda i: [*SFT, "--data.init_args.task.init_args.num_train_prompts=32",
                              "--trainer.max_steps=12"], 5),
    "dpo": (lambda i: ["--config", "recipes/dpo.yaml", f"--model.policy.name_or_path={i['policy']}",
                       f"--data.init_args.path={i['prefs']}", "--data.init_args.batch_size=8", "--trainer.max_steps=10",
                       "--checkpoint_every=2"], 4),
    # Sampled (global RNG) rollouts, running reward statistics and an adaptive KL controller; 2 optimiser
    # steps per batch, 4 batches an epoch.
    "ppo": (lambda i: ["--config", "recipes/ppo_rlhf.yaml", f"--model.policy.name_or_path={i['policy']}",
                       "--model.rewards=[{class_path: alignkit_plugins.rewards.GoldReward, "
                       "init_args: {task: alignkit_plugins.tasks.SentimentTask}}]",
                       "--model.algorithm.init_args.sampling.max_new_tokens=8",
                       "--model.algorithm.init_args.kl_target=0.5",
                       "--model.algorithm.init_args.update_epochs=1", "--model.algorithm.init_args.num_minibatches=2",
                       "--data.init_args.task.init_args.num_train_prompts=16", "--data.init_args.batch_size=4",
                       "--trainer.max_steps=12", "--checkpoint_every=2"], 4),
}


def hold(run_dir: Path, step: int) -> str:
    """The ``--trainer.callbacks`` argument of :func:`kill_while_saving` (inert once the run was killed)."""
    marker = run_dir.parent / f"{run_dir.name}.writing"
    return "--trainer.callbacks=" + json.dumps([{"class_path": "test_resume.KillWhileSaving",
                                                 "init_args": {"step": step, "marker": str(marker)}}])


def kill_while_saving(args: list[str], run_dir: Path, step: int, timeout: float = 120) -> None:
    """Run ``alignkit fit`` in a child process and SIGKILL it while it writes its first checkpoint at or
    after optimiser step ``step``."""
    marker = run_dir.parent / f"{run_dir.name}.writing"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "alignkit.cli", "fit", *args, "--run_dir", str(run_dir), hold(run_dir, step)]
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            pytest.fail(f"the run to kill exited early ({child.returncode}): {child.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            pytest.fail("the run to kill never started the checkpoint write")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same final weights (bit for bit), metrics.csv, metrics.json (but wall time and paths), completions."""
    a, b = load_file(reference / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])], "final weights differ"
    assert (resumed / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (reference, resumed))
    for summary in (first, second):
        del summary["wall_time_s"], summary["model"]
    assert second == first
    if (reference / "completions.jsonl").exists():
        assert (resumed / "completions.jsonl").read_text() == (reference / "completions.jsonl").read_text()


@pytest.mark.parametrize("name", list(CASES))
def test_killed_run_resumes_to_the_same_result(name, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipes' relative paths
    arguments, checkpoint_step = CASES[name]
    args = [*arguments(inputs), *COMMON]
    run_cli(["fit", *args, "--run_dir", tmp_path / "reference"])
    killed = tmp_path / "killed"
    kill_while_saving(args, killed, step=checkpoint_step + 1)
    checkpoints = killed / "checkpoints"
    # The killed write left its temporary file; last.ckpt links the previous, complete checkpoint.
    leftovers = [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp")
    assert os.readlink(checkpoints / "last.ckpt") == f"step={checkpoint_step}.ckpt"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == checkpoint_step
    assert (checkpoints / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask()
    assert not (killed / "model").exists()
    run_cli(["fit", *args, "--run_dir", killed, "--resume", "true", hold(killed, checkpoint_step + 1)])
    assert_same_run(tmp_path / "reference", killed)
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]  # the leftover was cleaned up
    assert len(list(checkpoints.glob("step=*.ckpt"))) == 2  # --keep_checkpoints


class Started(L.Callback):
    """Test-only: appends ``start`` to ``marker`` whenever training starts (the end of a run's start-up) and ``end``
    when it ends."""

    def __init__(self, marker: str):
        self.marker = Path(marker)

    def on_train_start(self, trainer, pl_module) -> None:
        with self.marker.open("a") as f:
            f.write("start\n")

    def on_train_end(self, trainer, pl_module) -> None:
        with self.marker.open("a") as f:
            f.write("end\n")


@pytest.mark.skipif(not os.environ.get("ALIGNKIT_STRESS"), reason="SIGKILLs at random moments: set ALIGNKIT_STRESS=1 "
                    "(about 1.5 minutes per algorithm)")
@pytest.mark.parametrize("name", ["sft", "dpo", "ppo"])
def test_sigkills_at_random_moments_resume_to_the_same_result(name, inputs, tmp_path, monkeypatch):
    """Real ``alignkit fit`` processes (the first fresh, then ``--resume true`` whenever a checkpoint exists)
    SIGKILLed 5 times at random moments: 3 during training, 2 during the start-up of a resume (after a random
    share of the time an uninterrupted start-up takes: imports, checkpoint check and load, file trimming); then
    the run finishes. Its weights, metrics.csv, metrics.json and completions are those of a run never
    interrupted."""
    import random

    from alignkit.run import has_checkpoint

    monkeypatch.chdir(ROOT)
    arguments, _ = CASES[name]  # max_steps=30 below
    args = [*map(str, arguments(inputs)), *COMMON, "--trainer.max_steps=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def start(run_dir: Path) -> tuple[subprocess.Popen, Path]:
        marker = run_dir.parent / f"{run_dir.name}.started"
        started = json.dumps([{"class_path": "test_resume.Started", "init_args": {"marker": str(marker)}}])
        resume = ["--resume", "true"] if has_checkpoint(run_dir) else []
        command = [sys.executable, "-m", "alignkit.cli", "fit", *args, "--run_dir", str(run_dir),
                   f"--trainer.callbacks={started}", *resume]
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True), marker

    def starts(marker: Path, what: str = "start") -> int:
        return marker.read_text().split().count(what) if marker.exists() else 0

    def wait_for(child: subprocess.Popen, marker: Path, what: str, count: int) -> None:
        while starts(marker, what) < count and child.poll() is None:
            time.sleep(0.01)

    began = time.monotonic()
    child, marker = start(tmp_path / "reference")
    wait_for(child, marker, "start", 1)
    startup = time.monotonic() - began
    wait_for(child, marker, "end", 1)
    training = time.monotonic() - began - startup
    _, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    rng, run, history = random.Random(name), tmp_path / "killed", []
    for phase in ("training", "training", "start-up", "training", "start-up"):
        done = max([int(p.name[5:-5]) for p in (run / "checkpoints").glob("step=*.ckpt")], default=0)
        if done >= 28:  # nothing (much) left to train: kill the start-up instead
            phase = "start-up"
        child, marker = start(run)
        began, before = time.monotonic(), starts(marker)
        if phase == "training":
            wait_for(child, marker, "start", before + 1)
            delay = rng.uniform(0.1, 0.6) * training * (1 - done / 30)  # within what is left
        else:
            delay = rng.uniform(0.4, 1.0) * startup
        try:
            _, err = child.communicate(timeout=max(delay - (time.monotonic() - began), 0.01) if phase != "training"
                                       else delay)
            pytest.fail(f"the run ended ({child.returncode}) before its {phase} kill "
                        f"(start-up {startup:.1f} s, training {training:.1f} s, kills so far {history}): "
                        f"{err[-500:]}")
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
        history.append((phase, sorted(p.name for p in (run / "checkpoints").glob("step=*.ckpt"))
                        if (run / "checkpoints").is_dir() else []))
    print(f"{name}: start-up {startup:.1f} s, training {training:.1f} s; kills (phase, checkpoints then): {history}")
    if not (run / "metrics.json").exists():
        started = [{"class_path": "test_resume.Started", "init_args": {"marker": str(marker)}}]
        run_cli(["fit", *args, "--run_dir", run, f"--trainer.callbacks={json.dumps(started)}",
                 *(["--resume", "true"] if has_checkpoint(run) else [])])
    assert_same_run(tmp_path / "reference", run)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------- train loader

def loader_indices(loader) -> list[list[int]]:
    return [batch.tolist() for batch in loader]


def make_loader(seed: int = 0, rows: int = 10, batch_size: int = 3):
    from alignkit.data.modules import ResumableLoader, ResumableSampler

    data = list(range(rows))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return ResumableLoader(data, batch_size=batch_size, sampler=sampler, generator=torch.Generator())


def epoch_order(epoch: int) -> list[list[int]]:
    loader = make_loader()
    loader.sampler.set_epoch(epoch)  # as Lightning does before the first pass
    return loader_indices(loader)


def test_train_loader_resumes_mid_epoch():
    epoch1 = epoch_order(1)
    assert len(epoch1) == 4 and sorted(sum(epoch1, [])) == list(range(10)) and epoch1 != epoch_order(0)

    loader = make_loader()
    loader.sampler.set_epoch(1)
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = make_loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(5)  # whatever Lightning sets, the checkpoint's epoch continues
    assert loader_indices(resumed) == epoch1[2:] and len(resumed) == 4
    assert resumed.state_dict() == {"epoch": 1, "batches": 4}
    assert loader_indices(resumed) == epoch_order(2)  # the next pass is the next epoch, whole

    finished = make_loader()
    finished.load_state_dict({"epoch": 1, "batches": 4})  # saved after the last batch of epoch 1
    assert loader_indices(finished) == epoch_order(2)


# ---------------------------------------------------------------------------------------------- refusals

def test_resume_refuses_a_run_without_checkpoint_or_a_finished_run(tmp_path, capsys):
    cases = ((tmp_path / "empty", "no checkpoints/last.ckpt"), (tmp_path / "done", "nothing to resume"))
    for run_dir, expected in cases:
        run_dir.mkdir()
        if run_dir.name == "done":
            (run_dir / "model").mkdir()
        with pytest.raises(SystemExit) as info:
            run_cli(["fit", "--config", ROOT / "recipes" / "sft.yaml", *TINY_MODEL, *QUIET, "--run_dir", run_dir,
                     "--resume", "true"])
        assert info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("alignkit: error:") and expected in error and "\n" not in error


def test_resumed_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
    from alignkit.cli import finish_wandb_run, wandb_run_id

    monkeypatch.chdir(ROOT)
    quiet_with_wandb = [arg for arg in QUIET if not arg.startswith("--wandb")]
    args = ["--config", "recipes/sft.yaml", *TINY_MODEL, *quiet_with_wandb, "--checkpoint_every=2",
            "--run_dir", tmp_path / "run"]
    run_cli(["fit", *args, "--trainer.max_steps=2"])
    finish_wandb_run()
    first = wandb_run_id(tmp_path / "run")
    assert first
    shutil.rmtree(tmp_path / "run" / "model")  # as if the run had stopped after its step-2 checkpoint
    (tmp_path / "run" / "metrics.json").unlink()
    # A new process, as a real resume is (wandb stamps its folders with the process's start time).
    command = [sys.executable, "-m", "alignkit.cli", "fit", *map(str, args), "--trainer.max_steps=4",
               "--resume", "true", "--resume_with_changes", "true"]  # a longer run: a change of configuration
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # its own wandb service, as a new run has
    done = subprocess.run(command, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
                          check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    folders = sorted((tmp_path / "run" / "wandb").glob("*-run-*"))
    assert len(folders) == 2 and {folder.name.rsplit("-", 1)[1] for folder in folders} == {first}
    assert "anonymous" not in done.stderr  # wandb's deprecation of an argument Lightning passed it (#21 item 8)


def test_folder_checkpoints_are_swapped_in_whole(tmp_path):
    """DeepSpeed and sharded FSDP write a checkpoint folder: it is staged, then swapped in; a kill between the two
    renames leaves the previous folder as ``.last.ckpt.old``, which ``--resume`` puts back."""
    from alignkit.checkpoint import recover_folder, swap_in_folder
    from alignkit.run import resume_checkpoint

    folder = tmp_path / "checkpoints"
    target, staging, old = folder / "last.ckpt", folder / ".last.ckpt.writing", folder / ".last.ckpt.old"
    for path, step in ((target, "1"), (staging, "2")):
        path.mkdir(parents=True)
        (path / "shard").write_text(step)
    swap_in_folder(staging, target)
    assert (target / "shard").read_text() == "2" and not staging.exists() and not old.exists()
    os.replace(target, old)  # killed after the first rename of the next swap
    recover_folder(target)
    assert (target / "shard").read_text() == "2" and not old.exists()
    os.replace(target, old)
    assert resume_checkpoint(tmp_path) == target and (target / "shard").read_text() == "2"
