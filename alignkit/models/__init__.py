"""Model loading (HF names, local directories) and the built-in tiny model."""

from alignkit.models.loading import LoraSettings, ModelConfig, load_model, sequence_scores
from alignkit.models.tiny import TinyModelConfig, build_tiny_model, build_tokenizer

__all__ = ["LoraSettings", "ModelConfig", "TinyModelConfig", "build_tiny_model", "build_tokenizer", "load_model",
           "sequence_scores"]
