"""KTO (Ethayarajh et al. 2024): the loss against hand-computed values, the unpaired data module (pairs split into
desirable/undesirable rows, unpaired rows, one-line data errors, batches of ≥ 2 rows), the λ weights, and the
recipe end to end on the tiny model."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import QUIET, RECIPES, make_data, preference_rows, run_cli, write_jsonl

from alignkit import DataError, encode_prompt
from alignkit_plugins.kto import KTO, UnpairedData, kto_loss
from alignkit_plugins.kto.data import kl_partners
from alignkit_plugins.kto.losses import kto_stats, reference_point

RECIPE = RECIPES / "kto.yaml"


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------ the loss
def test_loss_matches_hand_computed_values_both_signs():
    # r = policy − reference = [1, −1, 0, −1]; rows 0 and 2 desirable.
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.5], requires_grad=True)
    reference = torch.tensor([-2.0, -1.0, -3.0, -0.5])
    desirable = torch.tensor([True, False, True, False])
    # Mismatched pairs: log-ratios [1, 0] -> KL estimate 0.5 = z0 (positive: not clamped).
    policy_kl, reference_kl = torch.tensor([-4.0, -5.0]), torch.tensor([-5.0, -5.0])
    terms = kto_loss(policy, reference, desirable, policy_kl, reference_kl, beta=1.0, desirable_weight=2.0,
                     undesirable_weight=1.0)
    # row 0, desirable,   r = 1:  2 · (1 − σ(1 · (1 − 0.5)))    = 2 · (1 − 0.6224593) = 0.7550813
    # row 1, undesirable, r = −1: 1 · (1 − σ(1 · (0.5 − (−1)))) = 1 − 0.8175745       = 0.1824255
    # row 2, desirable,   r = 0:  2 · (1 − σ(−0.5))             = 2 · 0.6224593       = 1.2449187
    # row 3, undesirable, r = −1: as row 1                                             = 0.1824255
    expected = [0.7550813, 0.1824255, 1.2449187, 0.1824255]
    torch.testing.assert_close(terms.losses, torch.tensor(expected), atol=1e-6, rtol=0)
    assert terms.losses.mean().item() == pytest.approx(2.3648510 / 4, abs=1e-6)  # the paper's mean over rows
    assert terms.kl.item() == pytest.approx(0.5)
    torch.testing.assert_close(terms.rewards, torch.tensor([1.0, -1.0, 0.0, -1.0]))  # β·r with β = 1
    # Gradient: d/dr λ_D(1 − σ(β(r − z0))) = −λ_D β σ(x)(1 − σ(x)); d/dr λ_U(1 − σ(β(z0 − r))) = +λ_U β σ(y)(1 − σ(y)),
    # each divided by B = 4 for the mean. Row 0: −2 · 0.6224593 · 0.3775407 / 4 = −0.1175019;
    # row 1: 0.8175745 · 0.1824255 / 4 = 0.0372866.
    terms.losses.mean().backward()
    grads = [-2 * sigmoid(0.5) * sigmoid(-0.5) / 4, sigmoid(1.5) * sigmoid(-1.5) / 4,
             -2 * sigmoid(-0.5) * sigmoid(0.5) / 4, sigmoid(1.5) * sigmoid(-1.5) / 4]
    assert grads[0] == pytest.approx(-0.1175019, abs=1e-7) and grads[1] == pytest.approx(0.0372866, abs=1e-7)
    torch.testing.assert_close(policy.grad, torch.tensor(grads), atol=1e-6, rtol=0)


def test_reference_point_is_clamped_at_zero_and_carries_no_gradient():
    policy = torch.tensor([-1.0, -1.5], requires_grad=True)  # r = [1, −1] with the reference below
    reference = torch.tensor([-2.0, -0.5])
    desirable = torch.tensor([True, False])
    # Mismatched log-ratios [−1, 0]: estimate −0.5, clamped to z0 = 0.
    policy_kl = torch.tensor([-6.0, -5.0], requires_grad=True)
    terms = kto_loss(policy, reference, desirable, policy_kl, torch.tensor([-5.0, -5.0]), beta=1.0)
    assert terms.kl.item() == 0.0 and not terms.kl.requires_grad
    # desirable r = 1: 1 − σ(1) = 0.2689414; undesirable r = −1: 1 − σ(0 − (−1)) = 0.2689414
    torch.testing.assert_close(terms.losses, torch.tensor([0.2689414, 0.2689414]), atol=1e-6, rtol=0)
    terms.losses.sum().backward()
    assert policy.grad is not None and policy_kl.grad is None  # z0 is detached: nothing flows into the KL pairs
    # β scales inside the sigmoid: β = 0.5, z0 = 0.5 (log-ratios [1, 0]); desirable r = 1: 1 − σ(0.25) = 0.4378235
    half = kto_loss(policy.detach(), reference, desirable, torch.tensor([-4.0, -5.0]), torch.tensor([-5.0, -5.0]),
                    beta=0.5)
    assert half.losses[0].item() == pytest.approx(1 - sigmoid(0.25), abs=1e-6) == pytest.approx(0.4378235, abs=1e-6)
    torch.testing.assert_close(half.rewards, torch.tensor([0.5, -0.5]))


def test_reference_point_over_ranks_and_argument_checks():
    # This rank's log-ratios sum to 1 over 2 pairs; "another rank" adds 3 over 2: mean (1 + 3) / 4 = 1.
    other_rank = torch.tensor([3.0, 2.0])
    z0 = reference_point(torch.tensor([-4.0, -5.0]), torch.tensor([-5.0, -5.0]), reduce=lambda t: t + other_rank)
    assert z0.item() == pytest.approx(1.0)
    one = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(one, one, one.bool(), one, one, beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight"):
        kto_loss(one, one, one.bool(), one, one, beta=0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        reference_point(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="algorithm: beta"):
        KTO(beta=-1.0)


def test_stats_name_each_kind_and_leave_out_an_absent_one():
    policy, reference = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -2.0])  # r = [1, −1, −1]
    desirable = torch.tensor([True, False, False])
    kl = (torch.tensor([-4.0, -5.0]), torch.tensor([-5.0, -5.0]))
    terms = kto_loss(policy, reference, desirable, *kl, beta=0.1)
    stats = kto_stats(terms, desirable, policy)
    # rewards = β·r = [0.1, −0.1, −0.1]: chosen 0.1, rejected −0.1, margin 0.2; logps: chosen −1, rejected −2.5
    assert {k: round(float(v), 6) for k, v in stats.items()} == {
        "kto/kl": 0.5, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2,
        "logps/chosen": -1.0, "logps/rejected": -2.5}
    only_desirable = torch.ones(3, dtype=torch.bool)
    stats = kto_stats(kto_loss(policy, reference, only_desirable, *kl, beta=0.1), only_desirable, policy)
    assert set(stats) == {"kto/kl", "rewards/chosen", "logps/chosen"}  # no NaN for the absent kind


# ------------------------------------------------------------------------------------------------ data
def test_pairs_are_split_into_desirable_and_undesirable_rows(tmp_path, tiny_tokenizer):
    rows = preference_rows(6)
    rows.append({"prompt": rows[0]["prompt"], "chosen": "same answer", "rejected": " same answer "})  # identical
    data = make_data(UnpairedData, tiny_tokenizer, path=str(write_jsonl(tmp_path / "pairs.jsonl", rows)), batch_size=4)
    assert data.format_name == "explicit pairs split" and data.response_names == ["chosen", "rejected"]
    assert len(data.train_set) == 12 and data.label_counts() == (6, 6)
    assert data.identical_pairs == 1 and data.report.as_dict()["dropped"] == 1 and data.report.rows == 7
    for good, bad, row in zip(data.train_set[::2], data.train_set[1::2], rows):
        assert (good.desirable, bad.desirable) == (True, False) and good.row == bad.row
        assert good.prompt_ids == bad.prompt_ids
        assert tiny_tokenizer.decode(good.completion_ids, skip_special_tokens=True).strip() == row["chosen"]
        assert tiny_tokenizer.decode(bad.completion_ids, skip_special_tokens=True).strip() == row["rejected"]
    assert "unpaired, explicit pairs split): 7 rows read -> 12 train + 0 val examples, 1 dropped" in data.report.text()
    # The hold-out is by data row: a pair's two halves land on the same side.
    held = make_data(UnpairedData, tiny_tokenizer, path=str(tmp_path / "pairs.jsonl"), batch_size=4, val_fraction=0.5)
    assert len(held.val_set) == 6 and not {e.row for e in held.train_set} & {e.row for e in held.val_set}


def test_implicit_pairs_and_unpaired_rows_with_chat_prompts(tmp_path, tiny_tokenizer):
    implicit = [{"chosen": f"review : the soup {i} was great", "rejected": f"review : the soup {i} was cold"}
                for i in range(3)]
    data = make_data(UnpairedData, tiny_tokenizer, path=str(write_jsonl(tmp_path / "hh.jsonl", implicit)),
                     batch_size=2)
    assert data.format_name == "implicit pairs split" and len(data.train_set) == 6
    unpaired = [
        {"prompt": "review : the pizza", "completion": "it was great", "label": True},
        {"prompt": [{"role": "user", "content": "review : the soup"}],
         "completion": [{"role": "assistant", "content": "it was cold"}], "label": False},
        {"prompt": "review : the taco", "completion": "it was bland", "label": False},
    ]
    data = make_data(UnpairedData, tiny_tokenizer, path=str(write_jsonl(tmp_path / "kto.jsonl", unpaired)),
                     batch_size=2, max_length="auto")
    assert data.format_name == "unpaired" and data.response_names == ["completion"]
    assert data.label_counts() == (1, 2) and data.report.kind == "unpaired"
    chat = data.train_set[1]
    assert chat.prompt_ids == encode_prompt(tiny_tokenizer, unpaired[1]["prompt"], chat_template=False)
    assert chat.prompt_ids != encode_prompt(tiny_tokenizer, "review : the soup", chat_template=False)


def test_data_errors_name_file_row_and_field(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "review : the pizza", "completion": "great", "label": True}] * 2
    rows.append({"prompt": "review : the soup", "completion": "cold", "label": "no"})
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl row 3: 'label' must be true \(desirable\) or false") as info:
        make_data(UnpairedData, tiny_tokenizer, path=str(path), batch_size=2)
    assert "\n" not in str(info.value)
    path.write_text(path.read_text().replace('"completion": "cold", "label": "no"}', '"completion": '))
    with pytest.raises(DataError, match=r"bad\.jsonl' could not be read: line 3: invalid JSON"):
        make_data(UnpairedData, tiny_tokenizer, path=str(path), batch_size=2)
    write_jsonl(path, [{"prompt": "review : the soup", "completion": " ", "label": False}])
    with pytest.raises(DataError, match=r"bad\.jsonl row 1: empty or non-text 'completion'"):
        make_data(UnpairedData, tiny_tokenizer, path=str(path), batch_size=2)
    with pytest.raises(DataError, match="batch_size must be at least 2"):
        UnpairedData(path=str(path), batch_size=1)


def test_batches_hold_mismatched_pairs_and_at_least_two_rows(tmp_path, tiny_tokenizer):
    # Pairs split: consecutive rows share a prompt, so each KL partner is the nearest earlier row with another prompt.
    assert kl_partners([[1], [1], [2], [2]]) == [3, 3, 1, 1]
    assert kl_partners([[1], [2], [3]]) == [2, 0, 1]  # TRL's shift by one
    assert kl_partners([[1], [1]]) == [1, 0]  # one prompt only: still another row's completion
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(5))  # 10 rows
    data = make_data(UnpairedData, tiny_tokenizer, path=str(path), batch_size=4, shuffle=False)
    batch = data.collate(data.train_set[:4])
    first, partner = data.train_set[0], data.train_set[3]
    kl_row = batch.kl_input_ids[0][batch.kl_attention_mask[0].bool()].tolist()
    kept = partner.completion_ids[: data.max_length - len(first.prompt_ids)]  # a mismatched pair obeys max_length
    assert kl_row == first.prompt_ids + kept and batch.kl_loss_mask[0].sum() == len(kept)
    assert batch.desirable.tolist() == [True, False, True, False] and batch.input_ids.shape == batch.kl_input_ids.shape
    with pytest.raises(DataError, match="at least 2 rows"):
        data.collate(data.train_set[:1])
    # 10 rows in batches of 3: the last batch (1 row) is left out; batches of 4: 4 + 4 + 2, all kept.
    sizes = [b.size for b in make_data(UnpairedData, tiny_tokenizer, path=str(path), batch_size=3).train_dataloader()]
    assert sizes == [3, 3, 3]
    assert [b.size for b in data.train_dataloader()] == [4, 4, 2]


# ------------------------------------------------------------------------------------------------ weights
def fake_module(desirable: int, undesirable: int):
    data = SimpleNamespace(label_counts=lambda: (desirable, undesirable))
    return SimpleNamespace(trainer=SimpleNamespace(datamodule=data, is_global_zero=True))


def test_weights_auto_balance_and_a_warning_outside_the_recommended_range(capsys):
    # auto: λ_D = λ_U · n_U / n_D = 1 · 300 / 100 = 3, so λ_D·n_D / (λ_U·n_U) = 1.
    assert KTO(desirable_weight="auto").weights(fake_module(100, 300)) == (3.0, 1.0)
    assert "desirable_weight=auto -> 3" in capsys.readouterr().out
    # Fixed weights: 1·100 / (1·300) = 0.333 < 1: warned, with the value that fits.
    assert KTO().weights(fake_module(100, 300)) == (1.0, 1.0)
    err = capsys.readouterr().err
    assert "alignkit: warning: kto:" in err and "= 0.333" in err and "desirable_weight=3 (or auto)" in err
    # 1.2·100 / (1·100) = 1.2 is inside [1, 4/3]: no warning.
    assert KTO(desirable_weight=1.2).weights(fake_module(100, 100)) == (1.2, 1.0)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ end to end
def test_recipe_runs_end_to_end_on_split_preference_pairs(tmp_path):
    from alignkit.models.tiny import TinyModelConfig, build_tiny_model

    model, tokenizer = build_tiny_model(TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2,
                                                        intermediate_size=64))
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    preferences = write_jsonl(tmp_path / "preferences.jsonl", preference_rows(16))
    run = tmp_path / "run"
    # 16 pairs -> 12 train pairs = 24 rows = 3 batches of 8; validation (8 rows) at the end of the epoch.
    run_cli(["fit", "--config", RECIPE, *QUIET, "--run_dir", run, "--trainer.max_steps=3",
             f"--model.policy.name_or_path={tmp_path / 'sft'}", f"--data.init_args.path={preferences}",
             "--data.init_args.batch_size=8", "--data.init_args.val_fraction=0.25"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["algorithm"] == "KTO" and metrics["global_step"] == 3
    final = metrics["final"]
    assert {"train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kto/kl", "val/loss",
            "val/rewards/margins"} <= set(final)
    assert 0 < final["train/loss"] < 1 and final["kto/kl"] >= 0
    assert metrics["data"]["kind"] == "unpaired" and metrics["data"]["train"] == 24
    trained = type(model).from_pretrained(run / "model")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
