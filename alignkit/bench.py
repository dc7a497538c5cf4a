"""``alignkit bench``: throughput, memory and MFU of the SFT, reward-model, DPO and PPO stages.

For every model size and algorithm one *measurement* trains a few steps through the real code path (the
:class:`~alignkit.module.AlignModule` under a Lightning ``Trainer``, the plugins, the data modules) and
records

- time per step (an online step is one rollout → score → experience → update iteration), with the
  phases of an online step (generation, scoring, experience, update), on the wall clock and on the process
  CPU clock (with one thread on a shared CPU the CPU clock counts this process's own work only; keys ending
  in ``_cpu``);
- training tokens/s (real, non-pad tokens through forward + backward) and, online, generation tokens/s;
- the fraction of pad tokens in the batches (padding waste);
- peak memory: on CPU the growth of the process's maximum resident set size (``getrusage``) above the
  resident size after the imports, measured in a fresh subprocess per measurement (``isolate``); on GPU
  ``torch.cuda.max_memory_allocated``;
- model FLOPs per step and MFU against a roofline measured in the same run, on the same device and dtype.

FLOPs (PaLM appendix B convention, counted on the real tokens; padding is waste and counts nothing):
``N`` is the number of weights used in matrix products per token, i.e. every parameter but the input
embedding, plus the LM head's ``V·H`` when it is tied to the embedding (a reward model has no LM head);
``L`` layers, ``H`` hidden size, ``T`` the padded length of the batch::

    forward(n tokens)  F = 2·N·n + 4·L·H·T·n       (weights + attention scores QKᵀ and A·V)
    training           3·F                          (forward + backward = 2·forward)
    SFT, RM            3·F(batch)
    DPO                3·F(2B rows) + F(2B rows)    (+ the reference forward when it is live)
                       (RM and DPO with ``shared_prompt``: F over the B shared-prompt rows, each prompt once)
    PPO / RLOO         F(prompts) + F(generated) + F_policy(seq) + F_ref(seq) + F_rm(seq) + E·3·F(seq)

The PPO count is the work the algorithm needs: generation, one policy forward for log π_old and the
values, one reference forward, one reward-model forward and ``E`` update epochs; anything else an
implementation executes (e.g. a second forward over the rollout for its log-probs) lowers its MFU instead.

MFU = model FLOPs per second / roofline, where the roofline is the best FLOP/s of a dense
``(tokens × H) @ (H × I)`` matmul of the same size as the step's largest product (``mfu``), and of a large
square matmul (``mfu_peak``, the device's practical peak), both timed with torch in the same run and on
both clocks. Method, results and the optimisations measured with it: ``benchmarks/README.md``.

``--compare='[trl]'`` adds TRL's ``SFTTrainer``, ``DPOTrainer``, ``RewardTrainer`` and ``RLOOTrainer`` (for PPO) on
the same saved model, the same data and the same batch and sequence lengths (``benchmarks/trl_compare.py``;
skipped with a message when ``trl`` is not installed). ``--group_by_length`` (default true) batches examples
of similar length on both sides where the framework can: alignkit's data modules (``group_by_length``) and
TRL's ``train_sampling_strategy="group_by_length"`` for SFT, RM and DPO (RLOO samples prompts with its own
sampler, which has no length grouping). Repeats are interleaved (ours, theirs, ours, ...) and medians are
reported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

Algo = Literal["sft", "rm", "dpo", "ppo"]
BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


@dataclass
class ModelSize:
    """Shape of a benchmarked Llama (the tiny model's architecture and tokenizer at another size)."""

    name: str = "tiny"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int | None = None
    """Pad the vocabulary (embedding and LM head) to this many ids, like the 32k-150k vocabularies of real
    models (the tiny tokenizer has ~430 tokens; padded ids never occur in the data). None: no padding."""


@dataclass
class Workload:
    """Batch and sequence lengths, identical for every framework."""

    batch_size: int = 16
    """Sequences per SFT step, preference pairs per RM/DPO step, completions per online step."""
    max_length: int = 64
    """Longest prompt + response, in tokens (SFT, RM, DPO)."""
    max_prompt_length: int = 16
    max_new_tokens: int = 24
    """Generated tokens per completion (online RL)."""
    update_epochs: int = 1
    """PPO epochs per online step (RLOO: ``num_iterations``)."""
    num_pairs: int = 512
    """Synthetic preference pairs / prompts / demonstrations written for the run."""


#: Default sizes: the tiny default model up to ~25M parameters on CPU; larger ones on GPU.
CPU_SIZES = [
    ModelSize("tiny", 64, 4, 4, 256),
    ModelSize("5M", 256, 6, 4, 768),
    ModelSize("25M", 512, 6, 8, 2048),
    ModelSize("25M-v32k", 384, 4, 6, 1536, vocab_size=32000),
]
GPU_SIZES = [
    ModelSize("25M", 512, 6, 8, 2048),
    ModelSize("25M-v32k", 384, 4, 6, 1536, vocab_size=32000),
    ModelSize("120M-v32k", 768, 12, 12, 3072, vocab_size=32000),
    ModelSize("350M-v32k", 1024, 24, 16, 4096, vocab_size=32000),
]
SMOKE_SIZES = [ModelSize("smoke", 32, 2, 2, 64)]


# ============================================================================================ memory, flops

def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover - psutil is a dependency of lightning's extras, not guaranteed
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's maximum resident set size so far, in bytes (a high-water mark)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class ModelShape:
    """What the FLOP formulas need to know about a model."""

    params: int  # all parameters
    matmul_params: int  # N: weights used in matrix products per token (LM head included, input embedding not)
    layers: int
    hidden: int
    vocab: int

    def forward(self, tokens: float, length: float) -> float:
        """FLOPs of a forward pass over ``tokens`` real tokens in sequences padded to ``length``."""
        return 2.0 * self.matmul_params * tokens + 4.0 * self.layers * self.hidden * length * tokens


def model_shape(model) -> ModelShape:
    """Parameter counts of a transformers model (unwrapping peft), for the FLOP formulas."""
    from alignkit.ops import unwrap_peft

    base = unwrap_peft(model)
    config = base.config
    embedding = base.get_input_embeddings().weight
    params = sum(p.numel() for p in base.parameters())
    matmul = params - embedding.numel()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and head.weight is embedding:  # tied: the head's product runs, its weight is counted once
        matmul += embedding.numel()
    return ModelShape(params, matmul, config.num_hidden_layers, config.hidden_size, config.vocab_size)


def time_matmul(m: int, k: int, n: int, device: str, dtype: str, budget_s: float = 0.3) -> tuple[float, float]:
    """Best FLOP/s of ``(m × k) @ (k × n)`` over repeated trials of about ``budget_s`` in total, on the wall
    clock and on the process CPU clock (on GPU the two are the same wall-clock figure)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(m, k, device=device, dtype=dt)
    b = torch.randn(k, n, device=device, dtype=dt)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, int(0.02 / once))
    best_wall = best_cpu = float("inf")
    deadline = time.perf_counter() + budget_s
    trials = 0
    while trials < 3 or (time.perf_counter() < deadline and trials < 200):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(inner):
            a @ b
        sync()
        best_wall = min(best_wall, (time.perf_counter() - wall) / inner)
        best_cpu = min(best_cpu, max(time.process_time() - cpu, 1e-9) / inner)
        trials += 1
    flops = 2.0 * m * k * n
    return flops / best_wall, flops / (best_wall if cuda else best_cpu)


def peak_roofline(device: str, dtype: str, budget_s: float = 1.0, side: int | None = None) -> dict[str, Any]:
    """The device's practical peak: a large square matmul."""
    side = side or (4096 if device.startswith("cuda") else 1024)
    wall, cpu = time_matmul(side, side, side, device, dtype, budget_s)
    return {"shape": [side, side, side], "flops_per_s": wall, "flops_per_s_cpu": cpu}


# ============================================================================================ assets

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


def prepare_assets(root: Path, size: ModelSize, workload: Workload, seed: int = 0) -> dict[str, str]:
    """Write what every framework reads: the policy (causal LM) and the reward model (sequence classifier,
    one scalar) built from the tiny architecture at ``size`` and saved with ``save_pretrained``, the
    preference pairs (``preferences.jsonl``) and the prompts (``prompts.jsonl``) of the sentiment task."""
    import torch
    from transformers import LlamaForSequenceClassification

    from alignkit.models.tiny import TinyModelConfig, build_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    tiny = TinyModelConfig(hidden_size=size.hidden_size, num_layers=size.num_layers, num_heads=size.num_heads,
                           intermediate_size=size.intermediate_size,
                           max_position_embeddings=max(256, workload.max_length + workload.max_new_tokens),
                           seed=seed)
    policy, tokenizer = build_tiny_model(tiny)
    if size.vocab_size and size.vocab_size > policy.config.vocab_size:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy.resize_token_embeddings(size.vocab_size, mean_resizing=False)
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


# ============================================================================================ step recorder

class StepRecorder:
    """End time, token counts and phase times of every training step of one measurement, on two clocks:
    wall time (``time/*``) and the process's CPU time (``cpu/*``). With one thread on a shared CPU the CPU
    time counts only this process's own work, while the wall time also counts the neighbours' load."""

    def __init__(self, device: str):
        self.device = device
        self.ends: list[tuple[float, float]] = []
        self.start = (0.0, 0.0)
        self.steps: list[dict[str, float]] = []  # per step: tokens, padded, phase times, ...
        self.current: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def now(self) -> tuple[float, float]:
        self.sync()
        return time.perf_counter(), time.process_time()

    def begin(self) -> None:
        self.start = self.now()

    def add(self, key: str, value: float) -> None:
        self.current[key] = self.current.get(key, 0.0) + float(value)

    @contextlib.contextmanager
    def phase(self, name: str):
        wall, cpu = self.now()
        try:
            yield
        finally:
            wall_end, cpu_end = self.now()
            self.add(f"time/{name}", wall_end - wall)
            self.add(f"cpu/{name}", cpu_end - cpu)

    def end_step(self) -> None:
        self.ends.append(self.now())
        self.steps.append(self.current)
        self.current = {}

    def summary(self, warmup: int) -> dict[str, Any]:
        """Per-step times (end to end, data loading included) and token counts after ``warmup`` steps."""
        bounds = list(zip([self.start, *self.ends[:-1]], self.ends))
        kept = list(range(min(warmup, max(len(bounds) - 1, 0)), len(bounds)))
        steps = [{**self.steps[i], "time/step": bounds[i][1][0] - bounds[i][0][0],
                  "cpu/step": bounds[i][1][1] - bounds[i][0][1]} for i in kept]
        keys = sorted({k for s in steps for k in s})
        return {"steps_measured": len(steps), "per_step": steps,
                "median": {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys} if steps else {},
                "total": {k: sum(s.get(k, 0.0) for s in steps) for k in keys}}


def _batch_tokens(batch) -> tuple[float, float, float]:
    """(real tokens, padded tokens, padded length) of a collated batch."""
    mask = batch.attention_mask
    return float(mask.sum()), float(mask.numel()), float(mask.shape[1])


def _shared_prompt_tokens(batch) -> tuple[float, float]:
    """(real tokens, padded length) of a preference batch in the shared-prompt layout (``alignkit.pairs``)."""
    from alignkit.pairs import PAD, share_prompts

    segment = share_prompts(batch).segment
    return float((segment != PAD).sum()), float(segment.shape[1])


# ============================================================================================ alignkit runner

def _lightning_callback(recorder: StepRecorder, shared_prompt: bool = False):
    import lightning as L

    class Timer(L.Callback):
        def on_train_start(self, trainer, pl_module):
            recorder.begin()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if hasattr(batch, "attention_mask") and not hasattr(batch, "prompts"):
                real, padded, length = _batch_tokens(batch)
                recorder.add("tokens/real", real)
                recorder.add("tokens/padded", padded)
                recorder.add("tokens/length", length)
                if shared_prompt:  # the tokens the model runs (FLOPs); throughput still counts the pairs' tokens
                    real, length = _shared_prompt_tokens(batch)
                    recorder.add("tokens/computed", real)
                    recorder.add("tokens/computed_length", length)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            recorder.end_step()

    return Timer()


def _instrument_online(module, recorder: StepRecorder) -> None:
    """Time the phases of an online step and count its tokens, without changing what runs: the host's
    hook dispatcher and its ``score``/``update`` methods are wrapped for this process only."""
    import alignkit.module as host

    if not getattr(host, "_bench_wrapped", False):
        call_first = host.call_first

        def timed_call_first(pm, hook, expect, **kwargs):
            rec = host._bench_recorder
            if rec is None or hook not in ("alignkit_rollout", "alignkit_experience"):
                return call_first(pm, hook, expect, **kwargs)
            with rec.phase(hook.removeprefix("alignkit_")):
                result = call_first(pm, hook, expect, **kwargs)
            if hook == "alignkit_rollout":
                _count_rollout(rec, result)
            return result

        host.call_first = timed_call_first
        host._bench_wrapped = True
    host._bench_recorder = recorder
    for name in ("score", "update"):
        original = getattr(module, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            with recorder.phase(_name):
                return _original(*args, **kwargs)

        setattr(module, name, wrapped)


def _count_rollout(recorder: StepRecorder, rollout) -> None:
    mask = rollout.attention_mask
    response = rollout.response_mask
    prompt = mask[:, :rollout.prompt_length]
    recorder.add("tokens/generated", float(response.sum()))
    recorder.add("tokens/prompt", float(prompt.sum()))
    recorder.add("tokens/real", float(mask.sum()))
    recorder.add("tokens/padded", float(mask.numel()))
    recorder.add("tokens/length", float(mask.shape[1]))
    recorder.add("tokens/prompt_length", float(rollout.prompt_length))
    recorder.add("rows", float(mask.shape[0]))


def run_alignkit(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement of alignkit: ``spec["algorithm"]`` trained for ``warmup + steps`` steps."""
    import lightning as L
    import torch

    from alignkit.data import PreferenceData, PromptData, SFTData
    from alignkit.models import ModelConfig
    from alignkit.module import AlignModule, OptimizerConfig
    from alignkit.rollout import SamplingConfig
    from alignkit_plugins.dpo import DPO
    from alignkit_plugins.ppo import PPO
    from alignkit_plugins.reward_model import RewardModel
    from alignkit_plugins.rewards import RewardModelReward
    from alignkit_plugins.sft import SFT

    algorithm_name, work, paths = spec["algorithm"], Workload(**spec["workload"]), spec["paths"]
    device = spec["device"]
    L.seed_everything(spec["seed"], verbose=False)
    recorder = StepRecorder(device)
    rss0 = current_rss()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    common = dict(batch_size=work.batch_size, max_length=work.max_length, max_prompt_length=work.max_prompt_length,
                  val_fraction=0.0, seed=spec["seed"], group_by_length=spec.get("group_by_length", False))
    policy = ModelConfig(name_or_path=paths["policy"], dtype=spec["dtype"])
    optimizer = OptimizerConfig(lr=1e-5)
    rm_shape = None
    shared_prompt = spec.get("shared_prompt", False) and algorithm_name in ("rm", "dpo")
    if algorithm_name == "sft":
        module = AlignModule(algorithm=SFT(), policy=policy, optimizer=optimizer)
        data = SFTData(path=paths["demonstrations"], **common)
    elif algorithm_name == "rm":
        module = AlignModule(algorithm=RewardModel(shared_prompt=shared_prompt), optimizer=optimizer,
                             policy=ModelConfig(name_or_path=paths["rm"], dtype=spec["dtype"]))
        data = PreferenceData(path=paths["preferences"], **common)
    elif algorithm_name == "dpo":
        module = AlignModule(algorithm=DPO(beta=0.1, shared_prompt=shared_prompt), policy=policy, optimizer=optimizer)
        data = PreferenceData(path=paths["preferences"], **common)
    elif algorithm_name == "ppo":
        sampling = SamplingConfig(max_new_tokens=work.max_new_tokens, temperature=1.0)
        algorithm = PPO(sampling=sampling, update_epochs=work.update_epochs, num_minibatches=1, seed=spec["seed"])
        reward = RewardModelReward(path=paths["rm"], batch_size=max(64, work.batch_size), dtype=spec["dtype"])
        module = AlignModule(algorithm=algorithm, policy=policy, optimizer=optimizer, rewards=[reward],
                             completions_per_step=0)
        rm_shape = model_shape(reward.model)
        data = PromptData(path=paths["prompts"], **common)
        _instrument_online(module, recorder)
    else:
        raise ValueError(f"unknown algorithm {algorithm_name!r}")
    steps = spec["warmup"] + spec["steps"]
    per_step = work.update_epochs if algorithm_name == "ppo" else 1
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        trainer = L.Trainer(
            max_steps=steps * per_step, accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1,
            precision=spec.get("precision") or "32-true", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            deterministic=spec.get("deterministic", True), callbacks=[_lightning_callback(recorder, shared_prompt)],
            default_root_dir=tmp,
        )
        trainer.fit(module, datamodule=data)
    if device.startswith("cuda"):
        peak = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20, "memory_kind": "cuda max_memory_allocated"}
    else:
        peak = {"peak_mem_mb": max(peak_rss() - rss0, 0) / 2**20, "peak_rss_mb": peak_rss() / 2**20,
                "memory_kind": "max RSS growth above the post-import RSS"}
    shape = model_shape(module.policy)
    result = {**recorder.summary(spec["warmup"]), **peak}
    return finish_result(spec, result, shape, rm_shape)


def finish_result(spec: dict[str, Any], result: dict[str, Any], shape: ModelShape,
                  rm_shape: ModelShape | None = None) -> dict[str, Any]:
    """Add FLOPs, throughputs, padding waste and MFU (roofline timed now, in this process) to a result.
    Every time-based figure exists on the wall clock and, suffixed ``_cpu``, on the process CPU clock."""
    algorithm, work = spec["algorithm"], Workload(**spec["workload"])
    per_step = result.get("per_step", [])
    for step in per_step:  # a trainer whose update is not timed on its own: the rest of the step
        for clock in ("time", "cpu"):
            if f"{clock}/rollout+score+experience" in step and f"{clock}/update" not in step:
                step[f"{clock}/update"] = step[f"{clock}/step"] - step[f"{clock}/rollout+score+experience"]
    if per_step:
        keys = sorted({k for s in per_step for k in s})
        result["median"] = {k: statistics.median(s.get(k, 0.0) for s in per_step) for k in keys}
    med = result.get("median", {})
    flops = [step_flops(algorithm, s, shape, rm_shape or shape, work, spec.get("reference", "live"))
             for s in per_step]
    result["params"] = shape.params
    result["matmul_params"] = shape.matmul_params
    result["flops_per_step"] = statistics.median(flops) if flops else 0.0
    real, padded = med.get("tokens/real", 0.0), med.get("tokens/padded", 0.0)
    result["pad_fraction"] = 1.0 - real / padded if padded else 0.0
    m = int(max(padded, 1))
    inner = _intermediate(spec)
    result["roofline_flops_per_s"], result["roofline_flops_per_s_cpu"] = time_matmul(
        m, shape.hidden, inner, spec["device"], compute_dtype(spec.get("precision"), spec["dtype"]),
        budget_s=0.05 if spec.get("smoke") else 0.3)
    result["roofline_shape"] = [m, shape.hidden, inner]
    rate = lambda amount, seconds: amount / seconds if seconds > 0 else 0.0  # noqa: E731
    for clock, suffix in (("time", ""), ("cpu", "_cpu")):
        step_time = med.get(f"{clock}/step", float("nan"))
        achieved = [rate(f, s[f"{clock}/step"]) for f, s in zip(flops, per_step)]
        result[f"flops_per_s{suffix}"] = statistics.median(achieved) if achieved else 0.0
        result[f"time_per_step_s{suffix}"] = step_time
        if algorithm == "ppo":
            generation = med.get(f"{clock}/rollout", 0.0)
            result[f"gen_tokens_per_s{suffix}"] = rate(med.get("tokens/generated", 0.0), generation)
            result[f"train_tokens_per_s{suffix}"] = rate(work.update_epochs * real, med.get(f"{clock}/update", 0.0))
            result[f"iteration_tokens_per_s{suffix}"] = rate(med.get("tokens/generated", 0.0), step_time)
        else:
            result[f"train_tokens_per_s{suffix}"] = rate(real, step_time)
        result[f"mfu{suffix}"] = result[f"flops_per_s{suffix}"] / result[f"roofline_flops_per_s{suffix}"]
    if algorithm == "ppo":
        result["generated_tokens_per_step"] = med.get("tokens/generated", 0.0)
    if not spec.get("keep_steps"):
        result.pop("per_step", None)
    return result


def compute_dtype(precision: str | None, dtype: str) -> str:
    """The dtype the matrix products run in (what the rooflines time): bfloat16 under ``bf16-mixed``, else ``dtype``."""
    return "bfloat16" if precision == "bf16-mixed" else dtype


def _intermediate(spec: dict[str, Any]) -> int:
    return int(spec["size"]["intermediate_size"])


def step_flops(algorithm: str, step: dict[str, float], shape: ModelShape, rm: ModelShape, work: Workload,
               reference: str = "live") -> float:
    """Model FLOPs of one step from its token counts (formulas in the module docstring); RM and DPO with
    ``shared_prompt`` count the tokens of the shared-prompt rows (each prompt once)."""
    real, length = step.get("tokens/real", 0.0), step.get("tokens/length", 0.0)
    if algorithm in ("rm", "dpo") and "tokens/computed" in step:
        real, length = step["tokens/computed"], step["tokens/computed_length"]
    if algorithm == "sft":
        return 3 * shape.forward(real, length)
    if algorithm == "rm":
        return 3 * shape.forward(real, length)
    if algorithm == "dpo":
        return 3 * shape.forward(real, length) + (shape.forward(real, length) if reference == "live" else 0.0)
    prompt, generated = step.get("tokens/prompt", 0.0), step.get("tokens/generated", 0.0)
    prompt_length = step.get("tokens/prompt_length", length)
    generation = shape.forward(prompt, prompt_length) + shape.forward(generated, length)
    experience = 2 * shape.forward(real, length) + rm.forward(real, length)
    return generation + experience + work.update_epochs * 3 * shape.forward(real, length)


# ============================================================================================ runners

def _load_benchmarks_module(name: str):
    """Import ``benchmarks/<name>.py`` (a folder of scripts beside the package, not a package itself)."""
    path = BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --compare needs a source checkout of alignkit")
    module_name = f"alignkit_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def resolve_runner(framework: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if framework.startswith("alignkit"):
        return run_alignkit
    if framework == "trl":
        return _load_benchmarks_module("trl_compare").run_trl
    raise ValueError(f"unknown framework {framework!r}")


def _child_env(threads: int | None = None, mmap_threshold: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if mmap_threshold:  # glibc: blocks above this are mmap'ed and returned to the OS when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env.update({"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
                "PYTHONWARNINGS": "ignore", "DISABLE_MLFLOW_INTEGRATION": "TRUE", "TQDM_DISABLE": "1",
                "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
    return env


def measure(spec: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run one measurement, in a fresh Python process when ``isolate`` (clean memory high-water mark)."""
    if not isolate:
        return _measure_here(spec)
    with tempfile.TemporaryDirectory(prefix="alignkit-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-c", "import sys, alignkit.bench as b; b.child_main(sys.argv[1], sys.argv[2])",
                   str(spec_path), str(out_path)]
        proc = subprocess.run(command, env=_child_env(spec.get("threads"), spec.get("mmap_threshold")), capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            return {"error": f"measurement failed (exit {proc.returncode}):\n{tail}"}
        return json.loads(out_path.read_text())


def _measure_here(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        return resolve_runner(spec["framework"])(spec)
    except ImportError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _import_framework(framework: str) -> None:
    """Import what a measurement will use, so that module imports (lazy ones included) are not counted as
    training memory on either side."""
    import datasets  # noqa: F401  (alignkit imports it lazily to read data files, TRL needs it)
    import lightning.pytorch  # noqa: F401
    import transformers  # noqa: F401

    if framework == "trl":
        with contextlib.suppress(ImportError):
            import trl

            for name in ("DPOTrainer", "RewardTrainer", "RLOOTrainer", "SFTTrainer"):
                getattr(trl, name)
    else:
        import transformers.optimization  # noqa: F401  (alignkit imports get_scheduler when it builds the optimiser)

        import alignkit.data  # noqa: F401
        import alignkit.module  # noqa: F401
        import alignkit_plugins.dpo  # noqa: F401
        import alignkit_plugins.ppo  # noqa: F401
        import alignkit_plugins.reward_model  # noqa: F401
        import alignkit_plugins.rewards  # noqa: F401
        import alignkit_plugins.sft  # noqa: F401


def child_main(spec_path: str, out_path: str) -> None:
    """Entry point of a measurement subprocess: read the spec, measure, write the result."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "transformers", "datasets", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    spec = json.loads(Path(spec_path).read_text())
    _import_framework(spec["framework"])  # imports first: the baseline RSS is measured after them
    result = _measure_here(spec)
    Path(out_path).write_text(json.dumps(result))


# ============================================================================================ the command

def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


def bench(
    algorithms: list[Algo] | None = None,
    sizes: list[ModelSize] | None = None,
    workload: Workload = Workload(),
    steps: int = 5,
    warmup: int = 2,
    repeats: int = 3,
    compare: list[Literal["trl"]] | None = None,
    group_by_length: bool = True,
    shared_prompt: bool = True,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    dtype: Literal["float32", "bfloat16"] = "float32",
    precision: Literal["32-true", "bf16-mixed"] = "32-true",
    threads: int | None = None,
    isolate: bool | None = None,
    smoke: bool = False,
    output: str | None = None,
    deterministic: bool = True,
    exact_memory: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Benchmark the SFT, reward-model, DPO and PPO stages: tokens/s, generation tokens/s, time per step,
    peak memory, FLOPs and MFU, optionally side by side with TRL. Prints a table, writes a JSON file.

    Args:
        algorithms: stages to measure (default: sft, rm, dpo, ppo).
        sizes: model shapes (default: tiny to ~25M parameters on CPU, 25M to ~300M on GPU).
        workload: batch size, sequence lengths and generated tokens (the same for every framework).
        steps: measured steps per measurement (after ``warmup`` steps that are not measured).
        warmup: steps run before measuring.
        repeats: measurements per (size, stage, framework), interleaved across frameworks; medians are reported.
        compare: other frameworks to measure on the same model, data and lengths (``trl``: DPOTrainer,
            RewardTrainer, RLOOTrainer; skipped with a message when trl is not installed).
        group_by_length: batch examples of similar length (less padding): alignkit's data modules'
            ``group_by_length`` and, with ``compare``, TRL's ``train_sampling_strategy="group_by_length"`` for SFT,
            RM and DPO (TRL's RLOO has no length grouping). False: uniformly shuffled batches on both sides.
        shared_prompt: alignkit's RM and DPO run each pair's prompt once (``shared_prompt`` of ``RewardModel`` and
            ``DPO``, off by default in recipes); their FLOPs and MFU count the tokens actually run.
        device: ``auto`` picks cuda when available.
        dtype: parameter dtype of every model and of the roofline matmul.
        precision: ``bf16-mixed``: bfloat16 autocast on both sides (alignkit's trainer ``precision``, TRL's
            ``bf16=True``, TRL's own default), float32 weights and optimiser; the rooflines then time bfloat16
            matrix products. ``32-true``: float32 compute (``dtype``) everywhere.
        threads: torch intra-op threads in every measurement (default: 1 on CPU, where a shared or
            oversubscribed machine makes multi-threaded small kernels erratic; torch's default on GPU).
        isolate: one subprocess per measurement, for clean peak-memory figures (default: true, false with smoke).
        smoke: tiny sizes, 2 steps, 1 repeat, in-process: a quick check that everything runs.
        output: JSON file to write (default: runs/bench/bench-<timestamp>.json).
        deterministic: run alignkit's trainer with ``deterministic=True``, the default of ``alignkit fit``.
        exact_memory: CPU peak memory that follows the live tensors: every measurement process runs with
            glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, so freed blocks leave the RSS at once instead of staying
            cached (the default allocator's caching moves the RSS high-water mark by ±50 MB between otherwise
            equal runs). It slows large allocations: compare memory, not times, from such a run.
        seed: seed of the models, data and sampling.
    """
    import torch

    algorithms = list(algorithms or ["sft", "rm", "dpo", "ppo"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads is None and device == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)  # the roofline is timed here, with the measurements' thread count
    if smoke:
        sizes = sizes or SMOKE_SIZES
        steps, warmup, repeats = min(steps, 2), 0, 1
        workload = Workload(batch_size=4, max_length=48, max_prompt_length=16, max_new_tokens=6,
                            update_epochs=1, num_pairs=32)
    sizes = sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES)
    isolate = (not smoke) if isolate is None else isolate
    frameworks: list[str] = ["alignkit"]
    messages: list[str] = []
    if "trl" in (compare or []):
        if trl_available():
            frameworks.append("trl")
        else:
            messages.append("trl is not installed: the TRL comparison is skipped (pip install trl)")
    for message in messages:
        print(f"[bench] {message}")
    report: dict[str, Any] = {"meta": environment(device, dtype, threads), "config": {
        "algorithms": algorithms, "sizes": [asdict(s) for s in sizes], "workload": asdict(workload), "steps": steps,
        "warmup": warmup, "repeats": repeats, "frameworks": frameworks, "group_by_length": group_by_length,
        "shared_prompt": shared_prompt, "isolate": isolate, "deterministic": deterministic, "exact_memory": exact_memory,
        "precision": precision},
        "messages": messages, "results": []}
    report["roofline_peak"] = peak_roofline(device, compute_dtype(precision, dtype), budget_s=0.05 if smoke else 1.0, side=256 if smoke else None)
    root = Path(tempfile.mkdtemp(prefix="alignkit-bench-assets-"))
    try:
        for size in sizes:
            paths = prepare_assets(root / size.name, size, workload, seed)
            for algorithm in algorithms:
                runs: dict[str, list[dict[str, Any]]] = {f: [] for f in frameworks}
                for repeat in range(repeats):
                    for framework in frameworks:  # interleaved: ours, theirs, ours, theirs, ...
                        spec = {"framework": framework, "algorithm": algorithm, "size": asdict(size),
                                "workload": asdict(workload), "paths": paths, "steps": steps, "warmup": warmup,
                                "device": device, "dtype": dtype, "precision": precision, "threads": threads,
                                "seed": seed + repeat,
                                "deterministic": deterministic, "smoke": smoke,
                                "mmap_threshold": 65536 if exact_memory else None,
                                "group_by_length": group_by_length, "shared_prompt": shared_prompt}
                        started = time.perf_counter()
                        result = measure(spec, isolate)
                        result["wall_s"] = time.perf_counter() - started
                        runs[framework].append(result)
                        _progress(size, algorithm, framework, repeat, result)
                for framework, results in runs.items():
                    if results:
                        report["results"].append(aggregate(size, algorithm, framework, results,
                                                           report["roofline_peak"]["flops_per_s"],
                                                           report["roofline_peak"]["flops_per_s_cpu"]))
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    report["ratios"] = ratios(report["results"])
    print_table(report)
    path = Path(output) if output else Path("runs") / "bench" / f"bench-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"[bench] results written to {path}")
    return report


def _progress(size: ModelSize, algorithm: str, framework: str, repeat: int, result: dict[str, Any]) -> None:
    if "error" in result:
        print(f"[bench] {size.name} {algorithm} {framework} #{repeat}: {result['error']}", flush=True)
    else:
        print(f"[bench] {size.name} {algorithm} {framework} #{repeat}: {result['time_per_step_s'] * 1e3:.1f} ms/step, "
              f"{result['train_tokens_per_s']:.0f} train tok/s, peak {result['peak_mem_mb']:.0f} MB", flush=True)


METRICS = tuple(f"{name}{suffix}" for name in ("time_per_step_s", "train_tokens_per_s", "gen_tokens_per_s",
                                                "iteration_tokens_per_s", "flops_per_s", "mfu")
                for suffix in ("", "_cpu")) + (
    "peak_mem_mb", "peak_rss_mb", "flops_per_step", "roofline_flops_per_s", "roofline_flops_per_s_cpu", "pad_fraction",
    "generated_tokens_per_step",
    "params")


def aggregate(size: ModelSize, algorithm: str, framework: str, results: list[dict[str, Any]],
              peak_flops: float, peak_flops_cpu: float | None = None) -> dict[str, Any]:
    """Medians over repeats of every metric (and the per-repeat values)."""
    ok = [r for r in results if "error" not in r]
    row: dict[str, Any] = {"size": size.name, "algorithm": algorithm, "framework": framework, "repeats": len(ok)}
    if not ok:
        row["error"] = results[0].get("error")
        return row
    for key in METRICS:
        values = [r[key] for r in ok if key in r]
        if values:
            row[key] = statistics.median(values)
            row[f"{key}/all"] = values
    row["mfu_peak"] = row.get("flops_per_s", 0.0) / peak_flops if peak_flops else 0.0
    peak_flops_cpu = peak_flops_cpu or peak_flops
    row["mfu_peak_cpu"] = row.get("flops_per_s_cpu", 0.0) / peak_flops_cpu if peak_flops_cpu else 0.0
    for clock, name in (("time/", "phases_s"), ("cpu/", "phases_cpu_s")):
        phases = sorted({k for r in ok for k in r.get("median", {}) if k.startswith(clock)})
        row[name] = {k.removeprefix(clock): statistics.median(r["median"].get(k, 0.0) for r in ok) for k in phases}
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours / theirs for each (size, stage): speed-up in time per step per token and memory ratio."""
    out = []
    keyed = {(r["size"], r["algorithm"], r["framework"]): r for r in rows if "error" not in r}
    for (size, algorithm, framework), theirs in keyed.items():
        ours = keyed.get((size, algorithm, "alignkit"))
        if framework == "alignkit" or ours is None:
            continue
        key = "iteration_tokens_per_s" if algorithm == "ppo" else "train_tokens_per_s"
        ratio = lambda k: ours.get(k, 0.0) / theirs[k] if theirs.get(k) else float("nan")  # noqa: E731
        out.append({"size": size, "algorithm": algorithm, "ours": "alignkit", "theirs": framework, "metric": key,
                    "speedup": ratio(key), "speedup_cpu": ratio(key + "_cpu"), "memory_ratio": ratio("peak_mem_mb")})
    return out


def environment(device: str, dtype: str, threads: int | None) -> dict[str, Any]:
    import torch
    import transformers
    import lightning

    meta = {"date": datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
            "device": device, "dtype": dtype, "cpu_count": os.cpu_count(), "threads": threads or torch.get_num_threads(),
            "machine": platform.machine()}
    if device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    if trl_available():
        from importlib.metadata import version

        meta["trl"] = version("trl")
    return meta


def _fmt(value: Any, scale: float = 1.0, digits: int = 0) -> str:
    if value is None or value != value:
        return "-"
    return f"{value * scale:,.{digits}f}"


def print_table(report: dict[str, Any]) -> None:
    """The results as a table: each time-based figure on the wall clock and on the CPU clock (``wall|cpu``)."""
    peak = report["roofline_peak"]["flops_per_s"]
    print(f"\n[bench] device {report['meta']['device']} ({report['meta']['dtype']}), "
          f"{report['meta']['threads']} threads; peak matmul {peak / 1e9:.1f}|"
          f"{report['roofline_peak']['flops_per_s_cpu'] / 1e9:.1f} GFLOP/s; medians of "
          f"{report['config']['repeats']} repeats; figures as wall|cpu clock")
    header = (f"{'size':<6} {'stage':<4} {'framework':<16} {'params':>6} {'ms/step':>13} {'train tok/s':>13} "
              f"{'gen tok/s':>11} {'pad%':>5} {'peak MB':>7} {'MFU %':>11} {'MFUpk %':>11}")
    print(header)
    print("-" * len(header))
    pair = lambda r, key, scale=1.0, digits=0: (  # noqa: E731
        f"{_fmt(r.get(key), scale, digits)}|{_fmt(r.get(key + '_cpu'), scale, digits)}")
    for r in report["results"]:
        if "error" in r:
            print(f"{r['size']:<6} {r['algorithm']:<4} {r['framework']:<16} error: {r['error'].splitlines()[-1]}")
            continue
        print(f"{r['size']:<6} {r['algorithm']:<4} {r['framework']:<16} {_fmt(r.get('params'), 1e-6, 1) + 'M':>6} "
              f"{pair(r, 'time_per_step_s', 1e3, 0):>13} {pair(r, 'train_tokens_per_s'):>13} "
              f"{pair(r, 'gen_tokens_per_s'):>11} {_fmt(r.get('pad_fraction'), 100, 1):>5} "
              f"{_fmt(r.get('peak_mem_mb')):>7} {pair(r, 'mfu', 100, 1):>11} {pair(r, 'mfu_peak', 100, 1):>11}")
    if report.get("ratios"):
        print("\nratios ours/theirs (medians): speed-up in tokens/s (online: generated tokens per second of "
              "iteration) on the wall|cpu clock; peak memory")
        for q in report["ratios"]:
            print(f"  {q['size']:<6} {q['algorithm']:<4} {q['ours']:<16} vs {q['theirs']:<4}: speed-up "
                  f"{q['speedup']:.2f}x|{q['speedup_cpu']:.2f}x, memory {q['memory_ratio']:.2f}x")
