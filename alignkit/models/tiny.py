"""The built-in tiny model: a Llama-architecture config and a BPE tokenizer trained locally (with the
``tokenizers`` library) on a task's corpus, so everything runs with no hub access."""

from __future__ import annotations

from dataclasses import dataclass

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
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    seed: int | None = None
    """Seed of the random initialisation; None: derived from the run's seed (role ``model.policy.tiny.seed``,
    :mod:`alignkit.seeds`). The tokenizer does not depend on it."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"tiny.hidden_size={self.hidden_size} is not divisible by tiny.num_heads={self.num_heads}")


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-pair tokenizer with Metaspace pre-tokenisation (spaces survive a decode round trip)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted({c for text in corpus for c in text} | set("0123456789abcdefghijklmnopqrstuvwxyz .,:!?\n"))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def init_seed(config: TinyModelConfig) -> int:
    """The seed of the tiny model's initial weights: ``config.seed``, or the one derived for
    :data:`alignkit.seeds.MODEL_INIT` from the global seed when it is None."""
    from alignkit.seeds import MODEL_INIT, resolve_seed

    return resolve_seed(config.seed, MODEL_INIT)


def build_tiny_model(config: TinyModelConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Llama (weights seeded by :func:`init_seed`) and its tokenizer, trained on the
    corpus of ``config.task`` with the task's default seed: the same vocabulary whatever the model's seed."""
    from alignkit.manager import find_task

    task = find_task(config.task)()
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
