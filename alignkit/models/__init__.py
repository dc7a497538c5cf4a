"""Model loading (HF names, local directories), the built-in tiny model, and turning dropout off."""

from alignkit.models.dropout import disable_dropout
from alignkit.models.loading import LoraSettings, ModelConfig, load_model, sequence_scores
from alignkit.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer

__all__ = ["LoraSettings", "ModelConfig", "TinyModelConfig", "build_tiny_model", "build_tokenizer", "disable_dropout",
           "load_model", "sequence_scores"]
