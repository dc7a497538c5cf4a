"""``alignkit iterate``: iterative RLHF (Bai et al. 2022's iterated online RLHF, Llama 2's rounds).

Each round ``k = 1, 2, …`` runs these steps in ``<run_dir>/round_k/``:

==========  ==========================================================================================
``sample``  the current policy (the SFT model in round 1, then round k−1's policy) samples two responses
            to ``prompts_per_round`` fresh train prompts → ``samples.jsonl``
``label``   the labeller picks the better response of each pair → ``labels.jsonl`` (this round's labels)
            and ``all_labels.jsonl`` (the union of rounds 1..k: labels accumulate)
``rm``      a reward model trained on ``all_labels.jsonl``, from round k−1's reward model
            (``rm_init=warm_start``) or from the SFT model (``retrain``) → ``rm/``
``ppo``     PPO from the current policy against that reward model, with the KL penalty towards the SFT
            model (``kl_anchor=sft``) or the current policy (``previous``) → ``ppo/``
``dpo``     (``method=dpo``, instead of rm and ppo) DPO from the current policy on the labels, the same
            KL anchor as reference → ``dpo/``
``eval``    the new policy and the SFT policy on the task's evaluation prompts: gold reward, proxy
            reward (this round's reward model), KL from the SFT policy → ``eval/``
==========  ==========================================================================================

then ``metrics.json`` (the round's summary) marks the round finished. Which rounds and steps are finished
is read from these files (:class:`RoundState`), never stored separately: running the same command again
resumes at the first unfinished step, and a larger ``rounds`` continues a finished run. The per-round
summaries are logged, step = round, to ``<run_dir>/curves/metrics.csv`` and to one offline wandb run in
the run's wandb group (the rounds' training runs join the same group). Once every requested round is
finished, ``<run_dir>/metrics.json`` collects their summaries (so a pipeline stage running ``iterate``
counts as finished, as any other stage).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from alignkit import (
    METRICS_FILE,
    MODEL_DIR,
    ModelConfig,
    PreferencePair,
    RunExistsError,
    SamplingConfig,
    Task,
    atomic_write_json,
    default_run_dir,
    derive_seed,
    evaluate,
    finish_wandb_run,
    fit,
    label_summary,
    load_model,
    read_jsonl,
    sample_pairs,
    write_jsonl,
)
from alignkit_plugins.iterative.labellers import LabelContext, Labelled, Labeller
from alignkit_plugins.rewards.model import RewardModelReward, resolve_model_dir

Method = Literal["rm_ppo", "dpo"]
RMInit = Literal["warm_start", "retrain"]
KLAnchor = Literal["sft", "previous"]

SAMPLES_FILE = "samples.jsonl"
LABELS_FILE = "labels.jsonl"
ALL_LABELS_FILE = "all_labels.jsonl"
SETTINGS_FILE = "iterate.json"
CURVES_DIR = "curves"
#: The steps of a round, in order, by method.
STEPS: dict[str, tuple[str, ...]] = {"rm_ppo": ("sample", "label", "rm", "ppo", "eval"),
                                     "dpo": ("sample", "label", "dpo", "eval")}
#: Settings that must not change when a run is resumed (``rounds`` may grow; recipes and args may change).
RESUME_KEYS = ("sft", "task", "method", "rm_init", "kl_anchor", "dpo_data", "prompts_per_round", "seed")


# ------------------------------------------------------------------------------------------ bookkeeping


def round_dir(run_dir: Path, index: int) -> Path:
    """The folder of round ``index`` (from 1)."""
    return run_dir / f"round_{index}"


def step_marker(round_path: Path, step: str) -> Path:
    """The file whose presence means ``step`` finished: the sample and label files (written atomically,
    ``all_labels.jsonl`` last), or the ``metrics.json`` a finished fit/eval stage writes last."""
    if step == "sample":
        return round_path / SAMPLES_FILE
    if step == "label":
        return round_path / ALL_LABELS_FILE
    return round_path / step / METRICS_FILE


@dataclass(frozen=True)
class RoundState:
    """Which steps of one round are finished, as read from its folder."""

    index: int
    path: Path
    steps: tuple[str, ...]
    """The round's steps in order (see :data:`STEPS`)."""
    done: tuple[str, ...]
    """The finished steps, a prefix of ``steps``."""
    finished: bool
    """The round's ``metrics.json`` exists (every step done and summarised)."""

    @classmethod
    def read(cls, run_dir: Path, index: int, method: Method) -> RoundState:
        """The state of round ``index`` of ``run_dir``. Raises RunExistsError if the folder is inconsistent
        (a step finished after an unfinished one, e.g. a file removed by hand)."""
        path, steps = round_dir(run_dir, index), STEPS[method]
        marks = [step_marker(path, s).exists() for s in steps]
        done = tuple(s for s, m in zip(steps, marks) if m)
        finished = (path / METRICS_FILE).exists()
        if done != steps[:len(done)] or (finished and len(done) < len(steps)):
            missing = next(s for s, m in zip(steps, marks) if not m)
            raise RunExistsError(f"{path}: step {missing!r} is unfinished but later steps ({', '.join(done)}) or the "
                                 f"round summary are there (a file was removed by hand?); remove the later steps' "
                                 f"outputs (or the whole {path.name}) to redo them, or use another run_dir")
        return cls(index, path, steps, done, finished)

    @property
    def pending(self) -> tuple[str, ...]:
        """The steps still to run, in order."""
        return self.steps[len(self.done):]


def check_settings(run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Record the run's settings in ``iterate.json`` on the first call; on a resume, refuse settings that
    differ from the recorded ones in a :data:`RESUME_KEYS` key. Returns the recorded settings (which keep
    the first call's wandb run id)."""
    path = run_dir / SETTINGS_FILE
    if not path.is_file():
        recorded = {**settings, "wandb_id": f"iterate-{secrets.token_hex(4)}"}
        atomic_write_json(path, recorded)
        return recorded
    recorded = json.loads(path.read_text())
    changed = [f"{k}: {recorded.get(k)!r} -> {settings[k]!r}" for k in RESUME_KEYS if recorded.get(k) != settings[k]]
    if changed:
        raise RunExistsError(f"{run_dir} holds an iterative run with other settings ({'; '.join(changed)}); resume "
                             f"it with the recorded settings ({path}) or choose another run_dir")
    return {**settings, "wandb_id": recorded["wandb_id"]}


# ------------------------------------------------------------------------------------------ pure helpers


def round_prompts(train_prompts: list[str], index: int, per_round: int) -> list[str]:
    """The ``per_round`` train prompts of round ``index`` (from 1): consecutive slices, so rounds see fresh
    prompts, wrapping around the list once it is used up."""
    if not 1 <= per_round <= len(train_prompts):
        raise ValueError(f"prompts_per_round must lie in [1, {len(train_prompts)}] (the task's train prompts), "
                         f"got {per_round}")
    start = (index - 1) * per_round
    return [train_prompts[(start + i) % len(train_prompts)] for i in range(per_round)]


def policy_after(run_dir: Path, index: int, sft: str, method: Method) -> str:
    """The policy a round ends with (round 0: the SFT model)."""
    return sft if index == 0 else str(round_dir(run_dir, index) / ("ppo" if method == "rm_ppo" else "dpo") / MODEL_DIR)


def rm_start(run_dir: Path, index: int, sft: str, rm_init: RMInit) -> str:
    """Where round ``index``'s reward model starts: the previous round's reward model (``warm_start``, from
    round 2 on) or the SFT model."""
    if rm_init == "warm_start" and index > 1:
        return str(round_dir(run_dir, index - 1) / "rm" / MODEL_DIR)
    return sft


def kl_reference(sft: str, index: int, kl_anchor: KLAnchor) -> str | None:
    """The reference model of round ``index``'s policy optimisation, as a path to pass, or None for the
    default (a frozen copy of the initial policy, i.e. the previous round's policy). In round 1 the
    initial policy is the SFT model, so no path is needed either way."""
    return sft if kl_anchor == "sft" and index > 1 else None


def label_records(labelled: list[Labelled], task: Task, index: int, labeller: str) -> list[dict[str, Any]]:
    """Uniform JSON rows of labelled pairs: prompt, chosen, rejected, their gold rewards (from the task),
    p_chosen (None when the labeller gives none), the round and the labeller's class name, and ``soft_label``
    (the reward model's target P(chosen ≻ rejected)) when the labeller gives one."""
    rows = []
    for i, item in enumerate(labelled):
        row = asdict(item) if isinstance(item, PreferencePair) else dict(item)
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ValueError(f"labeller {labeller} returned pair {i} without a non-empty string {key!r}: {row}")
        p = row.get("p_chosen")
        rows.append({
            "prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"],
            "gold_chosen": task.gold_reward(row["prompt"], row["chosen"]),
            "gold_rejected": task.gold_reward(row["prompt"], row["rejected"]),
            "p_chosen": None if p is None else float(p), "round": index, "labeller": labeller,
            **({"soft_label": float(row["soft_label"])} if row.get("soft_label") is not None else {}),
        })
    return rows


def as_pairs(rows: list[dict[str, Any]]) -> list[PreferencePair]:
    """Label rows back as PreferencePair (p_chosen NaN where the labeller gave none)."""
    return [PreferencePair(r["prompt"], r["chosen"], r["rejected"], r["gold_chosen"], r["gold_rejected"],
                           math.nan if r["p_chosen"] is None else r["p_chosen"]) for r in rows]


def round_metrics(index: int, evaluation: dict[str, Any], labels: list[dict], all_labels: list[dict],
                  times: dict[str, float]) -> dict[str, Any]:
    """The summary of a round from its ``eval/metrics.json`` content and its label rows.

    ``eval/*`` are the new policy's metrics (KL from the SFT policy), ``eval/sft_*`` the SFT policy's. The
    proxy–gold gap is how much more the proxy (this round's reward model, the one the policy was optimised
    against) credits the policy's improvement over the SFT policy than the gold reward does::

        eval/proxy_gold_gap = (proxy − proxy_sft) − (gold − gold_sft)

    (in reward-model units minus gold units; it grows when the policy exploits the reward model). Absent
    without a proxy (method dpo).
    """
    policy = evaluation["policies"]["policy"]["metrics"]
    sft = evaluation["policies"]["sft"]["metrics"]
    summary = label_summary(as_pairs(labels))
    metrics: dict[str, Any] = {
        "round": index,
        "labels/pairs": summary["pairs"],
        "labels/total": len(all_labels),
        "labels/agree_with_gold": summary["labels/agree_with_gold"],
        **policy,
        "eval/sft_gold_reward": sft["eval/gold_reward"],
    }
    if "eval/proxy_reward" in policy:
        metrics["eval/sft_proxy_reward"] = sft["eval/proxy_reward"]
        metrics["eval/proxy_gold_gap"] = ((policy["eval/proxy_reward"] - sft["eval/proxy_reward"])
                                          - (policy["eval/gold_reward"] - sft["eval/gold_reward"]))
    metrics["time"] = {f"{step}_s": round(seconds, 2) for step, seconds in times.items()}
    return metrics


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a round summary (what the loggers get)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_table(summaries: list[dict[str, Any]]) -> str:
    """One line per finished round: labels, gold, proxy, gap, KL, win rate."""
    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.3f}" if key in m else "-"

    lines = [f"{'round':>5}  {'labels':>6}  {'gold':>7}  {'sft gold':>8}  {'proxy':>7}  {'gap':>7}  {'KL':>7}  "
             f"{'win rate':>8}"]
    for m in summaries:
        lines.append(f"{m['round']:>5}  {m['labels/total']:>6}  {cell(m, 'eval/gold_reward'):>7}  "
                     f"{cell(m, 'eval/sft_gold_reward'):>8}  {cell(m, 'eval/proxy_reward'):>7}  "
                     f"{cell(m, 'eval/proxy_gold_gap'):>7}  {cell(m, 'eval/kl'):>7}  {cell(m, 'eval/win_rate'):>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ steps


@dataclass(frozen=True)
class Plan:
    """Everything the steps of a round need (the options of :func:`iterate`, resolved)."""

    run_dir: Path
    sft: str
    task: Task
    labeller: Labeller
    method: Method
    rm_init: RMInit
    kl_anchor: KLAnchor
    dpo_data: Literal["all", "round"]
    prompts_per_round: int
    recipes: dict[str, str]
    """Recipe path of each fit step (rm, ppo, dpo)."""
    stage_args: dict[str, list[str]]
    """Extra arguments of each fit step, after the shared ``fit_args``."""
    fit_args: list[str]
    sampling: SamplingConfig
    eval_prompts: int | None
    batch_size: int
    seed: int
    group: str
    wandb: bool


def run_sample(plan: Plan, index: int) -> None:
    """Two responses per round prompt from the current policy → ``samples.jsonl`` (prompt, a, b)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy = policy_after(plan.run_dir, index - 1, plan.sft, plan.method)
    model, tokenizer = load_model(ModelConfig(name_or_path=policy), "causal_lm")
    model.to(device).eval()
    prompts = round_prompts(plan.task.train_prompts(), index, plan.prompts_per_round)
    prompts, first, second = sample_pairs(model, tokenizer, prompts, plan.sampling, plan.batch_size,
                                          plan.seed + index)
    if not prompts:
        raise ValueError(f"round {index}: every sampled pair had two identical responses; raise "
                         f"prompts_per_round or the sampling temperature")
    write_jsonl(round_dir(plan.run_dir, index) / SAMPLES_FILE,
                [{"prompt": p, "a": a, "b": b} for p, a, b in zip(prompts, first, second)])


def run_label(plan: Plan, index: int) -> None:
    """The labeller labels the round's samples → ``labels.jsonl``, then the union of rounds 1..index →
    ``all_labels.jsonl``."""
    path = round_dir(plan.run_dir, index)
    samples = read_jsonl(path / SAMPLES_FILE)
    context = LabelContext(plan.task, index, path, plan.seed)
    labelled = plan.labeller.label([s["prompt"] for s in samples], [s["a"] for s in samples],
                                   [s["b"] for s in samples], context)
    name = type(plan.labeller).__name__
    rows = label_records(labelled, plan.task, index, name)
    if not rows:
        raise ValueError(f"round {index}: labeller {name} labelled none of the {len(samples)} pairs")
    write_jsonl(path / LABELS_FILE, rows)
    union = [r for k in range(1, index + 1) for r in read_jsonl(round_dir(plan.run_dir, k) / LABELS_FILE)]
    write_jsonl(path / ALL_LABELS_FILE, union)


def fit_step_args(plan: Plan, index: int, step: str) -> list[str]:
    """The ``alignkit fit`` arguments of a fit step (rm, ppo or dpo) of round ``index``."""
    path = round_dir(plan.run_dir, index)
    policy = policy_after(plan.run_dir, index - 1, plan.sft, plan.method)
    reference = kl_reference(plan.sft, index, plan.kl_anchor)
    if step == "rm":
        specific = [f"--model.policy.name_or_path={rm_start(plan.run_dir, index, plan.sft, plan.rm_init)}",
                    f"--data.init_args.path={path / ALL_LABELS_FILE}"]
    elif step == "ppo":
        rm = path / "rm" / MODEL_DIR
        specific = [f"--model.policy.name_or_path={policy}",
                    f"--model.rewards=[{{class_path: alignkit_plugins.rewards.RewardModelReward, "
                    f"init_args: {{path: {rm}}}}}]"]
    else:
        data = path / (ALL_LABELS_FILE if plan.dpo_data == "all" else LABELS_FILE)
        specific = [f"--model.policy.name_or_path={policy}", f"--data.init_args.path={data}"]
    if step != "rm" and reference is not None:
        specific.append(f"--model.reference.name_or_path={reference}")
    # the run's seed drives every step's randomness (its own role per round and step); fit_args may override it
    shared = [f"--seed_everything={derive_seed(plan.seed, f'round_{index}.{step}')}", f"--experiment={plan.group}",
              *([] if plan.wandb else ["--wandb=false"])]
    return ["--config", plan.recipes[step], *specific, *shared, *plan.fit_args, *plan.stage_args[step],
            "--run_dir", str(path / step)]


def run_fit(plan: Plan, index: int, step: str) -> None:
    """One fit step; a folder left by an interrupted attempt (no metrics.json) is cleared first."""
    stage = round_dir(plan.run_dir, index) / step
    if stage.exists():
        print(f"[iterate] round {index}: removing the unfinished {step} attempt in {stage}")
        shutil.rmtree(stage)
    fit(fit_step_args(plan, index, step))  # alignkit.fit closes its wandb run, even on failure


def run_eval(plan: Plan, index: int) -> None:
    """The new policy and the SFT policy on the evaluation prompts, KL from the SFT policy, proxy = this
    round's reward model (none with method dpo)."""
    path = round_dir(plan.run_dir, index)
    if (path / "eval").exists():
        shutil.rmtree(path / "eval")
    reward = RewardModelReward(path=str(path / "rm" / MODEL_DIR)) if plan.method == "rm_ppo" else None
    evaluate({"sft": plan.sft, "policy": policy_after(plan.run_dir, index, plan.sft, plan.method)}, plan.task,
             reference="sft", reward=reward, sampling=plan.sampling, num_prompts=plan.eval_prompts,
             batch_size=plan.batch_size, seed=plan.seed, run_dir=str(path / "eval"), wandb=False)


def run_step(plan: Plan, index: int, step: str) -> None:
    """Run one step of round ``index``."""
    print(f"[iterate] round {index}: {step}")
    if step == "sample":
        run_sample(plan, index)
    elif step == "label":
        run_label(plan, index)
    elif step == "eval":
        run_eval(plan, index)
    else:
        run_fit(plan, index, step)


def summarise(plan: Plan, index: int, times: dict[str, float]) -> dict[str, Any]:
    """Write the round's ``metrics.json`` (which marks it finished) and return it."""
    path = round_dir(plan.run_dir, index)
    metrics = round_metrics(index, json.loads((path / "eval" / METRICS_FILE).read_text()),
                            read_jsonl(path / LABELS_FILE), read_jsonl(path / ALL_LABELS_FILE), times)
    atomic_write_json(path / METRICS_FILE, metrics)
    return metrics


# ------------------------------------------------------------------------------------------ curves


class Curves:
    """Per-round metrics through Lightning loggers, step = round: ``<run_dir>/curves/metrics.csv``
    (rebuilt from the finished rounds on every call, so it always matches the folders) and, when
    enabled, one offline wandb run in the run's group that only receives newly finished rounds (a resumed
    run continues the same wandb run id; ``wandb sync`` the offline folders in order)."""

    def __init__(self, run_dir: Path, group: str, settings: dict[str, Any], use_wandb: bool):
        from lightning.pytorch.loggers import CSVLogger

        self.run_dir, self.group, self.settings, self.use_wandb = run_dir, group, settings, use_wandb
        shutil.rmtree(run_dir / CURVES_DIR, ignore_errors=True)
        self.csv = CSVLogger(save_dir=str(run_dir), name=CURVES_DIR, version="")
        self.csv.log_hyperparams(settings)
        self.wandb = None

    def replay(self, metrics: dict[str, Any]) -> None:
        """A round finished by an earlier call: to the CSV only."""
        self.csv.log_metrics(scalars(metrics), step=int(metrics["round"]))
        self.csv.save()

    def log(self, metrics: dict[str, Any]) -> None:
        """A round finished now: to the CSV and wandb."""
        self.replay(metrics)
        if self.use_wandb:
            if self.wandb is None:
                from lightning.pytorch.loggers import WandbLogger

                finish_wandb_run()  # a run left open would receive these metrics instead
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = WandbLogger(project="alignkit", save_dir=str(self.run_dir), offline=True,
                                         group=self.group, name=f"{self.group}/rounds", job_type="iterate",
                                         tags=["iterate", self.settings["method"]], id=self.settings["wandb_id"],
                                         resume="allow", config=self.settings)
            self.wandb.log_metrics(scalars(metrics), step=int(metrics["round"]))

    def close(self) -> None:
        """Flush the CSV and end the wandb run (if one was started)."""
        self.csv.finalize("success")
        if self.wandb is not None:
            self.wandb.experiment.finish()


# ------------------------------------------------------------------------------------------ command


def iterate(sft: str, task: Task, labeller: Labeller, rounds: int = 3, prompts_per_round: int = 500,
            rm_init: RMInit = "warm_start", kl_anchor: KLAnchor = "sft", method: Method = "rm_ppo",
            dpo_data: Literal["all", "round"] = "all", rm_recipe: str = "recipes/reward_model.yaml",
            ppo_recipe: str = "recipes/ppo_rlhf.yaml", dpo_recipe: str = "recipes/dpo.yaml",
            fit_args: list[str] | None = None, rm_args: list[str] | None = None,
            ppo_args: list[str] | None = None, dpo_args: list[str] | None = None,
            sampling: SamplingConfig = SamplingConfig(max_new_tokens=24), eval_prompts: int | None = None,
            batch_size: int = 64, seed: int = 0, run_dir: str | None = None, experiment: str | None = None,
            wandb: bool = True) -> Path:
    """Iterative RLHF: each round samples from the current policy, labels the new pairs, refreshes the
    reward model on every label so far, runs PPO from the current policy (or DPO with method=dpo) and
    evaluates against the gold reward. Finished rounds and steps are skipped, so the same command resumes
    a stopped run (e.g. after filling a FileLabeller's to_label.jsonl) and a larger rounds continues it.

    Args:
        sft: the SFT model directory (e.g. ``runs/qs1/sft/model``), or the SFT run folder holding it.
        task: the task whose train prompts are labelled and whose gold reward judges each round.
        labeller: who labels the pairs: AnnotatorLabeller (simulated), JudgeLabeller (AI feedback) or
            FileLabeller (human labels through round_k/to_label.jsonl; the run stops until it is filled).
        rounds: number of rounds.
        prompts_per_round: train prompts sampled (two responses each) and labelled per round; pairs with
            two identical responses are left out.
        rm_init: start each round's reward model from the previous round's (warm_start) or the SFT model.
        kl_anchor: the KL reference of PPO/DPO: the SFT model, or the previous round's policy.
        method: rm_ppo (reward model + PPO) or dpo (iterative/online DPO on the labels, no reward model).
        dpo_data: with method=dpo, train on all labels so far (all) or on this round's only (round).
        rm_recipe: reward-model recipe (paths are relative to the working directory).
        ppo_recipe: PPO recipe; its prompt data should be the same task.
        dpo_recipe: DPO recipe.
        fit_args: extra ``alignkit fit`` arguments for every training step, e.g. ``--trainer.max_steps=50``.
        rm_args: extra arguments for the reward-model steps (after fit_args).
        ppo_args: extra arguments for the PPO steps.
        dpo_args: extra arguments for the DPO steps.
        sampling: sampling of the pairs to label and of the evaluation (the task's stop string is added).
        eval_prompts: evaluate on the first this many evaluation prompts (None: all).
        batch_size: prompts per generation batch (sampling and evaluation).
        seed: the run's seed: of the sampling (round k samples with seed + k; evaluation always with seed), of
            each fit step (``--seed_everything=derive_seed(seed, "round_<k>.<step>")``, before ``fit_args``) and of
            the labeller's seeds left unset (e.g. the annotator's, ``derive_seed(seed, "annotator")``).
        run_dir: output folder (default: runs/iterate/<timestamp>); one round_k/ folder per round.
        experiment: wandb group of the run and of its rounds' training runs (default: run_dir's name).
        wandb: log to wandb offline (the per-round curves and, unless fit_args say otherwise, the training runs).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    sft_dir = resolve_model_dir(sft)
    if not (Path(sft_dir) / "config.json").is_file():
        raise FileNotFoundError(f"sft {sft!r}: no model there (config.json missing); pass an SFT stage's model/ "
                                f"folder, e.g. --sft=runs/<run>/sft/model")
    round_prompts(task.train_prompts(), 1, prompts_per_round)  # validates prompts_per_round
    recipes = {"rm": rm_recipe, "ppo": ppo_recipe, "dpo": dpo_recipe}
    for step in STEPS[method]:
        if step in recipes and not Path(recipes[step]).is_file():
            raise FileNotFoundError(f"{step} recipe {recipes[step]} does not exist (recipe paths are relative to "
                                    f"the working directory)")
    if task.stop and task.stop not in sampling.stop_strings:
        sampling = replace(sampling, stop_strings=[*sampling.stop_strings, task.stop])

    root = Path(run_dir) if run_dir else default_run_dir("iterate")
    group = experiment or root.name
    settings = check_settings(root, {
        "sft": str(Path(sft_dir).resolve()),
        "task": f"{type(task).__module__}.{type(task).__qualname__}(seed={task.seed})",
        "labeller": f"{type(labeller).__module__}.{type(labeller).__qualname__}", "method": method,
        "rm_init": rm_init, "kl_anchor": kl_anchor, "dpo_data": dpo_data, "prompts_per_round": prompts_per_round,
        "seed": seed, "rounds": rounds, "recipes": recipes, "fit_args": list(fit_args or []),
        "sampling": asdict(sampling), "eval_prompts": eval_prompts,
    })
    plan = Plan(root, sft_dir, task, labeller, method, rm_init, kl_anchor, dpo_data, prompts_per_round, recipes,
                {"rm": list(rm_args or []), "ppo": list(ppo_args or []), "dpo": list(dpo_args or [])},
                list(fit_args or []), sampling, eval_prompts, batch_size, seed, group, wandb)

    curves = Curves(root, group, settings, wandb)
    summaries = []
    try:
        for index in range(1, rounds + 1):
            state = RoundState.read(root, index, method)
            if state.finished:
                print(f"[iterate] round {index}: already finished in {state.path}, skipped")
                summaries.append(json.loads((state.path / METRICS_FILE).read_text()))
                curves.replay(summaries[-1])
                continue
            times = {}
            for step in state.pending:
                started = time.perf_counter()
                run_step(plan, index, step)
                times[step] = time.perf_counter() - started
            summaries.append(summarise(plan, index, times))
            curves.log(summaries[-1])
    finally:
        curves.close()
    atomic_write_json(root / METRICS_FILE, {"rounds": len(summaries), "final": scalars(summaries[-1]),
                                            "per_round": summaries, "settings": settings})
    print(format_table(summaries))
    print(f"[iterate] {len(summaries)} round(s) in {root} (per-round curves: {root / CURVES_DIR / 'metrics.csv'})")
    return root


__all__ = ["RoundState", "iterate", "round_metrics", "round_prompts"]
