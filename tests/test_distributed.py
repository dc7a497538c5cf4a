"""DDP, FSDP and FSDP2 with 2 processes on CPU (gloo) match a 1-process run with the same global batch.

Both runs see the same global batches (no shuffling: rank r takes rows r, r+2, ...). We compare what
the trained models compute — token log-probs (policies) or scores (reward models) on fixed texts — as
the change from the initial model: ``‖Δf_ddp − Δf_single‖ / ‖Δf_single‖`` must stay below ``TOLERANCE``.

It is not exactly 0: every loss is one mean over the step's tokens (or pairs) on every rank
(``alignkit.aggregation``), but float sums run in another order. Weights are not
compared directly: Adam's first update is lr·sign(g) for every parameter, so parameters whose gradient is
close to 0 flip sign on float noise and dominate any weight-space distance without changing the function.
"""

from __future__ import annotations

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


def fit(run_dir: Path, devices: int, batch_size: int, args: list[str],
        strategy: str = "--trainer.strategy=ddp") -> Path:
    command = [sys.executable, "-m", "alignkit.cli", "fit", *args, *COMMON, "--run_dir", str(run_dir),
               f"--trainer.devices={devices}", f"--data.init_args.batch_size={batch_size}"]
    if devices > 1:
        command.append(strategy)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir / "model"


def fit_in_process(run_dir: Path, batch_size: int, args: list[str]) -> Path:
    """``fit(run_dir, devices=1, ...)`` in the pytest process: the same command line, so the same trained model
    (one process either way: the same seed, one intra-op thread as ``OMP_NUM_THREADS=1``, see conftest.py), without
    a fresh interpreter's ~10 s of imports. Environment, working directory and torch's determinism flag come back."""
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


@pytest.mark.parametrize(("name", "strategy"), STRATEGIES)
def test_two_processes_match_one_process(name, strategy, inputs, single_process, tmp_path):
    """DDP, FSDP FULL_SHARD and FSDP2 (whose final exports gather the sharded weights) against one process. PPO
    under FSDP2 also generates with the gathered policy and trains a sharded value head."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    args, (algorithm, policy) = CASES[name][0](inputs), CASES[name][1](inputs)
    initial, tokenizer = initial_model(algorithm, policy)
    single = single_process(name)
    ddp = fit(tmp_path / strategy, devices=2, batch_size=4, args=args,
              strategy={"fsdp": FSDP, "fsdp2": FSDP2, "ddp": "--trainer.strategy=ddp", "zero2": ZERO2,
                        "zero3": ZERO3}[strategy])
    texts = [json.loads(line)["prompt"] + " " + json.loads(line)["chosen"] for line in open(inputs["prefs"])][:8]
    f0 = outputs(initial, tokenizer, texts)
    f1, f2 = (outputs(load(path, algorithm.model_head), tokenizer, texts) for path in (single, ddp))
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


@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_ppo_resumes_to_the_same_result(strategy, inputs, tmp_path):
    """PPO under FSDP2 or DeepSpeed ZeRO-3 stopped after its step-2 checkpoint and resumed ends bit-for-bit like
    an uninterrupted run: sharded policy and value head, optimiser state, RNG and data position all come back."""
    from safetensors.torch import load_file

    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    args = [*CASES["ppo"][0](inputs), "--wandb=false", "--trainer.enable_progress_bar=false", "--trainer.devices=2",
            "--trainer.limit_val_batches=0", "--data.init_args.batch_size=4", "--data.init_args.shuffle=false",
            "--trainer.deterministic=true", "--checkpoint_every=2", {"fsdp2": FSDP2, "zero3": ZERO3}[strategy]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def run(run_dir: Path, steps: int, *extra: str) -> None:
        command = [sys.executable, "-m", "alignkit.cli", "fit", *args, f"--trainer.max_steps={steps}",
                   "--run_dir", str(run_dir), *extra]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    run(tmp_path / "reference", 4)
    run(tmp_path / "resumed", 2)
    (tmp_path / "resumed" / "metrics.json").unlink()  # as if it had stopped after its step-2 checkpoint
    shutil.rmtree(tmp_path / "resumed" / "model")
    run(tmp_path / "resumed", 4, "--resume", "true", "--resume_with_changes", "true")  # max_steps 2 -> 4
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("reference", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_completions = (tmp_path / "resumed" / "completions.jsonl").read_text()
    assert resumed_completions == (tmp_path / "reference" / "completions.jsonl").read_text()
