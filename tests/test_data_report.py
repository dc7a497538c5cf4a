"""The data report (rows, drops and why, truncation with length percentiles, <unk> rate, identical pairs),
``auto`` lengths, and the tiny tokenizer trained on user data (byte-level: no <unk>).

Most tests use a word-level tokenizer (one token per space-separated word, ``<unk>`` for a word outside its
vocabulary) so that every length and count below can be checked by hand; responses get one EOS token."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from conftest import QUIET, TINY_MODEL, run_cli, write_jsonl
from conftest import make_data as make
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from alignkit.data import DataError, PreferenceData, PromptData, SFTData
from alignkit.data.report import percentile
from alignkit.data.tokenize import TOO_LONG
from alignkit.models.tiny import TinyModelConfig, build_tiny_model

DATA = Path(__file__).resolve().parent / "data"
USER_FILES = [str(DATA / name) for name in ("alpaca.jsonl", "messages.jsonl", "hh_rlhf.jsonl", "conversational.jsonl")]
WORDS = "a b c d e f x y z w q r".split()


@pytest.fixture(scope="module")
def words():
    """One token per word of WORDS; any other word is <unk>."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


#: prompt / response tokens (response + EOS): 3/3 (total 6), 6/2 (8), 1/7 (8). "Zed" is <unk>.
SFT_ROWS = [{"prompt": "a b Zed", "response": "x y"},
            {"prompt": "a b c d e f", "response": "x"},
            {"prompt": "a", "response": "x y z w q r"}]


def test_percentile_is_nearest_rank():
    assert [percentile([1, 2, 3, 10], q) for q in (50, 95, 100)] == [2, 10, 10]  # ranks ceil(2)=2, ceil(3.8)=4
    assert percentile([5], 50) == 5 and percentile([], 95) == 0
    assert percentile(list(range(1, 21)), 95) == 19  # rank ceil(19.0) = 19


def test_report_counts_lengths_truncation_and_unk(tmp_path, words, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    data = make(SFTData, words, path=str(path), max_prompt_length=4, max_length=7)
    # row 0 fits; row 1: prompt 6 > 4, cut to 4 (response fits in the 3 left); row 2: 1 + 7 > 7, response cut to 6
    assert data.train_set[1] == (words("c d e f")["input_ids"], words("x")["input_ids"] + [words.eos_token_id])
    assert len(data.train_set[2][1]) == 6
    state = data.state_dict()
    assert (state["rows"], state["examples"], state["train"], state["val"]) == (3, 3, 3, 0)
    assert (state["truncated"], state["prompt_truncated"], state["responses_truncated"]) == (2, 1, {"response": 1})
    assert state["lengths"] == {"prompt": {"p50": 3, "p95": 6, "max": 6},      # [1, 3, 6]
                                "response": {"p50": 3, "p95": 7, "max": 7},    # [2, 3, 7]
                                "total": {"p50": 8, "p95": 8, "max": 8}}       # [6, 8, 8]
    assert (state["tokens"], state["unk_tokens"]) == (3 + 3 + 6 + 2 + 1 + 7, 1)
    assert state["unk_rate"] == pytest.approx(1 / 22)
    assert (state["max_length"], state["max_prompt_length"], state["format"]) == (7, 4, "prompt_response")
    out, err = capsys.readouterr()
    assert out.startswith(f"data: {path} (sft, prompt_response): 3 rows read -> 3 train + 0 val examples, 0 dropped")
    assert "  prompt        3     6     6  max_prompt_length=4  1 (33.3 %)" in out
    assert "  total         8     8     8  max_length=7         2 (66.7 %)" in out
    assert "<unk>: 1 of 22 tokens (4.5 %)" in out
    warnings = err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("alignkit: warning: ") for w in warnings)
    assert "2 of 3 examples (66.7 %) were truncated" in warnings[0]
    assert "data.max_prompt_length (now 4; longest prompt 6)" in warnings[0]
    assert "data.max_length (now 7; longest example 8)" in warnings[0]
    assert "4.5 % of the tokens" in warnings[1] and "(1 of 22)" in warnings[1]
    assert state["warnings"] == [w.removeprefix("alignkit: warning: ") for w in warnings]


def test_no_warning_under_the_thresholds(tmp_path, words, capsys):
    rows = [{"prompt": "a b", "response": "x"}] * 20 + [{"prompt": "a b c d", "response": "x"}]  # 1 of 21: 4.8 %
    make(SFTData, words, path=str(write_jsonl(tmp_path / "sft.jsonl", rows)), max_prompt_length=3, max_length=9)
    out, err = capsys.readouterr()
    assert "1 (4.8 %)" in out and err == ""


def test_drop_reasons_are_counted(tmp_path, words):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    data = make(SFTData, words, path=str(path), max_prompt_length=4, max_length=7, truncation="drop")
    state = data.state_dict()
    assert len(data.train_set) == 1 and state["dropped"] == 2 and state["dropped_by"] == {TOO_LONG: 2}
    assert any("were dropped as too long" in w for w in state["warnings"])


def test_truncation_error_still_fails_fast(tmp_path, words):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    with pytest.raises(DataError, match=r"sft\.jsonl row 2: prompt of 6 \+ response of 2 tokens"):
        make(SFTData, words, path=str(path), max_prompt_length=4, max_length=7, truncation="error")


# ------------------------------------------------------------------------------------------ identical pairs

#: A real pair, the same answer twice (up to spaces), and a pair that truncation makes identical.
PAIRS = [{"prompt": "a b", "chosen": "x y", "rejected": "z w"},
         {"prompt": "a c", "chosen": "x y ", "rejected": " x y"},
         {"prompt": "a d", "chosen": "x y z", "rejected": "x y q"}]


def test_identical_pairs_are_dropped_and_counted(tmp_path, words, capsys):
    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    data = make(PreferenceData, words, path=str(path), max_prompt_length=2, max_length=4)  # room for 2 answer tokens
    assert [e.index for e in data.train_set] == [0]
    state = data.state_dict()
    assert state["identical_pairs"] == 1 and state["dropped"] == 2
    assert state["dropped_by"] == {"identical chosen/rejected": 1, "identical after truncation": 1}
    assert state["responses_truncated"] == {"chosen": 2, "rejected": 2}  # rows 0 and 2: 3 answer tokens > 2
    assert "2 dropped (1 identical chosen/rejected; 1 identical after truncation)" in capsys.readouterr().out


def test_strict_refuses_identical_pairs(tmp_path, words):
    path = write_jsonl(tmp_path / "prefs.jsonl", PAIRS)
    with pytest.raises(DataError, match=r"prefs\.jsonl row 2: 'chosen' and 'rejected' are the same text") as info:
        make(PreferenceData, words, path=str(path), max_prompt_length=2, max_length=4, strict=True)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="row 2: 'chosen' and 'rejected' are identical after truncation"):
        make(PreferenceData, words, path=str(write_jsonl(tmp_path / "p2.jsonl", [PAIRS[0], PAIRS[2]])),
             max_prompt_length=2, max_length=4, strict=True)


def test_a_file_of_identical_pairs_is_refused(tmp_path, words):
    path = write_jsonl(tmp_path / "same.jsonl", [PAIRS[1], PAIRS[1]])
    with pytest.raises(DataError, match=r"no usable examples \(2 of 2 rows dropped: 2 identical chosen/rejected\)"):
        make(PreferenceData, words, path=str(path))


@pytest.fixture(scope="module")
def user_tokenizer():
    """The tiny model's tokenizer trained on the sentiment corpus plus the four user files (byte-level)."""
    return build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                            data=USER_FILES))[1]


@pytest.mark.parametrize("name, cls, fmt, identical", [
    ("alpaca.jsonl", SFTData, "alpaca", None), ("messages.jsonl", SFTData, "messages", None),
    ("hh_rlhf.jsonl", PreferenceData, "implicit", 1), ("conversational.jsonl", PreferenceData, "conversational", 1)])
def test_user_files_in_every_format(name, cls, fmt, identical, user_tokenizer):
    """The four user files: no <unk>, nothing truncated with auto lengths, the identical pair of each preference
    file dropped; multi-turn prompts of 50 to ~300 tokens."""
    data = make(cls, user_tokenizer, path=str(DATA / name), max_length="auto", max_prompt_length="auto")
    state = data.state_dict()
    assert state["format"] == fmt and state["rows"] in (8, 9) and state["unk_tokens"] == 0 and state["tokens"] > 1500
    assert state["truncated"] == 0 and state["warnings"] == []
    assert 50 <= min(data.stats.prompt_lengths) and state["lengths"]["prompt"]["max"] <= 310
    assert state["max_length"] == state["lengths"]["total"]["max"]
    assert state["identical_pairs"] == (identical or 0)


# ------------------------------------------------------------------------------------------ auto lengths

def test_auto_lengths_fit_the_longest_example(tmp_path, words, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    data = make(SFTData, words, path=str(path), max_length="auto", max_prompt_length="auto")
    assert (data.max_length, data.max_prompt_length, data.stats.truncated) == (8, 6, 0)  # longest total 8, prompt 6
    assert data.state_dict()["auto"] == {"max_length": "the longest example", "max_prompt_length": "the longest prompt"}
    out = capsys.readouterr().out
    assert "max_length=auto -> 8: the longest example" in out and "max_prompt_length=auto:6" in out


def test_auto_lengths_are_capped_by_the_context(tmp_path, words, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    data = SFTData(path=str(path), max_length="auto", max_prompt_length="auto", val_fraction=0.0)
    data.attach(words, context=7)
    data.setup()
    # max_length: min(8, 7) = 7. Not every example fits, so the prompt keeps room for the answer: the longest
    # response (7) but at most half of max_length (7 // 2 = 3): max_prompt_length = min(6, 7 - 3) = 4.
    assert (data.max_length, data.max_prompt_length) == (7, 4)
    assert data.auto["max_length"] == "the model's context (longest example: 8 tokens)"
    assert data.auto["max_prompt_length"] == "max_length - 3 tokens kept for the response (longest prompt: 6 tokens)"
    assert "the model's context (7 tokens) caps max_length=auto" in capsys.readouterr().err


def test_auto_prompt_length_under_a_fixed_max_length(tmp_path, words):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    assert make(SFTData, words, path=str(path), max_length=8, max_prompt_length="auto").max_prompt_length == 6
    assert make(SFTData, words, path=str(path), max_length=7, max_prompt_length="auto").max_prompt_length == 4
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a b c"}, {"prompt": "a"}])
    assert make(PromptData, words, path=str(prompts), max_prompt_length="auto").max_prompt_length == 3


@pytest.mark.parametrize("value", [0, -3, "big", True])
def test_bad_lengths_are_one_line_errors(value):
    with pytest.raises(DataError, match=r"data\.max_length must be a positive number of tokens or 'auto', got") as info:
        SFTData(path="x.jsonl", max_length=value)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ the tiny tokenizer

ORDINARY = "### Step 1:\nDon't panic! It's 42 °C in São Paulo — naïve café prices: €3.50 (#2).\n\tDone. 日本語 🙂"


def test_tiny_tokenizer_on_user_data_reads_any_text(user_tokenizer):
    ids = user_tokenizer(ORDINARY, add_special_tokens=False)["input_ids"]
    assert user_tokenizer.unk_token_id not in ids
    assert user_tokenizer.decode(ids) == ORDINARY  # byte-level: exact round trip
    assert len(user_tokenizer) == 512


def test_tiny_tokenizer_of_the_builtin_tasks_is_unchanged(tiny_tokenizer):
    """Without user data the tokenizer is the one the built-in tasks always had (fingerprints taken before
    byte-level BPE was added), so their results do not change."""
    vocab = json.dumps(sorted(tiny_tokenizer.get_vocab().items()))
    assert len(tiny_tokenizer) == 433 and hashlib.sha256(vocab.encode()).hexdigest()[:16] == "8b229bc90b19a011"
    assert tiny_tokenizer("the pizza was great", add_special_tokens=False)["input_ids"] == [50, 281, 59, 386]
    assert tiny_tokenizer.unk_token_id in tiny_tokenizer(ORDINARY, add_special_tokens=False)["input_ids"]


def test_byte_level_needs_room_for_the_bytes():
    with pytest.raises(ValueError, match=r"tiny\.vocab_size=259 is too small .* at least 260 \(256 bytes"):
        build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                         vocab_size=259, data=USER_FILES[0]))


# ------------------------------------------------------------------------------------------ end to end

def test_recipes_train_on_user_data(tmp_path, capsys):
    """sft.yaml on Alpaca rows, then reward_model.yaml on HH-RLHF transcripts and dpo.yaml on conversational
    pairs from that SFT model: auto lengths, no truncation, no <unk>, the report printed and in metrics.json."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    common = [*QUIET, "--trainer.max_steps=2", "--data.init_args.batch_size=4"]
    run_cli(["fit", "--config", recipes / "sft.yaml", *TINY_MODEL, *common,
             f"--data.init_args.path={USER_FILES[0]}", f"--model.policy.tiny.data={json.dumps(USER_FILES)}",
             "--model.policy.tiny.max_position_embeddings=512", "--run_dir", tmp_path / "sft"])
    out = capsys.readouterr().out
    assert f"data: {USER_FILES[0]} (sft, alpaca): 8 rows read" in out and "max_length=auto ->" in out
    sft = json.loads((tmp_path / "sft" / "metrics.json").read_text())["data"]
    assert sft["unk_tokens"] == 0 and sft["truncated"] == 0 and sft["warnings"] == []
    assert sft["max_length"] == sft["lengths"]["total"]["max"] > 256  # the context (512) did not cap it
    for recipe, name in (("reward_model.yaml", "hh_rlhf.jsonl"), ("dpo.yaml", "conversational.jsonl")):
        stage = tmp_path / recipe.split(".")[0]
        run_cli(["fit", "--config", recipes / recipe, *common, "--data.init_args.path", DATA / name,
                 "--model.policy.name_or_path", tmp_path / "sft" / "model", "--run_dir", stage])
        data = json.loads((stage / "metrics.json").read_text())["data"]
        assert data["unk_tokens"] == 0 and data["truncated"] == 0 and data["identical_pairs"] == 1
        assert f"data: {DATA / name} (preference" in capsys.readouterr().out


def test_the_tiny_model_reads_the_user_file_it_trains_on(tmp_path, capsys):
    """The default tiny model with a user's data file and no ``tiny.data``: its tokenizer is trained on that file
    too (recorded in config.yaml), so nothing is ``<unk>``; the run says where it went and how it ended."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    run_dir = tmp_path / "sft"
    run_cli(["fit", "--config", recipes / "sft.yaml", *TINY_MODEL, *QUIET, "--trainer.max_steps=2",
             "--data.init_args.batch_size=4", f"--data.init_args.path={USER_FILES[0]}",
             "--model.policy.tiny.max_position_embeddings=512", "--run_dir", run_dir])
    data = json.loads((run_dir / "metrics.json").read_text())["data"]
    assert data["unk_tokens"] == 0 and data["warnings"] == []
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["policy"]["tiny"]["data"] == USER_FILES[0]
    err = capsys.readouterr().err
    assert f"alignkit: run directory {run_dir}\n" in err
    (summary,) = [line for line in err.splitlines() if line.startswith("alignkit: finished")]
    assert f"finished {run_dir}: 2 steps in " in summary and "train/loss " in summary and "model in" in summary
