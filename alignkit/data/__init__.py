"""Data: formats, tokenisation with a truncation policy, and the Lightning data modules.

The data modules load on first use (``alignkit.data.SFTData``), so importing a sibling module such as
:mod:`alignkit.data.formats` does not import Lightning (``alignkit eval --help`` reads prompts, not batches)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from alignkit.data.formats import DataError

if TYPE_CHECKING:
    from alignkit.data.modules import AlignData, PreferenceData, PromptData, SFTData

_MODULES = {"AlignData", "PreferenceData", "PromptData", "SFTData"}


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        from alignkit.data import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'alignkit.data' has no attribute {name!r}")


__all__ = ["AlignData", "DataError", "PreferenceData", "PromptData", "SFTData"]
