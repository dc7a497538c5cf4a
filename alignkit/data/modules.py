"""Lightning data modules for the three kinds of training data: demonstrations (SFT), preference pairs
(reward model, DPO) and prompts (online RL). Each reads files / HF data sets (or a task's built-in data),
tokenises with the policy's tokenizer (taken from the LightningModule at ``setup``) and collates into the
typed batches of :mod:`alignkit.types`."""

from __future__ import annotations

import abc
import random
import sys
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from alignkit import seeds
from alignkit.data.formats import (
    PREFERENCE_COLUMNS,
    SFT_COLUMNS,
    DataError,
    PreferenceFormat,
    PreferenceRecord,
    SFTFormat,
    detect_format,
    load_rows,
    preference_records,
    sft_records,
)
from alignkit.data.report import DataReport
from alignkit.data.tokenize import Truncation, TruncationStats, encode_prompt, encode_response, truncate_to_fit
from alignkit.rollout import left_pad
from alignkit.task import Task
from alignkit.types import PreferenceBatch, PromptBatch, SFTBatch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from alignkit.module import AlignModule

IGNORE = -100

#: Reasons counted in the data report for preference pairs left out.
IDENTICAL = "identical chosen/rejected"
IDENTICAL_AFTER_TRUNCATION = "identical after truncation"

Length = int | Literal["auto"]

#: An SFT example, (prompt ids, response ids), and a row of examples packed together (``packing``).
SFTExample = tuple[list[int], list[int]]
PackedRow = list[SFTExample]


def _check_length(name: str, value: Any) -> None:
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise DataError(f"data.{name} must be a positive number of tokens or 'auto', got {value!r}")


def right_pad(rows: list[list[int]], pad: int, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    length = length or max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    # `decode` is typed for batches too (str | list[str]); one list of ids decodes to one str.
    return cast(str, tokenizer.decode(ids))


class ResumableSampler(DistributedSampler):
    """The training order: with ``shuffle``, a permutation seeded by ``seed + epoch``, so the order of an epoch
    never depends on what ran before; split over ``num_replicas`` data-parallel ranks as
    :class:`DistributedSampler` does (one replica: every row, in that order). ``skip`` drops the first indices
    of the next pass only: a resumed run continues an epoch after the rows it already trained on.

    With ``lengths`` (one per row), the epoch's order is grouped by length before the split: cut into
    mega-batches of ``group`` global batches (``batch_size × num_replicas`` rows), each sorted by length
    (longest first) and cut into global batches, whose order is then shuffled (with ``shuffle``; a last,
    partial batch stays last). Rank r's k-th batch holds rows of global batch k, so every rank's batches pad
    to similar lengths, and a 1-process run with the global batch size sees the same global batches."""

    skip: int = 0
    group: int = 32  # global batches per length-sorted mega-batch

    def __init__(self, *args, lengths: list[int] | None = None, batch_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if lengths is not None and len(lengths) != len(cast(Sized, self.dataset)):
            raise ValueError(f"{len(lengths)} lengths for {len(cast(Sized, self.dataset))} rows")
        self.lengths, self.batch_size = lengths, batch_size

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        # This rank's share, as DistributedSampler splits its permutation: padded with the order's first rows
        # (or cut, with drop_last) to total_size, then every num_replicas-th row from rank on.
        if self.drop_last or not order:
            order = order[: self.total_size]
        else:
            order = (order * -(-self.total_size // len(order)))[: self.total_size]
        indices = order[self.rank:: self.num_replicas]
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])

    def order(self) -> list[int]:
        """Every row of this epoch, in training order, before the split over ranks."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = len(cast(Sized, self.dataset))  # a list of examples (DistributedSampler needs a sized data set)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        return order if self.lengths is None else self.length_grouped(order, generator)

    def length_grouped(self, order: list[int], generator: torch.Generator) -> list[int]:
        size = self.batch_size * self.num_replicas  # a global batch
        mega = size * self.group
        lengths = self.lengths
        assert lengths is not None  # order() groups by length only with lengths
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start: start + mega], key=lambda i: -lengths[i])  # stable: ties keep order
            batches += [chunk[i: i + size] for i in range(0, len(chunk), size)]
        full = len(order) // size  # batches[full:] is the partial last batch, if any
        if self.shuffle:
            batches[:full] = [batches[i] for i in torch.randperm(full, generator=generator).tolist()]
        return [i for batch in batches for i in batch]


class ResumableLoader(DataLoader):
    """A training loader that resumes mid-epoch: ``state_dict()`` is the epoch of the current pass and the
    batches yielded in it; after ``load_state_dict`` the next pass continues that epoch after those batches
    (only their indices are drawn; nothing is loaded or collated), or starts the next epoch if it was complete.
    ``len()`` stays the whole epoch, as Lightning expects. Needs a :class:`ResumableSampler`.

    The loader numbers its own passes: the first takes the epoch Lightning set on the sampler, each later one
    the next number. (After resuming from a checkpoint written at an epoch's end, Lightning sets an epoch
    one too high.)
    """

    sampler: ResumableSampler  # (set by DataLoader)
    _yielded = 0
    _epoch: int | None = None  # of the current (or last) pass
    _resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch if self._epoch is None else self._epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    # A generator of batches rather than DataLoader's iterator class: Lightning only iterates it.
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: this runs at the first batch, after Lightning has set the sampler's epoch.
        sampler, resume, skip = self.sampler, self._resume, 0
        self._resume = None
        if resume is not None:
            finished = resume["batches"] >= len(self)
            self._epoch = resume["epoch"] + 1 if finished else resume["epoch"]
            skip = 0 if finished else resume["batches"]
        else:
            self._epoch = sampler.epoch if self._epoch is None else self._epoch + 1
        sampler.set_epoch(self._epoch)
        assert self.batch_size is not None  # train_dataloader batches by batch_size
        sampler.skip = skip * self.batch_size
        self.generator.manual_seed(sampler.seed + self._epoch)  # worker seeds, also on resume
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch


class AlignData(L.LightningDataModule, abc.ABC):
    """Common options of every alignkit data module."""

    kind: str = ""

    def __init__(self, path: str | None = None, task: Task | None = None, split: str = "train",
                 batch_size: int = 16, max_length: Length = 256, max_prompt_length: Length = 128,
                 truncation: Truncation = "truncate", val_fraction: float = 0.05, limit: int | None = None,
                 chat_template: bool = False, bootstrap: bool = False, shuffle: bool = True, seed: int | None = None,
                 num_workers: int = 0, group_by_length: bool = False):
        """
        Args:
            path: a ``.jsonl``/``.json``/``.parquet`` file, a ``save_to_disk`` folder, or an HF data set name.
            task: a built-in or plugin task whose data is used when ``path`` is not given.
            split: the split read from an HF data set.
            batch_size: examples per batch (per device).
            max_length: longest prompt + response, in tokens; ``auto``: the longest example of the data, capped
                by the model's context (printed at set-up).
            max_prompt_length: longest prompt, in tokens; ``auto``: the longest prompt of the data, or, when not
                every example fits in ``max_length``, what leaves room for the answer (its longest length, at
                most half of ``max_length``).
            truncation: what to do with longer examples: truncate, drop, or error. Truncated and dropped
                examples are counted in the data report printed at set-up (and stored in ``metrics.json``).
            val_fraction: fraction of the examples held out for validation (0: none).
            limit: use only the first ``limit`` examples.
            chat_template: wrap plain-text prompts in the tokenizer's chat template.
            bootstrap: resample the training examples with replacement (same size, seeded by ``seed``) after
                the validation hold-out, e.g. to train the members of a reward-model ensemble.
            shuffle: shuffle the training examples every epoch (seeded); without it, a run on N processes sees
                exactly the global batches of a 1-process run (rank r takes rows r, r+N, ...).
            seed: seed of the train/validation split, the bootstrap and the shuffling; None: derived from the
                run's seed (role ``data.seed``, :mod:`alignkit.seeds`; set by ``setup``).
            num_workers: DataLoader worker processes.
            group_by_length: batch training examples of similar length, so batches carry less padding: each
                epoch's order (shuffled or not) is cut into mega-batches of 32 global batches, each sorted by
                length, and the batches are shuffled (with ``shuffle``). Seeded, resumable mid-epoch and split
                over ranks like the plain order.
        """
        super().__init__()
        if path is None and task is None:
            raise DataError(f"{type(self).__name__}: give data.path or data.task")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        _check_length("max_length", max_length)
        _check_length("max_prompt_length", max_prompt_length)
        self.path, self.task, self.split = path, task, split
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.truncation, self.val_fraction, self.limit = truncation, val_fraction, limit
        self.chat_template, self.bootstrap, self.shuffle = chat_template, bootstrap, shuffle
        self.seed, self.num_workers, self.group_by_length = seed, num_workers, group_by_length
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.context: int | None = None  # the model's context length, which caps `auto` lengths
        self.auto: dict[str, str] = {}  # limit -> how `auto` set it
        self.stats = TruncationStats()
        self.rows_read = self.tokens = self.unk_tokens = self.identical_pairs = 0
        self.report: DataReport | None = None
        self.train_set: list[Any] = []
        self.val_set: list[Any] = []
        self.train_loader_state: dict[str, int] | None = None

    @property
    def run_seed(self) -> int:
        """``seed``, or while it is unset the seed derived for role ``data.seed`` (``setup`` pins it)."""
        return seeds.resolve_seed(self.seed, seeds.DATA)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else f"task {type(self.task).__name__}"

    def rows(self) -> list[dict[str, Any]]:
        rows = load_rows(self.path, self.split) if self.path is not None else self.task_rows()
        return rows[: self.limit] if self.limit else rows

    def task_rows(self) -> list[dict[str, Any]]:
        raise DataError(f"{type(self).__name__} cannot read data from a task; give data.path")

    @property
    def response_names(self) -> list[str]:
        """Names of an example's responses in the data report."""
        return ["response"]

    @property
    def format_name(self) -> str | None:
        """The row format, for the data report."""
        return None

    def length(self, example: Any) -> int:
        """The length (in tokens) that ``example`` pads a batch to, for ``group_by_length``."""
        raise DataError(f"{type(self).__name__} does not support group_by_length (it defines no length())")

    @abc.abstractmethod
    def encode(self, rows: list[dict[str, Any]]) -> list[Any]:
        """Validate and tokenise rows into examples: tokenise every row, then :meth:`resolve_lengths` and
        :meth:`fit_example` each (which count lengths, truncations and ``<unk>`` for the data report)."""

    def attach(self, tokenizer, context: int | None = None) -> None:
        """Give the data module its tokenizer (done by ``setup`` from the LightningModule in training) and the
        model's context length (``context``; default: the tokenizer's ``model_max_length`` if it sets one), which
        caps ``auto`` lengths."""
        self.tokenizer = tokenizer
        limit = getattr(tokenizer, "model_max_length", None)
        self.context = context or (limit if isinstance(limit, int) and 0 < limit < 10**7 else None)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            from alignkit.models.loading import context_length

            assert self.trainer is not None, "setup outside a Trainer needs attach(tokenizer) first"
            module = cast("AlignModule", self.trainer.lightning_module)
            self.attach(module.tokenizer, context_length(module.policy))
        self.seed = self.run_seed
        if self.train_set:
            return
        self.stats = TruncationStats()
        self.rows_read = self.tokens = self.unk_tokens = self.identical_pairs = 0
        examples = self.encode(self.rows())
        if not examples:
            dropped = "; ".join(f"{n} {reason}" for reason, n in self.stats.dropped_by.items())
            raise DataError(f"{self.source}: no usable examples ({self.stats.dropped} of {self.rows_read} rows "
                            f"dropped{f': {dropped}' if dropped else ''})")
        self.train_set, self.val_set = self.hold_out(examples)
        if self.bootstrap:
            rng = random.Random(f"bootstrap:{self.run_seed}")
            self.train_set = [self.train_set[rng.randrange(len(self.train_set))] for _ in self.train_set]
        max_length, max_prompt_length = self._resolved_lengths()
        self.report = DataReport(
            source=self.source, kind=self.kind, format=self.format_name, rows=self.rows_read,
            train=len(self.train_set), val=len(self.val_set), stats=self.stats, max_length=max_length,
            max_prompt_length=max_prompt_length, responses=self.response_names, auto=dict(self.auto),
            tokens=self.tokens, unk_tokens=self.unk_tokens, identical_pairs=self.identical_pairs, **self.hints())
        self.publish_report()

    def hints(self) -> dict[str, str]:
        """What fixes a high ``<unk>`` rate (``unk``) and a context too short for ``auto`` lengths (``context``):
        for the tiny model, its own options."""
        policy = getattr(getattr(self.trainer, "lightning_module", None), "policy_config", None)
        if policy is None or getattr(policy, "name_or_path", None) != "tiny":
            return {}
        context = policy.tiny.max_position_embeddings
        hints = {"context": f"raise model.policy.tiny.max_position_embeddings (now {context})"}
        if self.path is not None:
            hints["unk"] = (f"train the tiny model's tokenizer on this data too "
                            f"(--model.policy.tiny.data={self.path}), "
                            f"or use a pretrained model (model.policy.name_or_path)")
        return hints

    def publish_report(self) -> None:
        """Print the data report (and its warnings, one line each, on stderr) on global rank 0, and give it to
        the trainer's loggers (wandb's config) as hyperparameters."""
        report, trainer = self.report, self.trainer
        if report is None or (trainer is not None and not trainer.is_global_zero):
            return
        print(report.text(), flush=True)
        for warning in report.warnings():
            print(f"alignkit: warning: {warning}", file=sys.stderr, flush=True)
        from lightning.pytorch.loggers import CSVLogger

        for logger in getattr(trainer, "loggers", None) or []:
            if not isinstance(logger, CSVLogger):  # the run directory has it already, in metrics.json
                logger.log_hyperparams({"data_report": report.as_dict()})

    def resolve_lengths(self, items: list[tuple[int, list[int], list[list[int]]]]) -> None:
        """Set the limits given as ``auto`` from the tokenised examples ``(row, prompt ids, response ids)``.

        ``max_length``: the longest example (prompt + longest response), capped by the model's context.
        ``max_prompt_length``: the longest prompt, when every example fits in ``max_length``; otherwise
        ``max_length`` less the room kept for the response (its longest length, at most half of ``max_length``),
        so that a cut example keeps the end of its prompt and most of its answer. Capped by the context too."""
        if "auto" not in (self.max_length, self.max_prompt_length):
            return
        longest_prompt = max((len(p) for _, p, _ in items), default=1)
        longest_response = max((len(r) for _, _, rs in items for r in rs), default=0)
        longest = max((len(p) + max(map(len, rs), default=0) for _, p, rs in items), default=1)
        cap = self.context or max(longest, longest_prompt)  # no context known: no cap
        if self.max_length == "auto":
            self.max_length = max(min(longest, cap), 2)
            self.auto["max_length"] = (f"the model's context (longest example: {longest} tokens)" if longest > cap
                                       else "the longest example")
        if self.max_prompt_length == "auto":
            max_length = self.max_length
            assert max_length != "auto"  # resolved above
            if longest <= max_length and longest_prompt <= cap:
                self.max_prompt_length, why = longest_prompt, "the longest prompt"
            else:
                reserve = min(longest_response, max_length // 2)
                self.max_prompt_length = prompt_length = max(min(longest_prompt, cap, max_length - reserve), 1)
                why = (f"max_length - {reserve} tokens kept for the response (longest prompt: {longest_prompt} "
                       f"tokens)" if longest_prompt > prompt_length else "the longest prompt")
            self.auto["max_prompt_length"] = why

    def _resolved_lengths(self) -> tuple[int, int]:
        """``(max_length, max_prompt_length)`` once :meth:`resolve_lengths` has set those given as ``auto``."""
        max_length, max_prompt_length = self.max_length, self.max_prompt_length
        assert max_length != "auto" and max_prompt_length != "auto", "resolve_lengths() sets the auto lengths"
        return max_length, max_prompt_length

    def fit_example(self, row: int, prompt_ids: list[int], responses: list[list[int]]
                    ) -> tuple[list[int], list[list[int]]] | None:
        """Count the example's tokens and ``<unk>`` tokens, then apply the truncation policy (None: dropped)."""
        self.count_tokens([prompt_ids, *responses])
        max_length, max_prompt_length = self._resolved_lengths()
        return truncate_to_fit(prompt_ids, responses, max_length, max_prompt_length, self.truncation,
                               self.stats, f"{self.source} row {row + 1}")

    def fitted_pairs(self, rows: list[dict[str, Any]], fmt: PreferenceFormat, strict: bool
                     ) -> list[tuple[int, PreferenceRecord, list[int], list[int], list[int]]]:
        """Preference rows read in format ``fmt``, encoded, given ``auto`` lengths and truncated:
        ``(row index, record, prompt_ids, chosen_ids, rejected_ids)`` for each pair kept. A pair whose answers are
        the same text, or the same tokens after truncation, is dropped and counted (``strict``: refused in one line
        naming the row). Shared by every data module that reads preference pairs."""
        tokenizer: Any = self.tokenizer
        items: list[tuple[int, list[int], list[list[int]]]] = []
        records = {}
        for i, record in enumerate(preference_records(rows, fmt, self.source)):
            if record.identical:
                if strict:
                    raise DataError(f"{self.source} row {i + 1}: 'chosen' and 'rejected' are the same text "
                                    f"{record.chosen.strip()[:40]!r} (strict: true refuses such pairs)")
                self.identical_pairs += 1
                self.stats.drop(IDENTICAL)
                continue
            prompt_ids = encode_prompt(tokenizer, record.prompt, self.chat_template)
            chosen = encode_response(tokenizer, record.prompt, prompt_ids, record.chosen, self.chat_template)
            rejected = encode_response(tokenizer, record.prompt, prompt_ids, record.rejected, self.chat_template)
            items.append((i, prompt_ids, [chosen, rejected]))
            records[i] = record
        self.resolve_lengths(items)
        kept = []
        for i, prompt_ids, responses in items:
            fitted = self.fit_example(i, prompt_ids, responses)
            if fitted is None:
                continue
            prompt_ids, (chosen, rejected) = fitted
            if chosen == rejected:  # both answers cut to the same tokens: nothing left to prefer
                if strict:
                    raise DataError(f"{self.source} row {i + 1}: 'chosen' and 'rejected' are identical after "
                                    f"truncation to max_length={self.max_length} (strict: true); raise data.max_length")
                self.stats.drop(IDENTICAL_AFTER_TRUNCATION)
                continue
            kept.append((i, records[i], prompt_ids, chosen, rejected))
        return kept

    def count_tokens(self, sequences: list[list[int]]) -> None:
        tok = self.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        # Some tokenizers name their EOS or pad token as unk (GPT-2): those ids are not unknown text.
        if unk in (None, getattr(tok, "eos_token_id", None), getattr(tok, "pad_token_id", None),
                   getattr(tok, "bos_token_id", None)):
            unk = None
        for ids in sequences:
            self.tokens += len(ids)
            if unk is not None:
                self.unk_tokens += ids.count(unk)

    def hold_out(self, examples: list[Any]) -> tuple[list[Any], list[Any]]:
        """Seeded random hold-out of ``val_fraction`` of the examples (order otherwise kept)."""
        order = list(range(len(examples)))
        random.Random(self.run_seed).shuffle(order)
        n_val = int(len(examples) * self.val_fraction)
        return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer  # None outside a Trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Our own sampler, also on one process: Lightning's automatic one always shuffles training data.
        lengths = [self.length(e) for e in self.train_set] if self.group_by_length else None
        sampler = ResumableSampler(self.train_set, num_replicas=world, rank=rank, shuffle=self.shuffle,
                                   seed=self.run_seed, lengths=lengths, batch_size=self.batch_size)
        # (A list of examples serves as the map-style data set; torch types that as Dataset.)
        loader = ResumableLoader(cast("Dataset[Any]", self.train_set), batch_size=self.batch_size, sampler=sampler,
                                 collate_fn=self.collate, num_workers=self.num_workers,
                                 generator=torch.Generator().manual_seed(self.run_seed))
        if self.train_loader_state is not None:  # restored from a checkpoint: the trainer's loader asks first
            loader.load_state_dict(self.train_loader_state)
            self.train_loader_state = None
        return loader

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        # A private generator: iterating the loader never draws from the global RNG (which sampling uses).
        return DataLoader(cast("Dataset[Any]", self.val_set), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.num_workers,
                          generator=torch.Generator().manual_seed(self.run_seed))

    @abc.abstractmethod
    def collate(self, examples: list[Any]):
        """Pad a list of examples into the typed batch of this data kind."""

    def state_dict(self) -> dict[str, Any]:
        """The data report (:class:`~alignkit.data.report.DataReport`: rows, drops, truncation, lengths, ``<unk>``)
        and, during training, the train loader's position (stored in checkpoints)."""
        state: dict[str, Any] = {
            "truncated": self.stats.truncated, "dropped": self.stats.dropped, "examples": self.stats.examples,
        }
        if self.report is not None:
            state.update(self.report.as_dict())
        loader = self.trainer.train_dataloader if self.trainer is not None else None
        if isinstance(loader, ResumableLoader):
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's train loader position for the next :meth:`train_dataloader`. Lightning restores
        the data module before it builds the trainer's loader, whereas its fit loop restores loader states only
        after the loader was first built (to count the training steps) and so never hands them over."""
        self.train_loader_state = state_dict.get("train_loader")


class SFTData(AlignData):
    """Demonstrations for supervised fine-tuning: prompt/response, Alpaca or chat ``messages`` rows, or a
    task's built-in demonstrations. Labels cover response tokens only."""

    kind = "sft"

    def __init__(self, *args, format: SFTFormat = "auto", packing: bool = False, **kwargs):
        """
        Args:
            format: the row format (auto-detected from the columns by default).
            packing: pack several examples into each row of ``max_length`` tokens (position ids restart
                at every example; attention is not blocked between packed examples unless the model's
                attention implementation reads packed position ids, e.g. flash-attention).
        """
        super().__init__(*args, **kwargs)
        self.format, self.packing = format, packing
        self._rows: list[dict[str, Any]] = []

    def task_rows(self) -> list[dict[str, Any]]:
        assert self.task is not None  # read without data.path (__init__ needs one of them)
        return [{"prompt": d.prompt, "response": d.response} for d in self.task.demonstrations()]

    @property
    def format_name(self) -> str | None:
        if self.format != "auto" or not self._rows:
            return self.format
        return detect_format(self._rows, SFT_COLUMNS, self.source)

    def encode(self, rows: list[dict[str, Any]]) -> list[SFTExample] | list[PackedRow]:
        """Examples ``(prompt ids, response ids)``; with ``packing``, rows of them packed together."""
        self.rows_read += len(rows)
        self._rows = rows[:1]
        tokenizer = self.tokenizer
        assert tokenizer is not None  # attach() or setup() gives it
        items: list[tuple[int, list[int], list[list[int]]]] = []
        for i, record in enumerate(sft_records(rows, self.format, self.source)):
            prompt_ids = encode_prompt(tokenizer, record.prompt, self.chat_template)
            response_ids = encode_response(tokenizer, record.prompt, prompt_ids, record.response, self.chat_template)
            items.append((i, prompt_ids, [response_ids]))
        self.resolve_lengths(items)
        examples: list[SFTExample] = []
        for i, prompt_ids, responses in items:
            fitted = self.fit_example(i, prompt_ids, responses)
            if fitted is not None:
                examples.append((fitted[0], fitted[1][0]))
        return pack(examples, self._resolved_lengths()[0]) if self.packing else examples

    # An example is a packed row with `packing`, else one (prompt, response) pair: `packing` decides which.
    def length(self, example: SFTExample | PackedRow) -> int:
        pairs = cast(PackedRow, example) if self.packing else [cast(SFTExample, example)]
        return sum(len(p) + len(r) for p, r in pairs)

    def collate(self, examples: list[SFTExample] | list[PackedRow]) -> SFTBatch:
        tokenizer = self.tokenizer
        assert tokenizer is not None  # attach() or setup() gives it
        if self.packing:
            return collate_packed(cast(list[PackedRow], examples), tokenizer.pad_token_id)
        pairs = cast(list[SFTExample], examples)
        ids, mask = right_pad([p + r for p, r in pairs], tokenizer.pad_token_id)
        labels = torch.full_like(ids, IGNORE)
        for i, (p, r) in enumerate(pairs):
            labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
        return SFTBatch(input_ids=ids, attention_mask=mask, labels=labels)


def pack(examples: list[SFTExample], max_length: int) -> list[PackedRow]:
    """Greedy first-fit packing of (prompt, response) examples into rows of at most ``max_length`` tokens."""
    rows: list[PackedRow] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -(len(e[0]) + len(e[1]))):
        size = len(example[0]) + len(example[1])
        slot = next((j for j, free in enumerate(room) if free >= size), None)
        if slot is None:
            rows.append([example])
            room.append(max_length - size)
        else:
            rows[slot].append(example)
            room[slot] -= size
    return rows


def collate_packed(rows: list[PackedRow], pad: int) -> SFTBatch:
    flat = [[t for p, r in row for t in p + r] for row in rows]
    ids, mask = right_pad(flat, pad)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        start = 0
        for p, r in row:
            n = len(p) + len(r)
            labels[i, start + len(p): start + n] = torch.tensor(r)
            positions[i, start: start + n] = torch.arange(n)
            start += n
    return SFTBatch(input_ids=ids, attention_mask=mask, labels=labels, position_ids=positions)


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenised comparison; ``index`` is its row in the data set (before the hold-out split)."""

    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float = 0.0
    soft_label: float = 1.0


@dataclass(frozen=True)
class PromptExample:
    """One tokenised prompt and its text; ``index`` is its row in the data set."""

    index: int
    text: str
    ids: list[int]


class PreferenceData(AlignData):
    """Preference pairs (explicit, implicit/HH-RLHF or conversational rows) for reward models and DPO."""

    kind = "preference"

    def __init__(self, *args, format: PreferenceFormat = "auto", strict: bool = False, **kwargs):
        """
        Args:
            format: the row format (auto-detected from the columns by default).
            strict: refuse (with an error naming the row) a pair whose chosen and rejected answers are the same
                text, or become the same tokens when truncated; by default such pairs are dropped and counted in
                the data report.
        """
        super().__init__(*args, **kwargs)
        self.format, self.strict = format, strict
        self._rows: list[dict[str, Any]] = []

    @property
    def response_names(self) -> list[str]:
        return ["chosen", "rejected"]

    @property
    def format_name(self) -> str | None:
        if self.format != "auto" or not self._rows:
            return self.format
        return detect_format(self._rows, PREFERENCE_COLUMNS, self.source)

    def encode(self, rows: list[dict[str, Any]]) -> list[PreferenceExample]:
        self.rows_read += len(rows)
        self._rows = rows[:1]
        assert self.tokenizer is not None  # attach() or setup() gives it
        return [PreferenceExample(i, prompt_ids, chosen, rejected, record.margin, record.soft_label)
                for i, record, prompt_ids, chosen, rejected in self.fitted_pairs(rows, self.format, self.strict)]

    def length(self, example: PreferenceExample) -> int:
        return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))

    def collate(self, examples: list[PreferenceExample]) -> PreferenceBatch:
        answers = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]  # chosen rows, then rejected
        prompts = [e.prompt_ids for e in examples] * 2
        sequences = [p + a for p, a in zip(prompts, answers)]
        responses = [(len(p), len(a)) for p, a in zip(prompts, answers)]
        assert self.tokenizer is not None  # attach() or setup() gives it
        ids, mask = right_pad(sequences, self.tokenizer.pad_token_id)
        loss_mask = torch.zeros_like(mask)
        for row, (start, length) in enumerate(responses):
            loss_mask[row, start: start + length] = 1
        return PreferenceBatch(
            input_ids=ids, attention_mask=mask, loss_mask=loss_mask,
            margin=torch.tensor([e.margin for e in examples], dtype=torch.float32),
            index=torch.tensor([e.index for e in examples], dtype=torch.long),
            soft_label=torch.tensor([e.soft_label for e in examples], dtype=torch.float32),
        )


class PromptData(AlignData):
    """Prompts for online algorithms (PPO and friends): a ``prompt`` column (or ``messages`` without the
    final answer) from a file, or a task's train prompts; validation uses the task's eval prompts."""

    kind = "prompt"

    def __init__(self, *args, column: str = "prompt", **kwargs):
        """
        Args:
            column: the column holding the prompt text (or a list of messages).
        """
        super().__init__(*args, **kwargs)
        self.column = column

    def task_rows(self) -> list[dict[str, Any]]:
        assert self.task is not None  # read without data.path (__init__ needs one of them)
        return [{self.column: p} for p in self.task.train_prompts()]

    @property
    def response_names(self) -> list[str]:
        return []

    def encode(self, rows: list[dict[str, Any]]) -> list[PromptExample]:
        if rows and self.column not in rows[0]:
            raise DataError(f"{self.source}: prompt column {self.column!r} missing; found {', '.join(sorted(rows[0]))}")
        self.rows_read += len(rows)
        tokenizer = self.tokenizer
        assert tokenizer is not None  # attach() or setup() gives it
        items: list[tuple[int, list[int], list[list[int]]]] = []
        texts: dict[int, str] = {}
        for i, row in enumerate(rows):
            prompt = row[self.column]
            if not prompt or (isinstance(prompt, str) and not prompt.strip()):
                raise DataError(f"{self.source} row {i + 1}: empty {self.column!r}")
            ids = encode_prompt(tokenizer, prompt, self.chat_template)
            items.append((i, ids, []))
            texts[i] = prompt if isinstance(prompt, str) else _decode(tokenizer, ids)
        self.resolve_lengths(items)
        max_prompt_length = self._resolved_lengths()[1]
        examples = []
        for i, ids, _ in items:
            self.count_tokens([ids])
            fitted = truncate_to_fit(ids, [[]], max_prompt_length, max_prompt_length, self.truncation,
                                     self.stats, f"{self.source} row {i + 1}")
            if fitted is None:
                continue
            text = texts[i]
            if fitted[0] != ids:
                # Reward models and the gold reward must judge the prompt the policy saw, not the one it was cut from.
                text = _decode(tokenizer, fitted[0])
            examples.append(PromptExample(i, text, fitted[0]))
        return examples

    def hold_out(self, examples: list[Any]) -> tuple[list[Any], list[Any]]:
        if self.path is not None:
            return super().hold_out(examples)
        # A task has its own held-out prompts: validate on those, train on every train prompt.
        assert self.task is not None  # __init__ needs data.path or data.task
        return examples, self.encode([{self.column: p} for p in self.task.eval_prompts()])

    def length(self, example: PromptExample) -> int:
        return len(example.ids)

    def collate(self, examples: list[PromptExample]) -> PromptBatch:
        assert self.tokenizer is not None  # attach() or setup() gives it
        ids, mask = left_pad([e.ids for e in examples], self.tokenizer.pad_token_id)
        return PromptBatch(input_ids=ids, attention_mask=mask, prompts=[e.text for e in examples],
                           index=torch.tensor([e.index for e in examples], dtype=torch.long))
