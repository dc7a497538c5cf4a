"""Data formats read from small files, and the batches the data modules collate from them."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import make_data as make
from conftest import write_jsonl

from alignkit.data import DataError, PreferenceData, PromptData, SFTData
from alignkit.data.formats import (
    ALPACA_TEMPLATE,
    ALPACA_TEMPLATE_WITH_INPUT,
    load_rows,
    preference_records,
    sft_records,
)
from alignkit.io import read_jsonl

SFT_ROWS = [
    {"prompt": "review : the pizza at the diner on monday", "response": "the pizza was great"},
    {"prompt": "review : the soup at the cafe on friday", "response": "i had the soup and it was tasty and fresh"},
    {"prompt": "review : the cake at the pub on sunday", "response": "lovely cake"},
]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chat_ids(tok, chat, generation_prompt: bool) -> list[int]:
    out = tok.apply_chat_template(chat, add_generation_prompt=generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ------------------------------------------------------------------------------------------ SFT formats

def test_prompt_response_jsonl(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    records = sft_records(load_rows(str(path)), "auto", str(path))
    assert [(r.prompt, r.response) for r in records] == [(r["prompt"], r["response"]) for r in SFT_ROWS]
    data = make(SFTData, tiny_tokenizer, path=str(path))
    eos = tiny_tokenizer.eos_token_id
    assert data.train_set == [(ids(tiny_tokenizer, r["prompt"]), ids(tiny_tokenizer, r["response"]) + [eos])
                              for r in SFT_ROWS]
    assert data.stats.examples == 3 and data.stats.truncated == data.stats.dropped == 0


def test_alpaca_json_with_and_without_input(tmp_path, tiny_tokenizer):
    rows = [
        {"instruction": "review the pizza", "input": "", "output": "the pizza was great"},
        {"instruction": "review this item", "input": "the soup at the cafe", "output": "the soup was tasty"},
    ]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))  # a JSON array, as Alpaca ships
    records = sft_records(load_rows(str(path)), "auto", str(path))
    assert records[0].prompt == ALPACA_TEMPLATE.format(instruction="review the pizza")
    assert records[1].prompt == ALPACA_TEMPLATE_WITH_INPUT.format(instruction="review this item",
                                                                  input="the soup at the cafe")
    assert "### Input:" not in records[0].prompt and "the soup at the cafe" in records[1].prompt
    assert [r.response for r in records] == ["the pizza was great", "the soup was tasty"]
    # A file with no `input` column at all is Alpaca too.
    no_input = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "review the tea", "output": "nice tea"}])
    (record,) = sft_records(load_rows(str(no_input)), "auto", str(no_input))
    assert record.prompt == ALPACA_TEMPLATE.format(instruction="review the tea")
    data = make(SFTData, tiny_tokenizer, path=str(path), max_prompt_length=64, max_length=128)
    assert len(data.train_set) == 2


def test_chat_messages_apply_the_chat_template(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    chat = [{"role": "user", "content": "review : the pizza at the diner"},
            {"role": "assistant", "content": "the pizza was great"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    (record,) = sft_records(load_rows(str(path)), "auto", str(path))
    assert record.prompt == chat[:1] and record.response == "the pizza was great"
    data = make(SFTData, tok, path=str(path))
    ((prompt_ids, response_ids),) = data.train_set
    assert prompt_ids == chat_ids(tok, chat[:1], generation_prompt=True)
    full = chat_ids(tok, chat, generation_prompt=False)  # the template adds a newline after the EOS
    assert prompt_ids + response_ids == full[: full.index(tok.eos_token_id) + 1]
    assert response_ids[-1] == tok.eos_token_id
    assert tok.decode(response_ids, skip_special_tokens=True).strip() == "the pizza was great"


def test_tiny_chat_template_separates_turns(tiny_tokenizer):
    """Each turn of the tiny template ends with a newline (transformers renders templates with
    ``trim_blocks``, which drops a literal newline written right after a block tag)."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}]
    text = tiny_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == "user: hi\nassistant: yo</s>\nuser: again\nassistant:"


def test_chat_response_stops_at_eos(tmp_path, tiny_tokenizer):
    """A template that writes text after the EOS of an assistant turn (ChatML's "<|im_end|>\\n"): the
    response ids still end at EOS, so nothing after it is trained."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    chat = [{"role": "user", "content": "review : the tea"}, {"role": "assistant", "content": "nice tea"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}])
    data = make(SFTData, tok, path=str(path))
    ((prompt_ids, response_ids),) = data.train_set
    assert response_ids[-1] == tok.eos_token_id
    assert response_ids.count(tok.eos_token_id) == 1


def test_plain_prompt_under_chat_template(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:1])
    data = make(SFTData, tiny_tokenizer, path=str(path), chat_template=True)
    ((prompt_ids, response_ids),) = data.train_set
    chat = [{"role": "user", "content": SFT_ROWS[0]["prompt"]}]
    assert prompt_ids == chat_ids(tiny_tokenizer, chat, generation_prompt=True)
    assert response_ids[-1] == tiny_tokenizer.eos_token_id


def test_parquet_file(tmp_path, tiny_tokenizer):
    import pandas as pd

    path = tmp_path / "sft.parquet"
    pd.DataFrame(SFT_ROWS).to_parquet(path)
    data = make(SFTData, tiny_tokenizer, path=str(path))
    assert [p for p, _ in data.train_set] == [ids(tiny_tokenizer, r["prompt"]) for r in SFT_ROWS]


def test_save_to_disk_folder(tmp_path, tiny_tokenizer):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(SFT_ROWS).save_to_disk(str(folder))
    data = make(SFTData, tiny_tokenizer, path=str(folder))
    assert len(data.train_set) == 3
    # A DatasetDict folder: the configured split is read.
    dd = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(SFT_ROWS[:2]),
                          "test": datasets.Dataset.from_list(SFT_ROWS[2:])}).save_to_disk(str(dd))
    assert len(make(SFTData, tiny_tokenizer, path=str(dd), split="test").train_set) == 1


def test_limit_and_validation_split(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"review : the pizza number {i}", "response": "great"} for i in range(20)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    data = make(SFTData, tiny_tokenizer, path=str(path), limit=10, val_fraction=0.2)
    assert len(data.train_set) == 8 and len(data.val_set) == 2
    assert not set(map(str, data.train_set)) & set(map(str, data.val_set))


# ------------------------------------------------------------------------------------------ reading JSON files

#: Well-formed JSON files of every shape the json loader of ``datasets`` reads (name -> text).
JSON_FILES = {
    "lines.jsonl": '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n',
    "blank_lines_crlf.jsonl": '\ufeff{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "c", "response": "d"}',
    "missing_columns.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "input": "x", "output": "d"}\n',
    "mixed_numbers.jsonl": '{"margin": 1, "n": 2}\n{"margin": 0.5, "n": 3}\n{"margin": null, "n": 4}\n',
    "unicode.jsonl": '{"prompt": "caf\\u00e9 \u2028 \u00fc"}\n',
    "nested.jsonl": json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n",
    "list.json": json.dumps(SFT_ROWS, indent=2),
    "list_of_strings.json": json.dumps(["a", "b"]),
    "one_object.json": json.dumps({"prompt": "a", "response": "b"}, indent=2),
    "lines.json": '{"prompt": "a"}\n{"prompt": "c"}\n',
}


@pytest.mark.parametrize("name", list(JSON_FILES))
def test_json_files_read_as_datasets_reads_them(name, tmp_path):
    """The standard-library reader returns the rows ``datasets.load_dataset("json")`` returned before it."""
    import datasets

    path = tmp_path / name
    path.write_text(JSON_FILES[name], encoding="utf-8")
    expected = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert load_rows(str(path)) == expected.to_list()


def test_json_files_do_not_import_datasets(tmp_path):
    import subprocess
    import sys

    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    code = ("import sys; from alignkit.data.formats import load_rows; "
            f"assert len(load_rows({str(path)!r})) == 3; assert 'datasets' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_malformed_jsonl_line_names_the_file_and_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d",}\n{"prompt": "e"}\n')
    with pytest.raises(DataError, match=r"'.*bad\.jsonl' could not be read: line 3: invalid JSON") as info:
        load_rows(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="line 3"):
        make(SFTData, tiny_tokenizer, path=str(path))
    # A pretty-printed document: the line of the error in the whole file.
    document = tmp_path / "bad.json"
    document.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError, match=r"bad\.json' could not be read: line 3: invalid JSON"):
        load_rows(str(document))


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_a_byte_that_is_not_utf8_names_its_line_and_column(tmp_path, bom):
    """Python's own error gives a byte offset into the whole file; the user needs the line."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(bom + b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "d"}\n')
    with pytest.raises(DataError) as info:
        load_rows(str(path))
    assert str(info.value).startswith(f"{path}, line 2, column 16: byte 0xe9 is not UTF-8")
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="line 2, column 16"):
        read_jsonl(path)


@pytest.mark.parametrize("text,error", [
    ("", "no data"), ("\n\n", "no data"), ("[]", "no data"), ("{}\n{}\n", "no data"),
    ('{"prompt": "a"}\n["b"]\n', "line 2: expected a JSON object, got list"),
    ('{"prompt": "a"} {"prompt": "b"}\n', "line 1: invalid JSON"),
])
def test_unreadable_json_files(tmp_path, text, error):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=f"data.jsonl' could not be read: {re.escape(error)}"):
        load_rows(str(path))


# ------------------------------------------------------------------------------------------ preference formats

def test_preference_explicit_with_margin(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "review : the pizza", "chosen": "great pizza", "rejected": "bland pizza", "margin": 1.5},
            {"prompt": "review : the soup", "chosen": "tasty soup", "rejected": "cold soup", "margin": 0.0}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    records = preference_records(load_rows(str(path)), "auto", str(path))
    assert [(r.prompt, r.chosen, r.rejected, r.margin) for r in records] == [
        ("review : the pizza", "great pizza", "bland pizza", 1.5),
        ("review : the soup", "tasty soup", "cold soup", 0.0),
    ]
    batch = make(PreferenceData, tiny_tokenizer, path=str(path)).collate(
        make(PreferenceData, tiny_tokenizer, path=str(path)).train_set)
    assert batch.margin.tolist() == [1.5, 0.0]


def test_preference_implicit_hh_style(tmp_path):
    prompt = "\n\nHuman: how was the pizza?\n\nAssistant: It was fine.\n\nHuman: and the soup?\n\nAssistant:"
    rows = [
        {"chosen": prompt + " Sure, it was tasty.", "rejected": prompt + " Sorry, I did not try it."},
        {"chosen": prompt + " Lovely.", "rejected": prompt + " Bad."},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    records = preference_records(load_rows(str(path)), "auto", str(path))
    for record, row in zip(records, rows):
        # The prompt is the shared prefix, ending at the last Assistant turn (never inside a word).
        assert record.prompt == prompt
        assert record.prompt + record.chosen == row["chosen"]
        assert record.prompt + record.rejected == row["rejected"]
    assert (records[0].chosen, records[0].rejected) == (" Sure, it was tasty.", " Sorry, I did not try it.")
    assert (records[1].chosen, records[1].rejected) == (" Lovely.", " Bad.")


def test_preference_implicit_identical_pair_is_flagged(tmp_path):
    """Identical dialogues are no error at the format level: the record says so (the data module drops it)."""
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: ok "}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    (record,) = preference_records(load_rows(str(path)), "auto", str(path))
    assert record.identical
    # One answer the other's prefix is still an error naming the row.
    rows = [{"chosen": "\n\nHuman: hi\n\nAssistant: ok", "rejected": "\n\nHuman: hi\n\nAssistant: ok then"}]
    path = write_jsonl(tmp_path / "prefix.jsonl", rows)
    with pytest.raises(DataError, match="row 1"):
        preference_records(load_rows(str(path)), "auto", str(path))


def test_preference_conversational_without_prompt(tmp_path):
    user = {"role": "user", "content": "review : the pizza"}
    rows = [{"chosen": [user, {"role": "assistant", "content": "great pizza"}],
             "rejected": [user, {"role": "assistant", "content": "bland pizza"}]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    (record,) = preference_records(load_rows(str(path)), "auto", str(path))
    assert record.prompt == [user]
    assert (record.chosen, record.rejected) == ("great pizza", "bland pizza")


def test_preference_conversational_with_prompt_list(tmp_path, tiny_tokenizer):
    user = {"role": "user", "content": "review : the pizza"}
    rows = [{"prompt": [user], "chosen": [{"role": "assistant", "content": "great pizza"}],
             "rejected": [{"role": "assistant", "content": "bland pizza"}]}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    (record,) = preference_records(load_rows(str(path)), "auto", str(path))
    assert record.prompt == [user]
    assert (record.chosen, record.rejected) == ("great pizza", "bland pizza")
    data = make(PreferenceData, tiny_tokenizer, path=str(path))
    (example,) = data.train_set
    prompt_ids, chosen, rejected = example.prompt_ids, example.chosen_ids, example.rejected_ids
    assert prompt_ids == chat_ids(tiny_tokenizer, [user], generation_prompt=True)
    assert chosen[-1] == rejected[-1] == tiny_tokenizer.eos_token_id


# ------------------------------------------------------------------------------------------ collated batches

def test_sft_batch_labels_mask_prompt_and_padding(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    data = make(SFTData, tok, path=str(path))
    batch = data.collate(data.train_set)
    assert batch.position_ids is None
    lengths = []
    for i, row in enumerate(SFT_ROWS):
        p, r = ids(tok, row["prompt"]), ids(tok, row["response"]) + [tok.eos_token_id]
        n = len(p) + len(r)
        lengths.append(n)
        assert batch.input_ids[i, :n].tolist() == p + r
        assert batch.labels[i, : len(p)].eq(-100).all()  # prompt
        assert batch.labels[i, len(p): n].tolist() == r  # response, EOS included
        assert batch.labels[i, n - 1] == tok.eos_token_id
        assert batch.labels[i, n:].eq(-100).all()  # padding
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.input_ids[i, n:].eq(tok.pad_token_id).all()  # right padded
    assert batch.input_ids.shape == (3, max(lengths))


def test_preference_batch_chosen_then_rejected(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": "review : the pizza", "chosen": "the pizza was great and fresh", "rejected": "bland"},
            {"prompt": "review : the soup at the cafe", "chosen": "tasty", "rejected": "the soup was cold"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    data = make(PreferenceData, tok, path=str(path))
    batch = data.collate(data.train_set)
    assert batch.num_pairs == 2 and batch.input_ids.shape[0] == 4
    assert batch.index.tolist() == [0, 1] and batch.margin.tolist() == [0.0, 0.0]
    eos = tok.eos_token_id
    for k, row in enumerate(rows):
        p = ids(tok, row["prompt"])
        for offset, answer in ((0, row["chosen"]), (2, row["rejected"])):  # chosen in [0, B), rejected in [B, 2B)
            r = ids(tok, answer) + [eos]
            i, n = k + offset, len(p) + len(r)
            assert batch.input_ids[i, :n].tolist() == p + r
            assert batch.loss_mask[i].tolist() == [0] * len(p) + [1] * len(r) + [0] * (batch.input_ids.shape[1] - n)
            assert batch.attention_mask[i, :n].eq(1).all() and batch.attention_mask[i, n:].eq(0).all()


def test_prompt_batch_is_left_padded(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = ["review : the pizza at the diner on monday", "review : the tea"]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    data = make(PromptData, tok, path=str(path))
    batch = data.collate(data.train_set)
    long, short = ids(tok, prompts[0]), ids(tok, prompts[1])
    width = batch.input_ids.shape[1]
    assert width == len(long)
    assert batch.input_ids[1].tolist() == [tok.pad_token_id] * (width - len(short)) + short
    assert batch.attention_mask[1].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert batch.attention_mask[0].eq(1).all()
    assert batch.prompts == prompts and batch.index.tolist() == [0, 1]


def test_prompt_data_truncates_long_prompts_keeping_the_end(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "review : the pizza at the diner on monday"
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": prompt}, {"prompt": "review : the tea"}])
    full = ids(tok, prompt)
    limit = len(full) - 2
    data = make(PromptData, tok, path=str(path), max_prompt_length=limit, max_length=64)
    assert data.train_set[0].ids == full[-limit:]
    assert data.stats.truncated == 1 and data.stats.examples == 2


def test_packing_restarts_positions_and_masks_prompts(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS * 2)
    plain = make(SFTData, tok, path=str(path))
    data = make(SFTData, tok, path=str(path), packing=True, max_length=48)
    rows = data.train_set
    assert len(rows) < len(plain.train_set)  # several examples share a row
    assert sorted(e for row in rows for e in row) == sorted(plain.train_set)  # every example packed once
    assert all(sum(len(p) + len(r) for p, r in row) <= 48 for row in rows)
    batch = data.collate(rows)
    assert batch.position_ids is not None and batch.position_ids.shape == batch.input_ids.shape
    for i, row in enumerate(rows):
        start = 0
        for p, r in row:
            n = len(p) + len(r)
            assert batch.input_ids[i, start: start + n].tolist() == p + r
            assert batch.position_ids[i, start: start + n].tolist() == list(range(n))  # restarts at 0
            assert batch.labels[i, start: start + len(p)].eq(-100).all()  # prompt masked
            assert batch.labels[i, start + len(p): start + n].tolist() == r
            start += n
        assert batch.labels[i, start:].eq(-100).all() and batch.attention_mask[i, start:].eq(0).all()
        assert batch.attention_mask[i, :start].eq(1).all()


def test_packed_batch_runs_through_the_tiny_model(tmp_path, tiny_tokenizer):
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model
    from alignkit_plugins.sft import sft_loss

    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    batch = make(SFTData, tiny_tokenizer, path=str(path), packing=True, max_length=64).collate(
        make(SFTData, tiny_tokenizer, path=str(path), packing=True, max_length=64).train_set)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))[0]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids).logits
    loss, count = sft_loss(logits, batch.labels)
    assert torch.isfinite(loss) and int(count) == int((batch.labels[:, 1:] != -100).sum())


# ------------------------------------------------------------------------------------------ truncation policy

LONG_PROMPT = "review : the pizza at the diner on monday and the soup at the cafe on friday"
LONG_ROWS = [
    {"prompt": "review : the tea", "response": "nice tea"},
    {"prompt": LONG_PROMPT, "response": "the pizza was great and the soup was tasty and fresh"},
]


def test_truncate_keeps_the_end_of_the_prompt(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    path = write_jsonl(tmp_path / "long.jsonl", LONG_ROWS)
    data = make(SFTData, tok, path=str(path), max_prompt_length=5, max_length=9, truncation="truncate")
    prompt_ids, response_ids = data.train_set[1]
    assert prompt_ids == ids(tok, LONG_PROMPT)[-5:]
    assert response_ids == (ids(tok, LONG_ROWS[1]["response"]) + [tok.eos_token_id])[:4]
    assert data.stats.truncated == 1 and data.stats.dropped == 0 and data.stats.examples == 2
    state = data.state_dict()
    assert {k: state[k] for k in ("truncated", "dropped", "examples")} == {"truncated": 1, "dropped": 0, "examples": 2}


def test_drop_leaves_long_examples_out(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", LONG_ROWS)
    data = make(SFTData, tiny_tokenizer, path=str(path), max_prompt_length=5, max_length=9, truncation="drop")
    assert len(data.train_set) == 1 and data.stats.dropped == 1 and data.stats.truncated == 0
    assert data.train_set[0][0] == ids(tiny_tokenizer, "review : the tea")


def test_error_names_the_row(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", LONG_ROWS)
    with pytest.raises(DataError, match=r"long\.jsonl row 2") as info:
        make(SFTData, tiny_tokenizer, path=str(path), max_prompt_length=5, max_length=9, truncation="error")
    assert "\n" not in str(info.value)


def test_preference_truncation_cuts_both_answers(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = [{"prompt": LONG_PROMPT, "chosen": "great pizza and fresh soup", "rejected": "cold pizza"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    data = make(PreferenceData, tok, path=str(path), max_prompt_length=4, max_length=7)
    (example,) = data.train_set
    prompt_ids, chosen, rejected = example.prompt_ids, example.chosen_ids, example.rejected_ids
    assert prompt_ids == ids(tok, LONG_PROMPT)[-4:]
    assert len(chosen) <= 3 and len(rejected) <= 3 and data.stats.truncated == 1
