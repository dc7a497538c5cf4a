"""Data: formats, tokenisation with a truncation policy, and the Lightning data modules."""

from alignkit.data.formats import DataError
from alignkit.data.modules import AlignData, PreferenceData, PromptData, SFTData

__all__ = ["AlignData", "DataError", "PreferenceData", "PromptData", "SFTData"]
