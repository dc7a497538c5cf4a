"""Tests for ``alignkit eval``: the metric functions against hand computations (the KL estimator against
an exact enumeration), and the command end to end on two tiny models."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignkit import commands
from alignkit.evaluation import (
    EvalResult,
    best_of_n_kl,
    best_of_n_pick,
    distinct_n,
    evaluate,
    sequence_kl,
    win_rate,
)
from alignkit.models.tiny import TinyModelConfig, build_tiny_model
from alignkit.plugin import Reward, RewardOutput
from alignkit.rollout import SamplingConfig, generate, left_pad, response_logprobs
from alignkit.run import RunExistsError
from alignkit_plugins.tasks import SentimentTask

METRIC_NAMES = {"eval/gold_reward", "eval/gold_reward_std", "eval/proxy_reward", "eval/kl", "eval/win_rate",
                "eval/response_len", "eval/distinct_1", "eval/distinct_2", "eval/best_of_n_gold"}


class CountWords(Reward):
    """An outside reward plugin: the number of times ``word`` occurs in the response (of all words when
    ``word`` is None)."""

    def __init__(self, word: str | None = None, name: str | None = None, weight: float = 1.0):
        super().__init__(name, weight)
        self.word = word

    def score(self, prompts, responses, rollout):
        counts = [len(r.split()) if self.word is None else r.split().count(self.word) for r in responses]
        return RewardOutput(self.reward_name, torch.tensor(counts, dtype=torch.float32))


# ----------------------------------------------------------------------------- KL: explicit tables


def test_sequence_kl_matches_exact_kl_of_explicit_distributions():
    """Two-token horizon over 4 tokens, token 0 stops the response after one token."""
    g = torch.Generator().manual_seed(0)
    V, N = 4, 40_000
    pi1, ref1 = torch.tensor([0.1, 0.5, 0.3, 0.1], dtype=torch.float64), torch.full((V,), 0.25, dtype=torch.float64)
    pi2 = torch.softmax(2 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)  # pi2[y1, y2] = π(y2 | y1)
    ref2 = torch.softmax(torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    lp1, lq1, lp2, lq2 = pi1.log(), ref1.log(), pi2.log(), ref2.log()

    exact = sum(pi1[a] * (lp1[a] - lq1[a]) for a in range(V))
    exact += sum(pi1[a] * pi2[a, b] * (lp2[a, b] - lq2[a, b]) for a in range(1, V) for b in range(V))
    exact = float(exact)

    y1 = torch.multinomial(pi1, N, replacement=True, generator=g)
    y2 = torch.multinomial(pi2[y1], 1, generator=g).squeeze(-1)
    mask = torch.stack([torch.ones(N), (y1 != 0).double()], dim=1)
    policy = torch.stack([lp1[y1], lp2[y1, y2]], dim=1)
    ref = torch.stack([lq1[y1], lq2[y1, y2]], dim=1)
    garbage = torch.where(mask.bool(), 0.0, 123.0)  # padded positions must be ignored whatever they hold
    kl = sequence_kl(policy + garbage, ref - garbage, mask)

    assert kl.shape == (N,) and kl.dtype == torch.float64
    for i in range(50):  # per sequence: exactly the hand log-prob difference
        a, b = int(y1[i]), int(y2[i])
        hand = float(lp1[a] - lq1[a]) + (float(lp2[a, b] - lq2[a, b]) if a != 0 else 0.0)
        assert float(kl[i]) == hand
    stderr = float(kl.std()) / math.sqrt(N)
    assert exact > 0.1
    assert abs(float(kl.mean()) - exact) < 4 * stderr, (float(kl.mean()), exact, stderr)


def test_sequence_kl_shapes_and_dtype():
    logps = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert sequence_kl(logps, logps, torch.ones(2, 3)).dtype == torch.float32
    with pytest.raises(ValueError):
        sequence_kl(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


# ----------------------------------------------------------------------------- KL: tiny model, enumerated

PAD, EOS, VOCAB = 0, 1, 8


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def vocab8_model(seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         initializer_range=0.6, pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def next_logprobs(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


@torch.no_grad()
def test_rollout_kl_estimate_matches_enumeration_on_tiny_model():
    """Sampling two tokens from a vocabulary-8 model (EOS ends early): the estimate from generate's
    log-probs and response_logprobs of the reference matches the exact KL by enumeration."""
    policy, ref, tokenizer = vocab8_model(0), vocab8_model(1), word_tokenizer()
    prompt = [4, 5, 2]
    table_p, table_q = {}, {}  # response tuple -> sequence log-prob
    first_p, first_q = next_logprobs(policy, prompt), next_logprobs(ref, prompt)
    for a in range(VOCAB):
        if a == EOS:
            table_p[(a,)], table_q[(a,)] = float(first_p[a]), float(first_q[a])
            continue
        second_p, second_q = next_logprobs(policy, prompt + [a]), next_logprobs(ref, prompt + [a])
        for b in range(VOCAB):
            table_p[(a, b)] = float(first_p[a] + second_p[b])
            table_q[(a, b)] = float(first_q[a] + second_q[b])
    assert abs(sum(math.exp(v) for v in table_p.values()) - 1.0) < 1e-5
    exact = sum(math.exp(lp) * (lp - table_q[y]) for y, lp in table_p.items())

    N = 3000
    ids, mask = left_pad([prompt] * N, PAD)
    rollout = generate(policy, tokenizer, ids, mask, [""] * N, SamplingConfig(max_new_tokens=2),
                       torch.Generator().manual_seed(0))
    ref_logps = response_logprobs(ref, rollout.sequences, rollout.attention_mask, rollout.prompt_length, 1.0)
    kl = sequence_kl(rollout.logprobs, ref_logps, rollout.response_mask)

    for i in range(40):
        y = tuple(rollout.response_ids[i, :int(rollout.response_mask[i].sum())].tolist())
        assert float(kl[i]) == pytest.approx(table_p[y] - table_q[y], abs=1e-5)
    stderr = float(kl.std()) / math.sqrt(N)
    assert exact > 0.05
    assert abs(float(kl.mean()) - exact) < 4 * stderr, (float(kl.mean()), exact, stderr)


# ----------------------------------------------------------------------------- other metrics


def test_distinct_n():
    responses = ["a b a b", "a b c"]
    assert distinct_n(responses, 1) == pytest.approx(3 / 7)  # {a, b, c} of 7 words
    assert distinct_n(responses, 2) == pytest.approx(3 / 5)  # {ab, ba, bc} of ab ba ab | ab bc
    assert distinct_n(["x y", "z"], 2) == 1.0  # "z" has no bigram; none crosses responses
    assert distinct_n([], 1) == 0.0 and distinct_n(["", "one"], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(responses, 0)


def test_win_rate():
    assert win_rate([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 5.0, 1.0]) == pytest.approx(2.5 / 4)
    assert win_rate([1.0, -1.0], [1.0, -1.0]) == 0.5
    assert win_rate([2.0], [1.0]) == 1.0 and win_rate([0.0], [1.0]) == 0.0
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_best_of_n_pick_and_kl():
    assert best_of_n_pick([1, 3, 3, 0, -1, 2], [10, 20, 30, 1, 2, 3], 3) == [20, 3]  # first max on ties
    assert best_of_n_pick([5.0], [7.0], 1) == [7.0]
    with pytest.raises(ValueError):
        best_of_n_pick([1, 2, 3], [1, 2, 3], 2)
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_eval_result_metrics_names():
    r = EvalResult("p", 1.0, 0.5, None, 0.2, None, 7.0, 0.9, 0.8, None, 4)
    assert set(r.metrics()) == METRIC_NAMES - {"eval/proxy_reward", "eval/win_rate", "eval/best_of_n_gold"}


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """Two saved tiny models sharing one tokenizer: the initialisation and a perturbed copy."""
    root = tmp_path_factory.mktemp("models")
    model, tokenizer = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64))
    paths = []
    for name, noise in (("base", 0.0), ("perturbed", 0.3)):
        if noise:
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(noise * torch.randn(p.shape, generator=g))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths.append(str(root / name))
    return paths[0], paths[1]


def test_evaluate_end_to_end(tiny_models, tmp_path, capsys):
    base, perturbed = tiny_models
    task = SentimentTask(num_train_prompts=10, num_eval_prompts=8)
    run_dir = tmp_path / "eval"
    results = evaluate({"sft": base, "noisy": perturbed, "sft_copy": base}, task, reward=CountWords(),
                       sampling=SamplingConfig(max_new_tokens=8), best_of_n=3, num_prompts=6, batch_size=4,
                       run_dir=str(run_dir))

    assert list(results) == ["sft", "noisy", "sft_copy"]
    sft, noisy, copy = results["sft"], results["noisy"], results["sft_copy"]
    assert sft.kl_mean == 0.0 and copy.kl_mean == 0.0  # the reference (first policy) against itself
    assert sft.win_rate is None and sft.best_of_n_gold is not None and math.isfinite(sft.best_of_n_gold)
    # same seed for every policy: an identical policy draws identical samples
    assert copy.win_rate == 0.5 and copy.gold_mean == sft.gold_mean and copy.proxy_mean == sft.proxy_mean
    assert noisy.kl_mean != 0.0 and math.isfinite(noisy.kl_mean)
    assert 0.0 <= noisy.win_rate <= 1.0 and noisy.best_of_n_gold is None
    for r in results.values():
        assert r.num_prompts == 6 and 1 <= r.response_len_mean <= 8 and 0 <= r.distinct_2 <= 1
        assert r.proxy_mean is not None and r.gold_std >= 0

    data = json.loads((run_dir / "metrics.json").read_text())
    assert set(data) == {"settings", "policies"} and set(data["policies"]) == {"sft", "noisy", "sft_copy"}
    assert data["settings"]["reference"] == "sft" and data["settings"]["best_of_n"] == 3
    assert data["settings"]["reward"].endswith("CountWords") and data["settings"]["sampling"]["max_new_tokens"] == 8
    assert set(data["policies"]["sft"]["metrics"]) == METRIC_NAMES - {"eval/win_rate"}
    assert set(data["policies"]["noisy"]["metrics"]) == METRIC_NAMES - {"eval/best_of_n_gold"}
    assert data["policies"]["noisy"]["kl_mean"] == noisy.kl_mean and data["policies"]["noisy"]["path"] == perturbed

    with open(run_dir / "logs" / "noisy" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["eval/win_rate"]) == noisy.win_rate
    table = capsys.readouterr().out
    assert "sft (*)" in table and "noisy" in table and "best-of-3" in table

    with pytest.raises(RunExistsError):  # a finished evaluation is never overwritten
        evaluate({"sft": base}, task, sampling=SamplingConfig(max_new_tokens=2), run_dir=str(run_dir))


def test_evaluate_through_the_cli(tiny_models, tmp_path, monkeypatch):
    """The command-line path: jsonargparse builds the task and an outside reward plugin from class paths;
    a reference given as a path that is not a policy is evaluated as "reference"; with --wandb each
    policy gets its own offline wandb run."""
    base, perturbed = tiny_models
    monkeypatch.setitem(commands.COMMANDS, "eval", evaluate)
    reward = {"class_path": f"{CountWords.__module__}.CountWords", "init_args": {"word": "the"}}
    results = commands.run("eval", [
        "--policies", json.dumps({"noisy": perturbed}), "--reference", base,
        "--task", "alignkit_plugins.tasks.SentimentTask", "--task.num_train_prompts", "10",
        "--task.num_eval_prompts", "8", "--reward", json.dumps(reward), "--sampling.max_new_tokens", "4",
        "--num_prompts", "4", "--best_of_n", "2", "--run_dir", str(tmp_path / "cli"), "--wandb", "true",
    ])
    assert list(results) == ["reference", "noisy"]
    assert results["reference"].kl_mean == 0.0 and results["reference"].best_of_n_gold is not None
    assert 0.0 <= results["noisy"].win_rate <= 1.0 and results["noisy"].num_prompts == 4
    settings = json.loads((tmp_path / "cli" / "metrics.json").read_text())["settings"]
    assert settings["policies"] == {"reference": base, "noisy": perturbed}
    assert len(list((tmp_path / "cli" / "wandb").glob("offline-run-*"))) == 2


def test_evaluate_argument_errors(tiny_models, tmp_path):
    base, _ = tiny_models
    task = SentimentTask(num_train_prompts=10, num_eval_prompts=8)
    with pytest.raises(ValueError, match="best_of_n"):
        evaluate({"sft": base}, task, best_of_n=2, run_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="num_prompts"):
        evaluate({"sft": base}, task, num_prompts=9, run_dir=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="empty"):
        evaluate({}, task, run_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- your own prompts, no task

PROMPTS = ["Write a haiku about the sea.", "What's 2 + 2?", "Name three #hashtags you'd use.", "Hello!"]


def test_load_prompts_reads_rows_or_plain_strings(tmp_path):
    from alignkit.data.formats import DataError, load_prompts

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    strings = tmp_path / "strings.jsonl"
    strings.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(PROMPTS))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n" + "".join(json.dumps(p) + "\n" for p in PROMPTS[1:]))
    assert load_prompts(str(rows)) == load_prompts(str(strings)) == load_prompts(str(listed)) == PROMPTS
    assert load_prompts(str(mixed)) == PROMPTS
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": ["a", "list"]}) + "\n")
    with pytest.raises(DataError, match=r"prompts '.*bad\.jsonl' row 2: 'prompt' must be non-empty text, got a list"):
        load_prompts(str(bad))
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "hi"}) + "\n")
    with pytest.raises(DataError, match=r"no 'prompt' field; found question"):
        load_prompts(str(other))


def test_evaluate_own_prompts_without_a_task(tiny_models, tmp_path, capsys):
    """No task: no gold, no gold win rate; proxy, KL, length, distinct-n and the judge's win rate. An identical
    policy ties the reference on every prompt under any judge: judge win rate exactly 0.5."""
    base, perturbed = tiny_models
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    results = evaluate({"sft": base, "noisy": perturbed, "copy": base}, prompts=str(path), reward=CountWords(),
                       judge=CountWords(name="judge"), sampling=SamplingConfig(max_new_tokens=6), batch_size=4,
                       run_dir=str(tmp_path / "eval"))
    sft, noisy, copy = results["sft"], results["noisy"], results["copy"]
    assert sft.gold_mean is None and sft.gold_std is None and noisy.win_rate is None
    assert sft.kl_mean == 0.0 and sft.judge_win_rate is None and copy.judge_win_rate == 0.5
    assert 0.0 <= noisy.judge_win_rate <= 1.0 and noisy.kl_mean != 0.0 and noisy.proxy_mean is not None
    assert all(r.num_prompts == 4 and 1 <= r.response_len_mean <= 6 for r in results.values())
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert data["settings"]["task"] is None and data["settings"]["prompts"] == str(path)
    assert data["settings"]["judge"].endswith("CountWords") and data["settings"]["prompts_truncated"] == 0
    assert set(data["policies"]["noisy"]["metrics"]) == {"eval/proxy_reward", "eval/kl", "eval/judge_win_rate",
                                                         "eval/response_len", "eval/distinct_1", "eval/distinct_2"}
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["policy", "proxy", "KL", "judge", "win", "length", "distinct-2"]  # no gold columns
    assert "[eval] no task: no gold reward" in out and f"3 policies on 4 prompts from {path}" in out


def test_evaluate_own_prompts_through_the_cli(tiny_models, tmp_path, monkeypatch):
    """`alignkit eval --prompts FILE` with plain-string rows, a judge given by class path, and a prompt longer
    than the tiny model's context (256 positions) less the new tokens: it keeps its last 256 - 4 tokens."""
    base, perturbed = tiny_models
    monkeypatch.setitem(commands.COMMANDS, "eval", evaluate)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps("review : the pizza " * 100) + "\n" + json.dumps("Hello!") + "\n")
    judge = {"class_path": f"{CountWords.__module__}.CountWords", "init_args": {"word": "the"}}
    results = commands.run("eval", ["--policies", json.dumps({"sft": base, "noisy": perturbed}), "--prompts", str(path),
                                    "--judge", json.dumps(judge), "--sampling.max_new_tokens", "4",
                                    "--run_dir", str(tmp_path / "cli")])
    assert results["noisy"].judge_win_rate is not None and results["sft"].proxy_mean is None
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["settings"]["prompts_truncated"] == 1


def test_evaluate_needs_a_task_or_prompts(tiny_models, tmp_path):
    base, _ = tiny_models
    with pytest.raises(ValueError, match=r"give --task .* or --prompts FILE"):
        evaluate({"sft": base}, run_dir=str(tmp_path / "a"))
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps("hi") + "\n")
    with pytest.raises(ValueError, match="best_of_n needs a task"):
        evaluate({"sft": base}, prompts=str(path), reward=CountWords(), best_of_n=2, run_dir=str(tmp_path / "b"))


def test_a_reference_with_another_vocabulary_is_a_one_line_error(tiny_models, tmp_path, capsys, monkeypatch):
    """It was a ValueError traceback from ``alignkit eval``; now a ConfigError, printed on one line."""
    from alignkit.cli import main as cli_main
    from alignkit.models import TinyModelConfig, build_tiny_model

    other = tmp_path / "other_vocab"
    model, tokenizer = build_tiny_model(TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                        intermediate_size=32, task="reverse"))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "review : the tea"}\n')
    policy = tiny_models[0]
    with pytest.raises(SystemExit) as info:
        cli_main(["eval", f"--policies={{a: {policy}}}", f"--reference={other}", f"--prompts={prompts}",
                  "--sampling.max_new_tokens=4", f"--run_dir={tmp_path / 'eval'}"])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alignkit: error:")]
    assert len(lines) == 1 and "ConfigError: policy 'a' and the reference use different vocabularies" in lines[0]
