"""The training order with ``group_by_length``: batches of similar length (less padding), every example once
per epoch, seeded, resumable mid-epoch and split over data-parallel ranks like the plain order; and the plain
order is still exactly :class:`torch.utils.data.DistributedSampler`'s."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_data as module
from conftest import preference_rows, write_jsonl
from torch.utils.data import DistributedSampler

from alignkit.data import PreferenceData, PromptData, SFTData
from alignkit.data.modules import ResumableLoader, ResumableSampler

#: 200 rows of lengths 1..60 (the lengths stand for tokens; the rows are their indices).
LENGTHS = [random.Random(7 + i).randint(1, 60) for i in range(200)]


def sampler(rank: int = 0, replicas: int = 1, batch_size: int = 4, seed: int = 0, shuffle: bool = True,
            lengths: list[int] | None = LENGTHS, epoch: int = 0) -> ResumableSampler:
    s = ResumableSampler(list(range(len(LENGTHS))), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed,
                         lengths=lengths, batch_size=batch_size)
    s.set_epoch(epoch)
    return s


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]


def padding(batch_lengths: list[list[int]]) -> float:
    """Pad tokens ÷ all tokens when every batch pads to its longest row."""
    total = sum(max(b) * len(b) for b in batch_lengths)
    return 1 - sum(map(sum, batch_lengths)) / total


# ------------------------------------------------------------------------------------------ the sampler

@pytest.mark.parametrize("replicas,drop_last", [(1, False), (2, False), (3, False), (3, True)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_plain_order_is_distributed_samplers(replicas, drop_last, shuffle):
    """Without lengths nothing changed: the order (and split) of torch's DistributedSampler."""
    data = list(range(23))
    for rank in range(replicas):
        for epoch in (0, 3):
            ours = ResumableSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=5,
                                    drop_last=drop_last)
            theirs = DistributedSampler(data, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=5,
                                        drop_last=drop_last)
            ours.set_epoch(epoch), theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


@pytest.mark.parametrize("batch_size", [4, 7])
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_example_once_per_epoch(batch_size, shuffle):
    for epoch in range(3):
        order = list(sampler(batch_size=batch_size, shuffle=shuffle, epoch=epoch))
        assert sorted(order) == list(range(len(LENGTHS)))


def test_grouping_is_seeded_and_differs_by_epoch():
    assert list(sampler(seed=3, epoch=1)) == list(sampler(seed=3, epoch=1))
    assert list(sampler(seed=3, epoch=1)) != list(sampler(seed=3, epoch=2))
    assert list(sampler(seed=3, epoch=1)) != list(sampler(seed=4, epoch=1))
    # Without shuffling the order is the same every epoch (file order, grouped).
    assert list(sampler(shuffle=False, epoch=0)) == list(sampler(shuffle=False, epoch=5))


def test_batches_come_from_length_sorted_mega_batches():
    """Each batch is a run of consecutive rows of a mega-batch sorted by length, and every mega-batch of the
    epoch's permutation is there (only the batch order is shuffled)."""
    s, size = sampler(batch_size=4), 4
    s.group = 5  # mega-batches of 20 rows: 10 of them here
    permutation = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(0)).tolist()
    expected = []
    for start in range(0, len(permutation), 20):
        chunk = sorted(permutation[start: start + 20], key=lambda i: -LENGTHS[i])
        expected += batches(chunk, size)
    got = batches(list(s), size)
    assert sorted(got) == sorted(expected) and got != expected  # the same batches, shuffled


def test_grouping_cuts_padding():
    plain = batches(list(sampler(lengths=None, batch_size=8)), 8)
    grouped = batches(list(sampler(batch_size=8)), 8)
    before = padding([[LENGTHS[i] for i in b] for b in plain])
    after = padding([[LENGTHS[i] for i in b] for b in grouped])
    assert before > 0.3 and after < before / 4, (before, after)


def test_partial_last_batch_stays_last():
    """203 rows in batches of 4: 50 full batches (shuffled) and a last one of 3 rows, still last, so the
    loader's batches stay aligned with the length groups."""
    lengths = [random.Random(1 + i).randint(1, 60) for i in range(203)]
    s = ResumableSampler(list(range(203)), num_replicas=1, rank=0, shuffle=True, seed=0, lengths=lengths,
                         batch_size=4)
    s.group = 4
    got = batches(list(s), 4)
    assert [len(b) for b in got] == [4] * 50 + [3]
    assert all(lengths[b[i]] >= lengths[b[i + 1]] for b in got for i in range(len(b) - 1))  # each from one group


def test_resume_mid_epoch_continues_the_grouped_order():
    def loader() -> ResumableLoader:
        s = sampler(batch_size=8)
        return ResumableLoader(list(range(len(LENGTHS))), batch_size=8, sampler=s, generator=torch.Generator())

    first = loader()
    first.sampler.set_epoch(2)
    whole = [b.tolist() for b in first]  # epoch 2
    iterator = iter(first)  # the loader's next pass: epoch 3
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 3, "batches": 5}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(9)  # whatever Lightning sets, the checkpoint's epoch continues
    fresh = loader()
    fresh.sampler.set_epoch(3)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in fresh][5:]
    assert whole != [b.tolist() for b in fresh]


@pytest.mark.parametrize("rows", [200, 203])
def test_two_ranks_get_disjoint_equal_shares_of_the_same_global_batches(rows):
    """Rank r's k-th batch holds rows of the k-th global batch of a 1-process run with the global batch size,
    so each rank's batches are length-grouped too; the shares are equal-sized and (without the padding rows
    that even them out, as in DistributedSampler) disjoint."""
    lengths, data = LENGTHS[:rows] + LENGTHS[: max(rows - 200, 0)], list(range(rows))

    def order(rank: int, replicas: int, batch_size: int) -> list[int]:
        s = ResumableSampler(data, num_replicas=replicas, rank=rank, shuffle=True, seed=1, lengths=lengths,
                             batch_size=batch_size)
        s.set_epoch(4)
        return list(s)

    shares = [order(rank, 2, 8) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == -(-rows // 2)
    union = shares[0] + shares[1]
    assert sorted(set(union)) == data and len(union) - len(set(union)) == rows % 2  # one padding row if odd
    if rows % 2 == 0:
        assert not set(shares[0]) & set(shares[1])
    single = batches(order(0, 1, 16), 16)
    for k, (a, b) in enumerate(zip(batches(shares[0], 8), batches(shares[1], 8))):
        assert set(a) | set(b) <= set(single[k]) | set(single[0])  # the padding rows come from the start
        if rows % 2 == 0 or k < len(single) - 1:
            assert sorted(a + b) == sorted(single[k])
    # Resuming on a rank skips its own batches only.
    s = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=1, lengths=lengths, batch_size=8)
    s.set_epoch(4)
    s.skip = 3 * 8
    assert list(s) == shares[1][24:]


# ------------------------------------------------------------------------------------------ the data modules

MIXED_SFT = [{"prompt": "review : the " + " and the ".join(["pizza"] * (1 + i % 3)),
              "response": " ".join(["the pizza was great"] * (1 + (i * 7) % 9))} for i in range(96)]


def loader_padding(data) -> float:
    masks = [batch.attention_mask for batch in data.train_dataloader()]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def rows_of(data) -> list[list[list[int]]]:
    """The unpadded token rows of each batch of one pass of the train loader."""
    return [[ids[m.bool()].tolist() for ids, m in zip(b.input_ids, b.attention_mask)] for b in data.train_dataloader()]


def test_data_modules_group_by_length(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", MIXED_SFT)
    plain = module(SFTData, tiny_tokenizer, path=str(path), batch_size=8, max_length=128)
    grouped = module(SFTData, tiny_tokenizer, path=str(path), batch_size=8, max_length=128, group_by_length=True)
    assert loader_padding(grouped) < loader_padding(plain) / 2
    assert sorted(sum(rows_of(grouped), [])) == sorted(p + r for p, r in plain.train_set)  # each example once
    again = module(SFTData, tiny_tokenizer, path=str(path), batch_size=8, max_length=128, group_by_length=True)
    assert rows_of(again) == rows_of(grouped)  # seeded
    other = module(SFTData, tiny_tokenizer, path=str(path), batch_size=8, max_length=128, group_by_length=True, seed=1)
    assert rows_of(other) != rows_of(grouped)


def test_length_is_the_collated_width(tmp_path, tiny_tokenizer):
    """``length(example)`` is the width a batch of that example alone pads to, for every data kind."""
    tok = tiny_tokenizer
    sft_path = write_jsonl(tmp_path / "sft.jsonl", MIXED_SFT[:12])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", preference_rows(12))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in MIXED_SFT[:12]])
    for data in (module(SFTData, tok, path=str(sft_path), max_length=128),
                 module(SFTData, tok, path=str(sft_path), max_length=128, packing=True),
                 module(PreferenceData, tok, path=str(prefs)), module(PromptData, tok, path=str(prompts))):
        for example in data.train_set:
            assert data.length(example) == data.collate([example]).input_ids.shape[1]


def test_recipe_option(tmp_path, tiny_overrides):
    """``data.init_args.group_by_length`` reaches the data module of a recipe run."""
    from conftest import SFT_RECIPE, run_cli

    run_dir = tmp_path / "run"
    run_cli(["fit", "--config", SFT_RECIPE, *tiny_overrides, "--data.init_args.group_by_length=true",
             "--data.init_args.task.init_args.num_train_prompts=32", "--data.init_args.batch_size=8",
             "--run_dir", run_dir])
    config = (run_dir / "config.yaml").read_text()
    assert "group_by_length: true" in config and (run_dir / "model").is_dir()
