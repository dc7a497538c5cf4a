"""Unpaired feedback for KTO: rows of ``{"prompt", "completion", "label": true/false}`` — or preference pairs split
into one desirable and one undesirable row — tokenised, truncated and reported like every alignkit data module,
and collated with the mismatched (prompt, completion) pairs that KTO's KL estimate needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from alignkit import DataError, TensorRecord, encode_prompt, encode_response, right_pad
from alignkit.data import AlignData
from alignkit.data.formats import (
    PREFERENCE_COLUMNS,
    Conversation,
    _conversation,
    _text,
    detect_format,
)
from alignkit.data.modules import ResumableLoader, ResumableSampler

#: The data kind of :class:`UnpairedData` (and of :class:`~alignkit_plugins.kto.KTO`'s ``data_kind``).
UNPAIRED = "unpaired"
#: Columns of an unpaired row.
UNPAIRED_COLUMNS = ("prompt", "completion", "label")

UnpairedFormat = Literal["auto", "unpaired", "explicit", "implicit", "conversational"]


@dataclass
class UnpairedBatch(TensorRecord):
    """``B`` labelled completions and, for KTO's KL estimate, ``B`` mismatched pairs: row ``i`` of the ``kl_*``
    tensors is prompt ``i`` followed by the completion of another row of the batch (one with a different prompt
    where there is one). Right padded; all six token tensors share one length ``T``. ``loss_mask`` /
    ``kl_loss_mask`` mark completion tokens."""

    input_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T)
    loss_mask: Tensor  # (B, T)
    desirable: Tensor  # (B,) bool
    index: Tensor  # (B,) the example's number in the data set (before the hold-out split)
    kl_input_ids: Tensor  # (B, T)
    kl_attention_mask: Tensor  # (B, T)
    kl_loss_mask: Tensor  # (B, T)

    @property
    def size(self) -> int:
        return self.desirable.shape[0]


@dataclass(frozen=True)
class UnpairedExample:
    """One tokenised, labelled completion. ``row`` is its row in the data file (both halves of a split pair share
    it, so the train/validation hold-out keeps them together); ``index`` numbers the examples (``2·row`` and
    ``2·row + 1`` for the desirable and the undesirable half of a pair)."""

    index: int
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    desirable: bool


def kl_partners(prompts: list[list[int]]) -> list[int]:
    """For each row ``i``, the row whose completion follows prompt ``i`` in the mismatched pair: the nearest
    earlier row, cyclically (``i − 1``, ``i − 2``, … mod B, TRL's shift by one), whose prompt differs from row
    ``i``'s; ``i − 1`` when every row has the same prompt. Needs ``B ≥ 2``."""
    n = len(prompts)
    partners = []
    for i in range(n):
        candidates = [(i - k) % n for k in range(1, n)]
        partners.append(next((j for j in candidates if prompts[j] != prompts[i]), candidates[0]))
    return partners


class UnpairedData(AlignData):
    """Unpaired, labelled completions for KTO (data kind ``unpaired``).

    Reads ``unpaired`` rows — ``prompt`` (text or a list of ``{role, content}`` messages), ``completion`` (text, or
    a list holding one assistant message) and ``label`` (true: desirable, false: undesirable) — and every
    preference format that :class:`~alignkit.data.PreferenceData` reads (explicit, implicit/HH-RLHF,
    conversational), splitting each pair into a desirable row (the chosen answer) and an undesirable one (the
    rejected answer). A pair's two rows are truncated together (as in DPO), dropped together when identical (or
    refused with ``strict``), and held out for validation together.

    Every batch holds at least 2 rows, so that KTO's KL estimate over mismatched pairs is defined: ``batch_size``
    must be ≥ 2, and a last batch of a single row is left out of that epoch (training order is reshuffled every
    epoch, so no row is lost for good; a single left-over validation row is not evaluated).
    """

    kind = UNPAIRED

    def __init__(self, *args, format: UnpairedFormat = "auto", strict: bool = False, **kwargs):
        """
        Args:
            format: the row format: ``unpaired`` (prompt/completion/label) or a preference format whose pairs are
                split (``explicit``, ``implicit``, ``conversational``); auto-detected from the columns by default.
            strict: refuse (with an error naming the row) a pair whose chosen and rejected answers are the same
                text, or become the same tokens when truncated; by default such pairs are dropped and counted.
        """
        super().__init__(*args, **kwargs)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise DataError(f"data.batch_size must be at least 2 for unpaired (KTO) data: the KL estimate pairs each "
                            f"prompt with another row's completion; got {self.batch_size!r}")
        self.format, self.strict = format, strict
        self._rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ formats
    def detected_format(self, rows: list[dict[str, Any]]) -> str:
        if self.format != "auto":
            return self.format
        if rows and set(UNPAIRED_COLUMNS) <= set(rows[0]):
            return "unpaired"
        table = {"unpaired": UNPAIRED_COLUMNS, **PREFERENCE_COLUMNS}
        return detect_format(rows, table, self.source)

    @property
    def paired(self) -> bool:
        return bool(self._rows) and self.detected_format(self._rows) != "unpaired"

    @property
    def format_name(self) -> str | None:
        if not self._rows:
            return None if self.format == "auto" else self.format
        fmt = self.detected_format(self._rows)
        return f"{fmt} pairs split" if fmt != "unpaired" else fmt

    @property
    def response_names(self) -> list[str]:
        return ["chosen", "rejected"] if self.paired else ["completion"]

    # ------------------------------------------------------------------------------------------ encoding
    def encode(self, rows: list[dict[str, Any]]) -> list[UnpairedExample]:
        self.rows_read += len(rows)
        self._rows = rows[:1]
        tokenizer: Any = self.tokenizer
        if not rows:
            raise DataError(f"{self.source}: no rows")
        if self.paired:
            return self.encode_pairs(rows)
        missing = [c for c in UNPAIRED_COLUMNS if c not in rows[0]]
        if missing:
            raise DataError(f"{self.source}: format unpaired needs column(s) {', '.join(missing)}; "
                            f"found {', '.join(sorted(rows[0]))}")
        items, labels = [], {}
        for i, row in enumerate(rows):
            prompt, completion, desirable = unpaired_record(row, self.source, i)
            prompt_ids = encode_prompt(tokenizer, prompt, self.chat_template)
            completion_ids = encode_response(tokenizer, prompt, prompt_ids, completion, self.chat_template)
            items.append((i, prompt_ids, [completion_ids]))
            labels[i] = desirable
        self.resolve_lengths(items)
        examples = []
        for i, prompt_ids, responses in items:
            fitted = self.fit_example(i, prompt_ids, responses)
            if fitted is not None:
                examples.append(UnpairedExample(i, i, fitted[0], fitted[1][0], labels[i]))
        return examples

    def encode_pairs(self, rows: list[dict[str, Any]]) -> list[UnpairedExample]:
        """Preference rows, each split into a desirable and an undesirable example (PreferenceData's checks)."""
        fmt = self.detected_format(rows)
        examples = []
        for i, _, prompt_ids, chosen, rejected in self.fitted_pairs(rows, fmt, self.strict):  # type: ignore[arg-type]
            examples.append(UnpairedExample(2 * i, i, prompt_ids, chosen, True))
            examples.append(UnpairedExample(2 * i + 1, i, prompt_ids, rejected, False))
        return examples

    def hold_out(self, examples: list[UnpairedExample]) -> tuple[list[UnpairedExample], list[UnpairedExample]]:
        """The base class's seeded hold-out, over data rows: both halves of a split pair land on the same side."""
        rows = sorted({e.row for e in examples})
        _, val_rows = super().hold_out(rows)
        held = set(val_rows)
        return [e for e in examples if e.row not in held], [e for e in examples if e.row in held]

    def label_counts(self) -> tuple[int, int]:
        """``(desirable, undesirable)`` training examples (after ``setup``)."""
        desirable = sum(e.desirable for e in self.train_set)
        return desirable, len(self.train_set) - desirable

    def length(self, example: UnpairedExample) -> int:
        return len(example.prompt_ids) + len(example.completion_ids)

    # ------------------------------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        """The base class's resumable, seeded training loader, except that a last batch of a single row (on each
        rank) is left out of the epoch."""
        trainer = self.trainer  # None outside a Trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        lengths = [self.length(e) for e in self.train_set] if self.group_by_length else None
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, shuffle=self.shuffle,
                                   seed=self.run_seed, lengths=lengths, batch_size=self.batch_size)
        rows: Any = self.train_set  # a list is a map-style data set
        loader = ResumableLoader(rows, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
                                 num_workers=self.num_workers, drop_last=sampler.num_samples % self.batch_size == 1,
                                 generator=torch.Generator().manual_seed(self.run_seed))
        if self.train_loader_state is not None:  # restored from a checkpoint: the trainer's loader asks first
            loader.load_state_dict(self.train_loader_state)
            self.train_loader_state = None
        return loader

    def val_dataloader(self) -> DataLoader | list:
        """The base class's validation loader; a last batch of a single row (on each rank) is left out."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        per_rank = -(-len(self.val_set) // world)  # Lightning's distributed sampler pads to equal shares
        if per_rank < 2:
            return []
        rows: Any = self.val_set  # a list is a map-style data set
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, drop_last=per_rank % self.batch_size == 1,
                          generator=torch.Generator().manual_seed(self.run_seed))

    def collate(self, examples: list[UnpairedExample]) -> UnpairedBatch:
        if len(examples) < 2:
            raise DataError(f"{self.source}: a KTO batch needs at least 2 rows for the KL estimate, "
                            f"got {len(examples)}")
        prompts = [e.prompt_ids for e in examples]
        partners = kl_partners(prompts)
        limit = self.max_length if isinstance(self.max_length, int) else None
        kl_completions = []
        for e, j in zip(examples, partners):
            completion = examples[j].completion_ids
            room = limit - len(e.prompt_ids) if limit is not None else len(completion)
            kl_completions.append(completion[:max(room, 1)])  # a mismatched pair obeys max_length too
        completions = [e.completion_ids for e in examples] + kl_completions
        sequences = [p + c for p, c in zip(prompts * 2, completions)]
        ids, mask = right_pad(sequences, self.tokenizer.pad_token_id)  # type: ignore[attr-defined]
        loss_mask = torch.zeros_like(mask)
        for row, (p, c) in enumerate(zip(prompts * 2, completions)):
            loss_mask[row, len(p): len(p) + len(c)] = 1
        n = len(examples)
        return UnpairedBatch(
            input_ids=ids[:n], attention_mask=mask[:n], loss_mask=loss_mask[:n],
            desirable=torch.tensor([e.desirable for e in examples], dtype=torch.bool),
            index=torch.tensor([e.index for e in examples], dtype=torch.long),
            kl_input_ids=ids[n:], kl_attention_mask=mask[n:], kl_loss_mask=loss_mask[n:],
        )


def unpaired_record(row: dict[str, Any], source: str, index: int) -> tuple[str | Conversation, str, bool]:
    """``(prompt, completion, desirable)`` of an unpaired row, checked; a one-line :class:`DataError` names the row
    and the field otherwise."""
    prompt: str | Conversation
    if isinstance(row.get("prompt"), list):
        prompt = _conversation(row["prompt"], "prompt", source, index)
    else:
        prompt = _text(row, "prompt", source, index)
    value = row.get("completion")
    if isinstance(value, list):
        chat = _conversation(value, "completion", source, index)
        if len(chat) != 1 or chat[0]["role"] != "assistant" or not str(chat[0]["content"]).strip():
            raise DataError(f"{source} row {index + 1}: 'completion' as messages must be one non-empty assistant turn")
        completion = chat[0]["content"]
    else:
        completion = _text(row, "completion", source, index)
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{source} row {index + 1}: 'label' must be true (desirable) or false (undesirable), "
                        f"got {label!r}")
    return prompt, completion, label


__all__ = ["UNPAIRED", "UnpairedBatch", "UnpairedData", "UnpairedExample", "kl_partners", "unpaired_record"]
