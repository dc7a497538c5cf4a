"""The built-in tiny model: a Llama-architecture config and a BPE tokenizer trained locally (with the
``tokenizers`` library) on a task's corpus, so everything runs with no hub access.

On the task's corpus alone the tokenizer is character-level BPE over the corpus's characters (what the
built-in tasks use; other characters become ``<unk>``). Given user data (``TinyModelConfig.data``), it is
byte-level BPE trained on the task's corpus plus every text of that data: any text, in any script, encodes
without ``<unk>`` and decodes back exactly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# A minimal chat template so chat-format data and `apply_chat_template` work with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny model (used when ``name_or_path`` is ``"tiny"``)."""

    task: str = "sentiment"
    """Registered task whose corpus trains the tokenizer."""
    vocab_size: int = 512
    """Upper bound on the BPE vocabulary (the corpus may need fewer tokens)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block (``hidden_size`` must be divisible by it)."""
    intermediate_size: int = 256
    """Width of the MLP's hidden layer."""
    max_position_embeddings: int = 256
    """Longest sequence (prompt + response, in tokens) the model accepts."""
    seed: int | None = None
    """Seed of the random initialisation; None: derived from the run's seed (role ``model.policy.tiny.seed``,
    :mod:`alignkit.seeds`). The tokenizer does not depend on it."""
    data: str | list[str] | None = None
    """Your data file(s) (``.jsonl``/``.json``/``.parquet``, a ``save_to_disk`` folder or an HF data set name, as
    ``data.path`` takes them): every text in them joins the task's corpus in training the tokenizer, which is then
    byte-level BPE (never ``<unk>``). Give the data you train on, e.g. the value of ``data.init_args.path``.
    None: the task's corpus alone (the built-in tasks' tokenizer)."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tiny.hidden_size={self.hidden_size} is not divisible by tiny.num_heads={self.num_heads}")


def build_tokenizer(corpus: list[str], vocab_size: int, byte_level: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-pair tokenizer on ``corpus``. By default with Metaspace pre-tokenisation over the corpus's
    characters (spaces survive a decode round trip; other characters become ``<unk>``); with ``byte_level``, over
    the 256 bytes (GPT-2's byte-level BPE): every text encodes without ``<unk>`` and decodes back exactly."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = sorted({c for text in corpus for c in text} | set("0123456789abcdefghijklmnopqrstuvwxyz .,:!?\n"))
    if byte_level and vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"tiny.vocab_size={vocab_size} is too small for a byte-level tokenizer (tiny.data): "
                         f"it needs at least {len(alphabet) + len(SPECIAL_TOKENS)} "
                         f"(256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def row_texts(value: Any) -> Iterator[str]:
    """Every string in a row's values (nested lists and dicts included: chat messages, their roles too)."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from row_texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from row_texts(item)


def data_corpus(paths: str | list[str]) -> list[str]:
    """The texts of user data files for the tokenizer: every string of every row, plus the text the data
    formats add around them (the Alpaca template)."""
    from alignkit.data.formats import ALPACA_TEMPLATE_WITH_INPUT, load_rows

    corpus = [ALPACA_TEMPLATE_WITH_INPUT]
    for path in [paths] if isinstance(paths, str) else paths:
        corpus += list(row_texts(load_rows(path)))
    return corpus


def init_seed(config: TinyModelConfig) -> int:
    """The seed of the tiny model's initial weights: ``config.seed``, or the one derived for
    :data:`alignkit.seeds.MODEL_INIT` from the global seed when it is None."""
    from alignkit.seeds import MODEL_INIT, resolve_seed

    return resolve_seed(config.seed, MODEL_INIT)


def build_tiny_model(config: TinyModelConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Llama (weights seeded by :func:`init_seed`) and its tokenizer, trained on the
    corpus of ``config.task`` with the task's default seed (plus the texts of ``config.data``, byte-level, when
    given): the same vocabulary whatever the model's seed."""
    from alignkit.manager import find_task

    task = find_task(config.task)()
    if config.data:
        tokenizer = build_tokenizer(task.corpus() + data_corpus(config.data), config.vocab_size, byte_level=True)
    else:
        tokenizer = build_tokenizer(task.corpus(), config.vocab_size)
    llama = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads, max_position_embeddings=config.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed(config))
        model = LlamaForCausalLM(llama)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
