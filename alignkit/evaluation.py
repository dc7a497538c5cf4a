"""``alignkit eval``: judge policies against a task's gold reward (simulated human feedback), or on your own
prompts (``--prompts file.jsonl``) without one.

Every policy samples one response per evaluation prompt with the same sampling settings and the same
seed, and is reported on

- the gold reward (mean and standard deviation over prompts): the quantity alignment should raise (only
  with a task: it provides the gold reward);
- the proxy reward of a reward plugin (e.g. a trained reward model): what an optimiser actually saw;
- KL(π‖π_ref) from the reference policy, estimated from the sampled tokens: the price paid;
- the gold win rate against the reference policy's responses to the same prompts (with a task), and the
  win rate under a judge (any reward plugin scoring both responses to each prompt);
- response length and distinct-1/2 (diversity), which expose length hacking and mode collapse;

plus a best-of-n baseline: the reference policy samples n responses per prompt, the proxy picks one,
and the gold reward of the picks tells how much a policy-free use of the proxy buys.

Shapes: ``B`` sequences, ``R`` response length.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from alignkit.data.formats import load_prompts
from alignkit.errors import ConfigError, RunExistsError
from alignkit.io import atomic_write_json
from alignkit.models.loading import ModelConfig, context_length, load_model
from alignkit.plugin import Reward
from alignkit.rollout import SamplingConfig, response_logprobs, sample_texts
from alignkit.task import Task
from alignkit.types import Rollout

#: Printed under a table of several policies: what one evaluation can and cannot say.
ONE_SEED_NOTE = ("one seed: ± is the spread over prompts, not over runs, so this table does not rank the policies; "
                 "for means and 95 % CIs over seeds at matched KL run `alignkit study --config recipes/study.yaml`")

#: Name under which a ``reference`` that is not one of the policies is evaluated.
REFERENCE_NAME = "reference"


# ------------------------------------------------------------------------------------------ metrics


def sequence_kl(policy_logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence estimate of KL(π‖π_ref) from one sampled response.

    For a response ``y = (y_1 … y_R)`` sampled from π, with ``m_t`` its mask::

        k(y) = Σ_t m_t · (log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))      (nats)

    Since ``E_{y∼π}[log π(y|x) − log π_ref(y|x)] = KL(π(·|x) ‖ π_ref(·|x))`` (the sequence
    log-probability is the sum of the token log-probabilities), ``k(y)`` is an unbiased Monte-Carlo
    estimate of the sequence-level KL when ``y`` is drawn from π itself (temperature 1, no top-k /
    top-p). A single estimate can be negative; only its mean over samples is a KL.

    Args:
        policy_logps: ``(B, R)`` log π of the sampled tokens.
        ref_logps: ``(B, R)`` log π_ref of the same tokens.
        mask: ``(B, R)`` 1 on response tokens, 0 on padding (padding values of the log-probs are ignored).

    Returns:
        ``(B,)`` per-sequence estimates, in float32 (float64 if an input is float64).
    """
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != mask.shape or policy_logps.dim() != 2:
        raise ValueError(f"policy_logps, ref_logps and mask must all be (B, R), got {tuple(policy_logps.shape)}, "
                         f"{tuple(ref_logps.shape)} and {tuple(mask.shape)}")
    dtype = torch.promote_types(torch.promote_types(policy_logps.dtype, ref_logps.dtype), torch.float32)
    diff = policy_logps.to(dtype) - ref_logps.to(dtype)
    return torch.where(mask.bool(), diff, torch.zeros_like(diff)).sum(-1)


def distinct_n(responses: list[str], n: int) -> float:
    """Distinct-n diversity (Li et al. 2016) of a set of responses.

    Each response is split on whitespace; its n-grams are the runs of ``n`` consecutive words (no
    n-gram crosses two responses)::

        distinct_n = |{all n-grams}| / Σ_responses #n-grams      (0 when there is no n-gram)

    1 means no n-gram is ever repeated, within or across responses; mode collapse drives it to 0.

    Args:
        responses: the texts.
        n: the n-gram order, ``>= 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen: set[tuple[str, ...]] = set()
    total = 0
    for response in responses:
        words = response.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def win_rate(gold_policy: list[float], gold_reference: list[float]) -> float:
    """Fraction of prompts on which the policy's response beats the reference's under the gold reward::

        win_rate = (1/N) Σ_i [ 1(g_i > h_i) + ½·1(g_i = h_i) ]

    with ``g_i`` / ``h_i`` the gold rewards of the policy's / the reference's response to prompt i
    (ties count one half, so a policy against itself scores exactly 0.5).

    Args:
        gold_policy: gold reward of the policy's response to each prompt.
        gold_reference: gold reward of the reference's response to the same prompts, in the same order.
    """
    if len(gold_policy) != len(gold_reference):
        raise ValueError(f"{len(gold_policy)} policy rewards but {len(gold_reference)} reference rewards")
    if not gold_policy:
        raise ValueError("win_rate needs at least one prompt")
    wins = sum(1.0 if g > h else 0.5 if g == h else 0.0 for g, h in zip(gold_policy, gold_reference))
    return wins / len(gold_policy)


def best_of_n_pick(proxy: list[float], gold: list[float], n: int) -> list[float]:
    """Gold reward of the best-of-n choice per prompt.

    ``proxy`` and ``gold`` hold ``n`` consecutive entries per prompt (prompt i owns entries
    ``[i·n, (i+1)·n)``); for each prompt the response with the highest proxy score is picked (the first
    one on a tie) and its gold reward returned.

    Args:
        proxy: proxy score of each response, ``P·n`` entries.
        gold: gold reward of each response, ``P·n`` entries.
        n: responses per prompt, ``>= 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(proxy) != len(gold) or len(proxy) % n:
        raise ValueError(f"proxy ({len(proxy)}) and gold ({len(gold)}) need the same length, a multiple of n={n}")
    picks = []
    for start in range(0, len(proxy), n):
        scores = proxy[start:start + n]
        picks.append(gold[start + scores.index(max(scores))])
    return picks


def best_of_n_kl(n: int) -> float:
    """``log n − (n − 1)/n``: the usual analytic value of KL(best-of-n ‖ π_ref) in nats (Stiennon et
    al. 2020); it is an upper bound on the true KL (Beirami et al. 2024), exact when no two samples tie."""
    return math.log(n) - (n - 1) / n


def best_of_n_means(proxy: list[float], gold: list[float], samples_per_prompt: int, ns: list[int]) -> dict[int, float]:
    """Mean gold reward of the best-of-n pick for each n in ``ns``, from one set of samples.

    ``proxy`` and ``gold`` hold ``N = samples_per_prompt`` consecutive entries per prompt (prompt i owns
    entries ``[i·N, (i+1)·N)``, as :func:`best_of_n_pick` reads them). For each n, prompt i's pick is the
    response with the highest proxy score among its *first* n samples (the first one on a tie)::

        j*_i(n) = argmax_{j < n} proxy[i·N + j]          bon(n) = (1/P) Σ_i gold[i·N + j*_i(n)]

    Args:
        proxy: proxy score of each response, ``P·N`` entries.
        gold: gold reward of each response, ``P·N`` entries.
        samples_per_prompt: ``N``, the responses sampled per prompt.
        ns: the n to report, each in ``[1, N]``.

    Returns:
        ``{n: bon(n)}`` in the order of ``ns``.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    if not ns or any(not 1 <= n <= samples_per_prompt for n in ns):
        raise ValueError(f"ns must be a non-empty list of n in [1, {samples_per_prompt}], got {ns}")
    if len(proxy) != len(gold) or not proxy or len(proxy) % samples_per_prompt:
        raise ValueError(f"proxy ({len(proxy)}) and gold ({len(gold)}) need the same non-zero length, a multiple "
                         f"of samples_per_prompt={samples_per_prompt}")
    curve = {}
    for n in ns:
        # the first n entries of each prompt's group, still n consecutive entries per prompt
        firsts = [k for k in range(len(proxy)) if k % samples_per_prompt < n]
        curve[n] = _mean(best_of_n_pick([proxy[k] for k in firsts], [gold[k] for k in firsts], n))
    return curve


# ------------------------------------------------------------------------------------------ results


@dataclass
class EvalResult:
    """What ``alignkit eval`` reports for one policy (means are over the evaluation prompts)."""

    name: str
    """The policy's name (a key of ``policies``)."""
    gold_mean: float | None
    """Mean gold reward of its responses (None without a task)."""
    gold_std: float | None
    """Standard deviation of the gold reward over prompts (divisor N; None without a task)."""
    proxy_mean: float | None
    """Mean score under the proxy reward plugin (None without one)."""
    kl_mean: float
    """Mean per-sequence estimate of KL(π‖π_ref) in nats (see :func:`sequence_kl`)."""
    win_rate: float | None
    """Gold win rate against the reference policy's responses (None for the reference itself, or without a
    task)."""
    response_len_mean: float
    """Mean response length in tokens (the stop token included)."""
    distinct_1: float
    distinct_2: float
    best_of_n_gold: float | None
    """Mean gold reward of the proxy's best-of-n pick among the policy's samples (reference only)."""
    num_prompts: int
    judge_win_rate: float | None = None
    """Win rate against the reference policy's responses under the judge reward plugin (ties ½; None for the
    reference itself, or without a judge)."""

    def metrics(self) -> dict[str, float]:
        """The logged metrics (``eval/*`` names); entries whose value is None are left out."""
        values = {
            "eval/gold_reward": self.gold_mean,
            "eval/gold_reward_std": self.gold_std,
            "eval/proxy_reward": self.proxy_mean,
            "eval/kl": self.kl_mean,
            "eval/win_rate": self.win_rate,
            "eval/response_len": self.response_len_mean,
            "eval/distinct_1": self.distinct_1,
            "eval/distinct_2": self.distinct_2,
            "eval/best_of_n_gold": self.best_of_n_gold,
            "eval/judge_win_rate": self.judge_win_rate,
        }
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class Samples:
    """One policy's samples on a list of prompts, scored, flattened over the generation batches."""

    responses: list[str]
    """The decoded responses, one per prompt, in prompt order."""
    gold: list[float] | None
    """The task's gold reward of each response (None without a task)."""
    proxy: list[float] | None
    """The proxy reward plugin's score of each response (None without a proxy)."""
    kl: list[float]
    """Per-sequence estimate of KL(π‖π_ref) of each response (see :func:`sequence_kl`)."""
    lengths: list[int]
    """Response length in tokens (the stop token included)."""


# ------------------------------------------------------------------------------------------ helpers


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def with_task_stop(sampling: SamplingConfig, task: Task) -> SamplingConfig:
    """``sampling`` with the task's stop string added to its ``stop_strings`` (unchanged when the task has
    none or it is already there)."""
    if task.stop and task.stop not in sampling.stop_strings:
        return replace(sampling, stop_strings=[*sampling.stop_strings, task.stop])
    return sampling


@torch.no_grad()
def _proxy_scores(reward: Reward, rollout: Rollout) -> list[float]:
    out = reward.score(rollout.prompts, rollout.responses, rollout)
    scores = out.scores.detach().float().reshape(-1).cpu().tolist()
    if len(scores) != len(rollout.responses):
        raise ValueError(f"reward {reward.name!r} returned {len(scores)} scores for "
                         f"{len(rollout.responses)} responses")
    return scores


def sample_responses(model, tokenizer, prompts: list[str], sampling: SamplingConfig, batch_size: int,
                     seed: int) -> list[Rollout]:
    """One response per prompt (batches of ``batch_size``), drawn with a fresh ``torch.Generator`` seeded with
    ``seed`` on the model's device: the global RNG is neither used nor advanced, and two models with the same
    weights give the same samples. Returns one :class:`Rollout` per batch."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return sample_texts(model, tokenizer, prompts, sampling, batch_size, generator)


@torch.no_grad()
def score_samples(rollouts: list[Rollout], ref_model: torch.nn.Module | None, task: Task | None,
                  reward: Reward | None, temperature: float) -> Samples:
    """Gold, proxy and the KL estimate of every sampled response.

    Args:
        rollouts: the policy's samples (:func:`sample_responses`); their ``logprobs`` are log π.
        ref_model: the reference policy π_ref, run once over each rollout's sequences (in eval mode, its mode
            restored afterwards); None when the rollouts were sampled from the reference itself, whose KL
            estimate is then exactly 0 (log π_ref is the rollout's own log π) without a forward pass.
        task: gold reward (None: no gold scores).
        reward: proxy reward plugin (None: no proxy scores).
        temperature: the sampling temperature, at which log π_ref is taken.
    """
    responses, prompts, kl, lengths, proxy = [], [], [], [], []
    was_training = ref_model.training if ref_model is not None else False
    if ref_model is not None:
        ref_model.eval()
    try:
        for ro in rollouts:
            if ref_model is None:  # the reference itself: log π_ref is log π, already computed
                ref_logps = ro.logprobs
            else:
                ref_logps = response_logprobs(ref_model, ro.sequences, ro.attention_mask, ro.prompt_length,
                                              temperature)
            kl += sequence_kl(ro.logprobs, ref_logps, ro.response_mask).cpu().tolist()
            lengths += ro.response_mask.sum(-1).cpu().tolist()
            responses += ro.responses
            prompts += ro.prompts
            if reward is not None:
                proxy += _proxy_scores(reward, ro)
    finally:
        if ref_model is not None:
            ref_model.train(was_training)
    gold = task.gold_rewards(prompts, responses) if task is not None else None
    return Samples(responses, gold, proxy if reward is not None else None, kl, lengths)


def best_of_n_curve(model, tokenizer, prompts: list[str], task: Task, reward: Reward, ns: list[int],
                    sampling: SamplingConfig, batch_size: int = 64, seed: int = 0) -> dict[int, float]:
    """Gold reward of best-of-n under a proxy reward, for several n from one set of samples.

    Each prompt ``x_i`` (``i < P``) gets ``N = max(ns)`` responses ``y_{i,0} … y_{i,N−1}`` from ``model``, all drawn
    in one pass with a single generator seeded with ``seed`` (the prompts repeated ``N`` times in a row, in
    batches of ``batch_size``). With ``r`` the proxy ``reward`` and ``g`` the task's gold reward, the pick for
    n is the proxy-best among the *first* n samples (the first one on a tie)::

        j*_i(n) = argmax_{j < n} r(x_i, y_{i,j})          curve[n] = (1/P) Σ_i g(x_i, y_{i, j*_i(n)})

    so the samples behind n are a prefix of those behind any larger n (the points of the curve share their
    randomness). ``curve[1]`` is the mean gold of plain samples; the KL from ``model`` of best-of-n is about
    :func:`best_of_n_kl`.

    Args:
        model: the sampled policy (usually the reference / SFT policy), on its device.
        tokenizer: its tokenizer.
        prompts: the prompts ``x_i``.
        task: gold reward; its stop string is added to ``sampling`` if it has one.
        reward: the proxy reward plugin that picks, on the model's device.
        ns: the n to report (each >= 1).
        sampling: sampling settings.
        batch_size: sequences per generation batch.
        seed: seed of the sampling generator.

    Returns:
        ``{n: mean gold of the best-of-n picks}`` in the order of ``ns``.
    """
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"ns must be a non-empty list of n >= 1, got {ns}")
    if not prompts:
        raise ValueError("best_of_n_curve needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampling = with_task_stop(sampling, task)
    largest = max(ns)
    repeated = [p for p in prompts for _ in range(largest)]
    samples = score_samples(sample_responses(model, tokenizer, repeated, sampling, batch_size, seed), None, task,
                            reward, sampling.temperature)
    assert samples.proxy is not None and samples.gold is not None
    return best_of_n_means(samples.proxy, samples.gold, largest, ns)


def _check_same_vocabulary(tokenizer, ref_tokenizer, name: str) -> None:
    if tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ConfigError(f"policy {name!r} and the reference use different vocabularies; KL(π‖π_ref) needs "
                          f"both to score the same token ids")


def _resolve_reference(policies: dict[str, str], reference: str | None) -> tuple[dict[str, str], str]:
    """(policies with the reference among them, the reference's name)."""
    if not policies:
        raise ConfigError("policies is empty: give at least one name -> model directory / HF name")
    if reference is None:
        return dict(policies), next(iter(policies))
    if reference in policies:
        return dict(policies), reference
    for name, path in policies.items():
        if path == reference:
            return dict(policies), name
    if REFERENCE_NAME in policies:
        raise ConfigError(f"reference {reference!r} is neither a policy name nor a policy path, and the name "
                          f"{REFERENCE_NAME!r} it would get is taken")
    return {REFERENCE_NAME: reference, **policies}, REFERENCE_NAME


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "policy"


def _format(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(results: dict[str, EvalResult], reference: str) -> str:
    """One row per policy: gold and gold win rate (with a task), proxy, KL, judge win rate (with a judge), length,
    distinct-2."""
    width = max(len("policy"), *(len(n) + (4 if n == reference else 0) for n in results))
    gold = any(r.gold_mean is not None for r in results.values())
    judged = any(r.judge_win_rate is not None for r in results.values())
    columns: list[tuple[str, int, Any]] = [  # (header, width, cell of a result)
        *([("gold", 15, lambda r: f"{r.gold_mean:.3f} ± {r.gold_std:.3f}")] if gold else []),
        ("proxy", 8, lambda r: _format(r.proxy_mean, ".3f")),
        ("KL", 8, lambda r: f"{r.kl_mean:.3f}"),
        *([("win rate", 8, lambda r: _format(r.win_rate, ".1%"))] if gold else []),
        *([("judge win", 9, lambda r: _format(r.judge_win_rate, ".1%"))] if judged else []),
        ("length", 7, lambda r: f"{r.response_len_mean:.1f}"),
        ("distinct-2", 10, lambda r: f"{r.distinct_2:.3f}"),
    ]
    lines = [f"{'policy':<{width}}" + "".join(f"  {header:>{w}}" for header, w, _ in columns)]
    for name, r in results.items():
        label = f"{name} (*)" if name == reference else name
        lines.append(f"{label:<{width}}" + "".join(f"  {cell(r):>{w}}" for _, w, cell in columns))
    lines.append("(*) reference: KL and win rates are measured against it")
    return "\n".join(lines)


def _loggers(out: Path, name: str, settings: dict[str, Any], use_wandb: bool) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers: list = [CSVLogger(save_dir=str(out), name="logs", version=_slug(name))]
    if use_wandb:
        os.environ.setdefault("WANDB_SILENT", "true")
        group = out.name
        loggers.append(WandbLogger(project="alignkit", save_dir=str(out), offline=True, group=group,
                                   tags=["eval"], name=f"{group}/{name}", job_type="eval",
                                   config={**settings, "policy": name}))
    return loggers


def _log(out: Path, name: str, result: EvalResult, settings: dict[str, Any], use_wandb: bool) -> None:
    """Log one policy's ``eval/*`` metrics (step 0) to its own CSV log and wandb run."""
    for logger in _loggers(out, name, settings, use_wandb):
        logger.log_hyperparams({**settings, "policy": name})
        logger.log_metrics(result.metrics(), step=0)
        logger.finalize("success")
        if getattr(logger, "_experiment", None) is not None and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # the next policy gets its own wandb run


# ------------------------------------------------------------------------------------------ command


def evaluate(policies: dict[str, str], task: Task | None = None, prompts: str | None = None,
             reference: str | None = None, reward: Reward | None = None, judge: Reward | None = None,
             sampling: SamplingConfig = SamplingConfig(max_new_tokens=24, temperature=1.0), best_of_n: int = 0,
             num_prompts: int | None = None, batch_size: int = 64, seed: int = 0, run_dir: str | None = None,
             wandb: bool = False) -> dict[str, EvalResult]:
    """Evaluate policies on a task's evaluation prompts against its gold reward (simulated feedback), or on your
    own prompts (``prompts``) with no task.

    Every policy samples one response per prompt with the same sampling settings and a generator
    seeded with ``seed`` (on the model's device: CUDA when available, else CPU), and is scored on:
    gold reward (mean, std; with a task), the proxy ``reward`` (mean), KL(π‖π_ref) (mean over prompts of the sum
    over response tokens of log π − log π_ref, both from one forward pass at ``sampling.temperature``:
    unbiased at temperature 1 without top-k / top-p; with another temperature it is the KL between the
    tempered distributions), gold win rate against the reference policy's responses (ties ½; with a task), win
    rate under the ``judge`` (ties ½), response length in tokens, distinct-1/2. With ``best_of_n`` > 0, a
    ``reward`` and a task, the reference also samples n responses per prompt and the gold reward of the proxy's
    pick is reported. Writes ``metrics.json`` and per-policy CSV logs (``logs/<policy>/metrics.csv``) to the run
    directory, prints a table and returns the results by policy name.

    Args:
        policies: name -> model directory (e.g. a stage's ``model/``) or HF name, evaluated in this order.
        task: the task whose evaluation prompts and gold reward are used (None: give ``prompts``; no gold).
        prompts: your own prompts instead of the task's: a ``.jsonl``/``.json`` file of rows with a ``prompt``
            field or of plain strings (or a parquet file / data set with a ``prompt`` column). Prompts longer
            than the reference model's context less ``sampling.max_new_tokens`` keep their last tokens (counted
            in the output). With a task too, its gold reward scores the responses to these prompts.
        reference: the reference policy π_ref for KL and win rate: a name in ``policies``, or a model
            directory / HF name (evaluated too, as "reference", unless it is one of the policies' paths).
            Default: the first policy. Its tokenizer's vocabulary must be every policy's.
        reward: proxy reward plugin (any ``Reward`` subclass, e.g. a reward model) scored on every
            response; None skips the proxy metrics and best-of-n.
        judge: a reward plugin that compares each policy's response with the reference's response to the same
            prompt (the higher score wins, ties ½): ``eval/judge_win_rate``. None: no judge.
        sampling: sampling settings shared by all policies (the task's stop string is added if it has one).
            KL is an unbiased estimate only when sampling from the policy itself: temperature 1, no
            top-k / top-p, do_sample true (greedy decoding gives the log-ratio of the greedy response).
        best_of_n: n of the best-of-n baseline on the reference under ``reward`` (0: off; needs a task).
        num_prompts: evaluate on the first this many prompts (None: all of them).
        batch_size: prompts per generation batch.
        seed: seed of the sampling; the same for every policy, so identical policies give identical samples.
        run_dir: output folder (default: runs/eval/<timestamp>); must not hold a metrics.json already.
        wandb: also log each policy's metrics to its own offline wandb run (project "alignkit",
            group = the run directory's name, tag "eval").
    """
    if best_of_n < 0:
        raise ConfigError(f"best_of_n must be >= 0, got {best_of_n}")
    if best_of_n and reward is None:
        raise ConfigError("best_of_n needs a proxy reward (--reward) to pick the best of the n samples")
    if best_of_n and task is None:
        raise ConfigError("best_of_n needs a task (--task): its gold reward scores the best-of-n picks")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if task is None and prompts is None:
        raise ConfigError("give --task (its evaluation prompts and gold reward) or --prompts FILE (your own prompts)")
    policies, ref_name = _resolve_reference(policies, reference)
    if prompts is not None:
        texts, origin = load_prompts(prompts), f"prompts from {prompts}"
    else:
        assert task is not None  # checked above: --task or --prompts
        texts, origin = task.eval_prompts(), f"{task.name} prompts"
    if num_prompts is not None:
        if not 1 <= num_prompts <= len(texts):
            where = f"the prompts of {prompts}" if prompts is not None else "the task's evaluation prompts"
            raise ConfigError(f"num_prompts must lie in [1, {len(texts)}] ({where}), got {num_prompts}")
        texts = texts[:num_prompts]
    if not texts:
        assert task is not None  # load_prompts refuses a file without prompts
        raise ConfigError(f"task {task.name!r} has no evaluation prompts")
    if task is not None:
        sampling = with_task_stop(sampling, task)

    from alignkit.run import METRICS_FILE, default_run_dir  # Lightning: not for ``alignkit eval --help``

    out = Path(run_dir) if run_dir else default_run_dir("eval")
    if (out / METRICS_FILE).exists():
        raise RunExistsError(f"run directory {out} already holds an evaluation ({METRICS_FILE}); choose another "
                             f"--run_dir (nothing was overwritten)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings: dict[str, Any] = {
        "task": task.name if task is not None else None, "task_seed": task.seed if task is not None else None,
        "prompts": prompts, "num_prompts": len(texts), "reference": ref_name,
        "policies": dict(policies), "reward": _plugin_name(reward), "judge": _plugin_name(judge),
        "sampling": asdict(sampling), "best_of_n": best_of_n,
        "best_of_n_kl": best_of_n_kl(best_of_n) if best_of_n else None, "batch_size": batch_size,
        "seed": seed, "device": str(device),
    }
    for plugin in (reward, judge):
        if plugin is not None:
            plugin.to(device).eval()

    def load(path: str):
        model, tokenizer = load_model(ModelConfig(name_or_path=path), "causal_lm")
        # (transformers' @wraps(nn.Module.to) hides the method from mypy)
        return cast(nn.Module, model).to(device).eval(), tokenizer

    ref_model, ref_tokenizer = load(policies[ref_name])
    if prompts is not None:
        texts, cut = fit_prompts(texts, ref_tokenizer, context_length(ref_model), sampling.max_new_tokens)
        settings["prompts_truncated"] = cut
        if cut:
            print(f"[eval] {cut} of {len(texts)} prompts are longer than the model's context less "
                  f"{sampling.max_new_tokens} new tokens: they keep their last tokens")
    samples: dict[str, Samples] = {}
    judged: dict[str, list[float]] = {}
    best_of_n_gold: float | None = None
    for name in [ref_name, *(n for n in policies if n != ref_name)]:  # the reference first: others need it
        if policies[name] == policies[ref_name]:
            model, tokenizer = ref_model, ref_tokenizer
        else:
            model, tokenizer = load(policies[name])
            _check_same_vocabulary(tokenizer, ref_tokenizer, name)
        rollouts = sample_responses(model, tokenizer, texts, sampling, batch_size, seed)
        samples[name] = score_samples(rollouts, None if model is ref_model else ref_model, task, reward,
                                      sampling.temperature)
        if judge is not None:
            judged[name] = [score for ro in rollouts for score in _proxy_scores(judge, ro)]
        if name == ref_name and best_of_n:
            assert reward is not None and task is not None  # checked above
            best_of_n_gold = best_of_n_curve(model, tokenizer, texts, task, reward, [best_of_n], sampling,
                                             batch_size, seed)[best_of_n]
        del model, rollouts
        if device.type == "cuda":
            torch.cuda.empty_cache()

    results: dict[str, EvalResult] = {}
    for name in policies:  # in the caller's order
        s, ref = samples[name], samples[ref_name]
        results[name] = EvalResult(
            name=name, gold_mean=_mean(s.gold) if s.gold is not None else None,
            gold_std=statistics.pstdev(s.gold) if s.gold is not None else None,
            proxy_mean=_mean(s.proxy) if s.proxy is not None else None, kl_mean=_mean(s.kl),
            win_rate=None if name == ref_name or s.gold is None or ref.gold is None else win_rate(s.gold, ref.gold),
            response_len_mean=_mean([float(n) for n in s.lengths]), distinct_1=distinct_n(s.responses, 1),
            distinct_2=distinct_n(s.responses, 2), best_of_n_gold=best_of_n_gold if name == ref_name else None,
            num_prompts=len(texts),
            judge_win_rate=None if name == ref_name or judge is None else win_rate(judged[name], judged[ref_name]),
        )

    for name, result in results.items():
        _log(out, name, result, settings, wandb)
    atomic_write_json(out / METRICS_FILE, {
        "settings": settings,
        "policies": {
            name: {"path": policies[name], **asdict(r), "metrics": r.metrics()} for name, r in results.items()
        },
    })
    print(_table(results, ref_name))
    if best_of_n_gold is not None:
        print(f"best-of-{best_of_n} under the proxy on {ref_name}: gold {best_of_n_gold:.3f} "
              f"(KL ≤ {best_of_n_kl(best_of_n):.3f})")
    if len(results) > 1:
        print(ONE_SEED_NOTE)
    if task is None:
        print("[eval] no task: no gold reward; give --task for gold and gold win rates")
    print(f"[eval] {len(results)} policies on {len(texts)} {origin} -> {out / METRICS_FILE}")
    return results


def _plugin_name(plugin: Reward | None) -> str | None:
    return None if plugin is None else f"{type(plugin).__module__}.{type(plugin).__qualname__}"


def fit_prompts(prompts: list[str], tokenizer, context: int | None, max_new_tokens: int) -> tuple[list[str], int]:
    """Prompts that fit the model's ``context`` with ``max_new_tokens`` to spare: a longer one keeps its last
    tokens (decoded back to text, as :class:`alignkit.data.PromptData` truncates). Returns (prompts, how many
    were cut); with no known context, the prompts unchanged."""
    if context is None:
        return list(prompts), 0
    from alignkit.data.tokenize import encode_prompt

    room = context - max_new_tokens
    if room < 1:
        raise ConfigError(f"sampling.max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {context} tokens")
    out, cut = [], 0
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, False)
        if len(ids) > room:
            prompt, cut = tokenizer.decode(ids[-room:]), cut + 1
        out.append(prompt)
    return out, cut


__all__ = ["EvalResult", "Samples", "best_of_n_curve", "best_of_n_kl", "best_of_n_means", "best_of_n_pick",
           "distinct_n", "evaluate", "fit_prompts", "sample_responses", "score_samples", "sequence_kl", "win_rate",
           "with_task_stop"]
