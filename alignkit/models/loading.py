"""Load models and tokenizers: any HF hub name or local directory through the ``Auto*`` classes, or the
built-in tiny model. Every stage writes ``save_pretrained`` output that plain ``transformers`` loads."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignkit.errors import ConfigError
from alignkit.models.final_layer import final_layer_at
from alignkit.models.tiny import TinyModelConfig, build_tiny_model, init_seed
from alignkit.ops import accepts_argument, unwrap_peft

if TYPE_CHECKING:
    from peft import PeftModel

ModelHead = Literal["causal_lm", "sequence_classification"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapters through peft. With LoRA, the reference policy is the policy with adapters disabled."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear"."""


@dataclass
class ModelConfig:
    """Which model to load and how."""

    name_or_path: str = "tiny"
    """HF hub name or local directory (e.g. a previous stage's ``model/``), or "tiny" for the built-in tiny
    Llama trained from scratch."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model (used only when ``name_or_path`` is "tiny")."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype at load time (mixed precision is the trainer's ``precision``)."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights."""
    quantization: Literal["4bit", "8bit"] | None = None
    """QLoRA: load the frozen base weights quantized by bitsandbytes (``4bit``: NF4 with double quantization,
    computing in ``dtype``; ``8bit``: LLM.int8) and train ``lora`` adapters on them. The exported model merges the
    adapters into the base loaded again unquantized."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less activation memory for one more forward pass."""
    trust_remote_code: bool = False
    """Let transformers run the model's own code from its hub repository or directory (needed by some models)."""


def _source(cfg: ModelConfig) -> str:
    """The path or hub name, with a clear error for a local path that does not exist."""
    name = cfg.name_or_path
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not (Path(name).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"model name_or_path {name!r}: no such model directory (config.json missing)")
    return str(Path(name).expanduser()) if looks_local else name


def load_model(cfg: ModelConfig, head: ModelHead) -> tuple[PreTrainedModel | PeftModel, PreTrainedTokenizerBase]:
    """Load (or build) a model with the requested head, and its tokenizer (the model in a peft wrapper with
    ``cfg.lora``)."""
    if cfg.quantization is not None:
        model, tokenizer = _load_quantized(cfg, head)
    elif cfg.name_or_path == "tiny":
        model, tokenizer = build_tiny_model(cfg.tiny)
        if head == "sequence_classification":
            config = model.config.to_dict()
            config.pop("id2label", None), config.pop("label2id", None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed(cfg.tiny))
                model = LlamaForSequenceClassification(model.config.__class__(**{**config, "num_labels": 1}))
    else:
        source = _source(cfg)
        kwargs = dict(dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
            if head == "causal_lm":
                model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            else:
                model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
        except OSError as exc:
            raise OSError(f"model name_or_path {cfg.name_or_path!r} could not be loaded: "
                          f"{str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        cast(nn.Module, model).to(DTYPES[cfg.dtype])  # transformers' @wraps(nn.Module.to) hides the method from mypy
        if cfg.gradient_checkpointing:  # transformers 5 renamed it (the old name warns)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.lora is not None:
        return _add_lora(model, cfg.lora, head), tokenizer
    return model, tokenizer


def _load_quantized(cfg: ModelConfig, head: ModelHead) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """QLoRA's base: the model quantized by bitsandbytes at load time (``load_model`` prepares it for k-bit
    training and adds the adapters)."""
    if cfg.lora is None:
        raise ConfigError(f"model.quantization={cfg.quantization!r} needs model.lora: a quantized base stays frozen, "
                          f"only adapters train")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.quantization={cfg.quantization!r} needs bitsandbytes, which is not installed: "
                          f"pip install 'alignkit[qlora]' (or pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[cfg.dtype]
    if cfg.quantization == "4bit":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=dtype)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    cls = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    extra = {} if head == "causal_lm" else {"num_labels": 1}
    with tempfile.TemporaryDirectory(prefix="alignkit-tiny-") as folder:
        if cfg.name_or_path == "tiny":  # the built-in model goes through the same from_pretrained path
            plain, tokenizer = load_model(replace(cfg, quantization=None, lora=None), head)
            plain.save_pretrained(folder)
            source = folder
        else:
            source = _source(cfg)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model = cls.from_pretrained(source, quantization_config=quantization, dtype=dtype,
                                    trust_remote_code=cfg.trust_remote_code, **extra)
    return model, tokenizer


def _add_lora(model: PreTrainedModel, lora: LoraSettings, head: ModelHead) -> PeftModel:
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = TaskType.CAUSAL_LM if head == "causal_lm" else TaskType.SEQ_CLS
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type=task_type)
    return get_peft_model(model, config)


#: Config attributes that hold a model's context length, by architecture family.
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes (its config's ``max_position_embeddings`` or the family's equivalent);
    None when its config names none."""
    config = getattr(unwrap_peft(model), "config", None)
    text_config = getattr(config, "get_text_config", None)
    if callable(text_config):  # a multimodal model's text decoder (Gemma 3's) has its own config inside
        config = text_config()
    for name in CONTEXT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real (non-pad) token of each row, for left or right padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(-1)


def sequence_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | dict[str, Tensor],
                    position_ids: Tensor | None = None, score_at: Tensor | None = None) -> Tensor:
    """Scalar score of each sequence read at its last real token (never at a pad), (B, T) -> (B,).

    Decoder classifiers (``*ForSequenceClassification`` with a ``score`` head) are pooled here from the
    per-token scores, independent of which id the padding uses; other classifiers use their own pooling.
    For packed rows (:mod:`alignkit.pairs`) pass the 4D ``attention_mask`` (or the dict of one mask per layer type
    that :meth:`~alignkit.pairs.SharedPromptPairs.attention_mask_for` gives a model mixing full and sliding-window
    layers), the ``position_ids`` and ``score_at``, the ``(B, K)`` columns to read: the result is then ``(B, K)``
    (decoder classifiers only). The final decoder layer runs at the scored columns only where the model allows it
    (:func:`~alignkit.models.final_layer.final_layer_at`).
    """
    base = unwrap_peft(model)
    head = getattr(base, "score", None)
    if isinstance(head, nn.Module):
        prefix = cast(str, base.base_model_prefix)  # a PreTrainedModel's (nn.Module types it as Tensor | Module)
        backbone = getattr(base, prefix)
        extra: dict[str, bool | Tensor] = {}
        if accepts_argument(backbone, "use_cache"):
            extra["use_cache"] = False  # no KV cache to build
        if position_ids is not None:
            extra["position_ids"] = position_ids
        index = last_token_index(cast(Tensor, attention_mask)) if score_at is None else score_at  # (B,) or (B, K)
        with final_layer_at(backbone, index) as only_read:  # the last layer runs at the scored columns alone
            hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if only_read:  # (B, K, H), or (B, 1, H) for a (B,) index
            pooled = hidden if index.dim() > 1 else hidden[:, 0]
        else:  # (B, T, H)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows.view(-1, *[1] * (index.dim() - 1)), index]  # (B, H) or (B, K, H)
        return head(pooled).squeeze(-1).float()
    if score_at is not None:
        raise ValueError(f"{type(base).__name__} has no per-token score head; it cannot score packed rows "
                         f"(shared_prompt needs a decoder *ForSequenceClassification model)")
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
