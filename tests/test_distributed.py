"""DDP, FSDP and FSDP2 with 2 processes on CPU (gloo) match a 1-process run with the same global batch.

Both runs see the same global batches (no shuffling: rank r takes rows r, r+2, ...). We compare what
the trained models compute — token log-probs (policies) or scores (reward models) on fixed texts — as
the change from the initial model: ``‖Δf_ddp − Δf_single‖ / ‖Δf_single‖`` must stay below ``TOLERANCE``.

It is not exactly 0: every loss is one mean over the step's tokens (or pairs) on every rank
(``alignkit.aggregation``), but float sums run in another order. Weights are not
compared directly: Adam's first update is lr·sign(g) for every parameter, so parameters whose gradient is
close to 0 flip sign on float noise and dominate any weight-space distance without changing the function.

Each strategy's 2-process runs (one per algorithm) are trained in one launch of two processes that run them one after
another, each its own ``alignkit fit`` with its own Trainer and run directory (tests/distributed_worker.py): a launch
pays the ~10 s interpreter start-up of each process once, not once per run. The 1-process references run in the
pytest process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from alignkit.models import ModelConfig, TinyModelConfig, build_tiny_model, sequence_scores
from alignkit.models.loading import LoraSettings
from alignkit.module import AlignModule
from alignkit.ops import token_logprobs
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO
from alignkit_plugins.reward_model import RewardModel
from alignkit_plugins.sft import SFT
from alignkit_plugins.tasks import SentimentTask

#: every test here launches several training processes; the unit tier (-m "not slow and not distributed") skips them
pytestmark = pytest.mark.distributed

TOLERANCE = 0.01  # measured: sft 0.0008, rm/dpo/ppo < 1e-4
TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
COMMON = ["--wandb=false", "--trainer.enable_progress_bar=false", "--trainer.max_steps=3",
          "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0", "--trainer.enable_checkpointing=false",
          "--data.init_args.shuffle=false", "--data.init_args.val_fraction=0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny policy and a small preference file (good vs worse demonstrations of the task)."""
    folder = tmp_path_factory.mktemp("ddp_inputs")
    model, tokenizer = build_tiny_model(TINY)
    model.save_pretrained(folder / "policy")
    tokenizer.save_pretrained(folder / "policy")
    task = SentimentTask(num_train_prompts=32, num_eval_prompts=4)
    demos = task.demonstrations()
    with open(folder / "prefs.jsonl", "w") as f:
        for a, b in zip(demos[::2], demos[1::2]):
            a_is_better = task.gold_reward(a.prompt, a.response) >= task.gold_reward(a.prompt, b.response)
            good, bad = (a.response, b.response) if a_is_better else (b.response, a.response)
            f.write(json.dumps({"prompt": a.prompt, "chosen": good, "rejected": bad}) + "\n")
    return {"policy": folder / "policy", "prefs": folder / "prefs.jsonl"}


#: FSDP with every decoder layer its own FULL_SHARD unit, on CPU processes (see tests/cpu_fsdp.py).
FSDP = ("--trainer.strategy={class_path: cpu_fsdp.CPUFSDPStrategy, init_args: {sharding_strategy: FULL_SHARD, "
        "auto_wrap_policy: [transformers.models.llama.modeling_llama.LlamaDecoderLayer], process_group_backend: gloo}}")


WORKER = ROOT / "tests" / "distributed_worker.py"


def launch(folder: Path, jobs: dict[str, list[str]]) -> dict[str, str | None]:
    """Run every job (``alignkit fit`` arguments for 2 processes, without ``--run_dir``: job ``name`` runs in
    ``folder/name``) one after another in the same two processes (tests/distributed_worker.py), paying their start-up
    once. Returns each job's error (``None``: it finished on both ranks). A failed job stops its launch; the jobs after
    it run in a new one, so one broken case fails its own test only."""
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    status = folder / "status"
    status.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str | None] = {}
    for attempt in range(len(jobs)):
        pending = [name for name in jobs if name not in errors]
        if not pending:
            break
        for name in pending:  # a job cut short by an earlier failure starts again in a fresh run directory
            shutil.rmtree(folder / name, ignore_errors=True)
        spec = folder / f"launch{attempt}.json"
        spec.write_text(json.dumps({"status": str(status), "jobs": {
            name: ["fit", *jobs[name], "--run_dir", str(folder / name)] for name in pending}}))
        log = folder / f"launch{attempt}.log"
        with open(log, "w") as out:
            worker = subprocess.Popen([sys.executable, str(WORKER), str(spec)], cwd=ROOT, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
            try:
                returncode = worker.wait(timeout=120 + 180 * len(pending))
            except subprocess.TimeoutExpired:
                returncode = None
        if returncode != 0:  # rank 1 (same process group) too, however the launch ended
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
        failed = False
        for name in pending:
            reports = [path.read_text() for path in (status / f"{name}.rank{r}" for r in (0, 1)) if path.exists()]
            if reports == ["ok", "ok"]:
                errors[name] = None
            elif any(report != "ok" for report in reports):
                errors[name] = "\n".join([log.read_text()[-3000:], *(report for report in reports if report != "ok")])
                failed = True
        if not failed and (unreported := [name for name in pending if name not in errors]):
            ended = "timed out" if returncode is None else f"exited with {returncode}"
            errors[unreported[0]] = f"the launch {ended} during this job:\n" + log.read_text()[-3000:]
    return errors


def fit_in_process(run_dir: Path, batch_size: int, args: list[str]) -> Path:
    """``alignkit fit ... --trainer.devices=1`` in the pytest process: the command line a separate process would run,
    so the same trained model (one process either way: the same seed, one intra-op thread as ``OMP_NUM_THREADS=1``,
    see conftest.py), without a fresh interpreter's ~10 s of imports. Environment, working directory and torch's
    determinism flag come back."""
    from alignkit.cli import main

    environ, cwd = dict(os.environ), os.getcwd()
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    os.environ.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})
    torch.set_num_threads(1)
    os.chdir(ROOT)  # the recipes' relative paths, as the subprocess's cwd
    try:
        main(["fit", *args, *COMMON, "--run_dir", str(run_dir), "--trainer.devices=1",
              f"--data.init_args.batch_size={batch_size}"])
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return run_dir / "model"


@pytest.fixture(scope="module")
def single_process(inputs, tmp_path_factory):
    """``single_process(name)``: the model of the 1-process reference run of case ``name`` (global batch 8), trained
    once per module and shared by every strategy compared against it."""
    models: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in models:
            models[name] = fit_in_process(tmp_path_factory.mktemp(f"single_{name}") / "single", batch_size=8,
                                          args=CASES[name][0](inputs))
        return models[name]

    return get


@torch.no_grad()
def outputs(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Token log-probs of ``texts`` (causal LMs) or their scores (reward models), flattened."""
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    if hasattr(model, "score"):
        return sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    logits = model(**batch).logits[:, :-1]
    return token_logprobs(logits, batch["input_ids"][:, 1:])[batch["attention_mask"][:, 1:].bool()]


def load(path: Path, head: str):
    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    return cls.from_pretrained(path).eval()


def initial_model(algorithm, policy: ModelConfig):
    L.seed_everything(0)  # as LightningCLI does before building the model
    module = AlignModule(algorithm=algorithm, policy=policy)
    return module.policy.eval(), module.tokenizer


CASES = {
    "sft": (lambda i: ["--config", "recipes/sft.yaml",
                       *[f"--model.policy.tiny.{k}={v}" for k, v in vars(TINY).items() if v is not None],
                       "--data.init_args.task.init_args.num_train_prompts=64"],
            lambda i: (SFT(), ModelConfig(name_or_path="tiny", tiny=TINY))),
    "rm": (lambda i: ["--config", "recipes/reward_model.yaml", f"--model.policy.name_or_path={i['policy']}",
                      f"--data.init_args.path={i['prefs']}"],
           lambda i: (RewardModel(center_coef=0.01), ModelConfig(name_or_path=str(i["policy"])))),
    "dpo": (lambda i: ["--config", "recipes/dpo.yaml", f"--model.policy.name_or_path={i['policy']}",
                       f"--data.init_args.path={i['prefs']}"],
            lambda i: (DPO(), ModelConfig(name_or_path=str(i["policy"])))),
    "ppo": (lambda i: ["--config", "recipes/ppo_rlhf.yaml", f"--model.policy.name_or_path={i['policy']}",
                       "--model.rewards=[{class_path: alignkit_plugins.rewards.GoldReward, "
                       "init_args: {task: alignkit_plugins.tasks.SentimentTask}}]",
                       "--model.algorithm.init_args.sampling.do_sample=false",  # greedy: samples independent of RNG
                       "--model.algorithm.init_args.update_epochs=1", "--model.algorithm.init_args.num_minibatches=1",
                       "--data.init_args.task.init_args.num_train_prompts=64"],
            lambda i: (PPO(), ModelConfig(name_or_path=str(i["policy"])))),
}


LORA = "--model.policy.lora={r: 4, alpha: 8}"
#: LoRA under FSDP2: adapters trained on sharded frozen weights, the reference is the policy with adapters disabled,
#: and the export rebuilds the policy unsharded on rank 0 from the gathered weights and merges the adapters there.
CASES.update({
    f"{name}_lora": (lambda i, name=name: [*CASES[name][0](i), LORA],
                     lambda i, name=name: (
                         CASES[name][1](i)[0],
                         ModelConfig(name_or_path=str(i["policy"]), lora=LoraSettings(r=4, alpha=8)),
                     ))
    for name in ("rm", "dpo", "ppo")
})

#: FSDP2 (``fully_shard`` per decoder layer, the policy, the value head) through Lightning's ModelParallelStrategy.
FSDP2 = ("--trainer.strategy={class_path: lightning.pytorch.strategies.ModelParallelStrategy, init_args: "
         "{data_parallel_size: 2, tensor_parallel_size: 1, save_distributed_checkpoint: false, "
         "process_group_backend: gloo}}")
#: every algorithm under DDP and FSDP2 (also with LoRA); the offline ones under FSDP1 (online algorithms refuse it)
#: DeepSpeed ZeRO on CPU processes (DeepSpeed's CPU accelerator, gloo; see tests/cpu_deepspeed.py).
#: ZeRO-3 partitions every parameter (DeepSpeed keeps those under 100k elements whole by default:
#: all of the tiny model's).
ZERO2 = ("--trainer.strategy={class_path: cpu_deepspeed.CPUDeepSpeedStrategy, "
         "init_args: {stage: 2, process_group_backend: gloo}}")
ZERO3 = ("--trainer.strategy={class_path: cpu_deepspeed.CPUDeepSpeedStrategy, init_args: {process_group_backend: gloo, "
         "config: {zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}}}}")
STRATEGIES = [*((name, "ddp") for name in ("sft", "rm", "dpo", "ppo")),
              *((name, "fsdp") for name in ("sft", "rm", "dpo", "dpo_lora")),
              *((name, "fsdp2") for name in CASES),
              *((name, "zero2") for name in ("sft", "rm", "dpo", "ppo")),
              *((name, "zero3") for name in ("sft", "dpo", "ppo"))]


STRATEGY_ARGS = {"ddp": "--trainer.strategy=ddp", "fsdp": FSDP, "fsdp2": FSDP2, "zero2": ZERO2, "zero3": ZERO3}
#: the sharded strategies whose PPO resume is tested (test_sharded_ppo_resumes_to_the_same_result)
RESUMED = ("fsdp2", "zero3")


def resume_args(inputs: dict[str, Path], strategy: str) -> list[str]:
    """PPO in 2 processes with a checkpoint every 2 steps (append ``--trainer.max_steps``)."""
    return [*CASES["ppo"][0](inputs), "--wandb=false", "--trainer.enable_progress_bar=false", "--trainer.devices=2",
            "--trainer.limit_val_batches=0", "--data.init_args.batch_size=4", "--data.init_args.shuffle=false",
            "--trainer.deterministic=true", "--checkpoint_every=2", STRATEGY_ARGS[strategy]]


@pytest.fixture(scope="module")
def two_processes(inputs, tmp_path_factory):
    """``two_processes(strategy)``: the run directory of each 2-process run under ``strategy``, and its error
    (``None`` when it finished). The runs are those of :data:`STRATEGIES` (global batch 8, as the reference), and for
    :data:`RESUMED` ones the 4-step reference and the first 2 steps of the resume test; all of a strategy's runs
    are trained once per module, in one launch of two processes (:func:`launch`), each its own ``alignkit fit``."""
    runs: dict[str, dict[str, tuple[Path, str | None]]] = {}

    def get(strategy: str) -> dict[str, tuple[Path, str | None]]:
        if strategy not in runs:
            jobs = {name: [*CASES[name][0](inputs), *COMMON, "--trainer.devices=2", "--data.init_args.batch_size=4",
                           STRATEGY_ARGS[strategy]] for name, s in STRATEGIES if s == strategy}
            if strategy in RESUMED:
                jobs["resume_reference"] = [*resume_args(inputs, strategy), "--trainer.max_steps=4"]
                jobs["resume_first_half"] = [*resume_args(inputs, strategy), "--trainer.max_steps=2"]
            folder = tmp_path_factory.mktemp(f"two_processes_{strategy}")
            runs[strategy] = {name: (folder / name, error) for name, error in launch(folder, jobs).items()}
        return runs[strategy]

    return get


@pytest.mark.parametrize(("name", "strategy"), STRATEGIES)
def test_two_processes_match_one_process(name, strategy, inputs, single_process, two_processes):
    """DDP, FSDP FULL_SHARD and FSDP2 (whose final exports gather the sharded weights) against one process. PPO
    under FSDP2 also generates with the gathered policy and trains a sharded value head."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    algorithm, policy = CASES[name][1](inputs)
    initial, tokenizer = initial_model(algorithm, policy)
    single = single_process(name)
    run_dir, error = two_processes(strategy)[name]
    assert error is None, error[-3000:]
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["chosen"] for line in open(inputs["prefs"])][:8]
    f0 = outputs(initial, tokenizer, texts)
    f1, f2 = (outputs(load(path, algorithm.model_head), tokenizer, texts) for path in (single, run_dir / "model"))
    gap = float((f2 - f1).norm() / (f1 - f0).norm())
    print(f"{name} {strategy}: relative change gap {gap:.4f}")
    assert (f1 - f0).norm() > 0, "the single-process run did not train"
    assert gap < TOLERANCE


def test_two_nodes_launched_by_torchrun_match_one_process(inputs, single_process, tmp_path):
    """The multi-node launch path on one machine: two ``torchrun --nnodes=2 --node_rank=…`` launches of one process
    each (as on two nodes), ``--trainer.num_nodes=2``, DDP over gloo, one shared run directory. PPO against one
    process, as above."""
    import socket

    args, (algorithm, policy) = CASES["ppo"][0](inputs), CASES["ppo"][1](inputs)
    initial, tokenizer = initial_model(algorithm, policy)
    single = single_process("ppo")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}",
                               "-m", "alignkit.cli", "fit", *args, *COMMON, "--run_dir", str(tmp_path / "nodes"),
                               "--trainer.devices=1", "--trainer.num_nodes=2", "--trainer.strategy=ddp",
                               "--data.init_args.batch_size=4"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["chosen"] for line in open(inputs["prefs"])][:8]
    f0 = outputs(initial, tokenizer, texts)
    f1, f2 = (outputs(load(path, "causal_lm"), tokenizer, texts) for path in (single, tmp_path / "nodes" / "model"))
    gap = float((f2 - f1).norm() / (f1 - f0).norm())
    print(f"ppo 2 nodes x 1 process (torchrun): relative change gap {gap:.4f}")
    assert (f1 - f0).norm() > 0 and gap < TOLERANCE


def test_online_algorithms_refuse_fsdp_with_one_line(inputs, tmp_path):
    """PPO's update runs inside its training step: under Lightning's FSDP that backward would fail deep in FSDP's
    hooks after the first rollout, so the run stops at set-up naming the strategy to use instead."""
    args = [*CASES["ppo"][0](inputs), *COMMON, "--run_dir", str(tmp_path / "run"), FSDP]
    pythonpath = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath}
    done = subprocess.run([sys.executable, "-m", "alignkit.cli", "fit", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    error = [line for line in done.stderr.splitlines() if line.startswith("alignkit: error:")]
    assert len(error) == 1 and "FSDPStrategy" in error[0] and "ModelParallelStrategy" in error[0], done.stderr[-2000:]


@pytest.mark.parametrize("strategy", RESUMED)
def test_sharded_ppo_resumes_to_the_same_result(strategy, inputs, two_processes):
    """PPO under FSDP2 or DeepSpeed ZeRO-3 stopped after its step-2 checkpoint and resumed ends bit-for-bit like
    an uninterrupted run: sharded policy and value head, optimiser state, RNG and data position all come back. The
    uninterrupted run and the first 2 steps run in the strategy's shared launch (:func:`two_processes`); the resume
    is a fresh ``alignkit fit --resume true`` in new processes, launched by Lightning as a user's would be."""
    from safetensors.torch import load_file

    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    runs = two_processes(strategy)
    for job in ("resume_reference", "resume_first_half"):
        assert runs[job][1] is None, runs[job][1][-3000:]
    reference, resumed = runs["resume_reference"][0], runs["resume_first_half"][0]
    (resumed / "metrics.json").unlink()  # as if it had stopped after its step-2 checkpoint
    shutil.rmtree(resumed / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "alignkit.cli", "fit", *resume_args(inputs, strategy), "--trainer.max_steps=4",
               "--run_dir", str(resumed), "--resume", "true", "--resume_with_changes", "true"]  # max_steps 2 -> 4
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(d / "model" / "model.safetensors") for d in (reference, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "completions.jsonl").read_text() == (reference / "completions.jsonl").read_text()
