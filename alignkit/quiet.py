"""Quiet by default: the known noise of the libraries alignkit runs on, silenced where it is made.

Each entry below is a message that says nothing about the run: a library's advertising, a deprecation inside a
library that the user cannot act on, a progress bar for a one-file write. ``alignkit fit --quiet false`` keeps
them all. Warnings and errors about the run itself are never filtered.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: (logger name, text in the message) pairs dropped from that logger.
LOG_NOISE = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # the Lightning Experiments platform tip
    ("lightning.pytorch.utilities.rank_zero", "was configured so validation will run at the end of the training epoch"),
    ("lightning.pytorch.utilities.rank_zero", "Loading `train_dataloader` to estimate number of stepping batches"),
    ("DeepSpeed", "Setting accelerator to CPU"),  # deepspeed, imported by an export on a machine without a GPU
    ("transformers.modeling_utils", "LOAD REPORT"),  # a reward head initialised on purpose
)
#: Warning messages (regular expressions) ignored: deprecations inside the libraries, not in alignkit's calls.
WARNING_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's pytree use under torch >= 2.9
    r".*past_key_values.*",  # transformers' cache-format FutureWarning
    r"Total length of `list` across ranks is zero.*",  # Lightning, on the data module's empty validation set
    # (a small file's val_fraction rounds to 0 rows: the data report says "0 val examples")
)


class _DropMessages(logging.Filter):
    def __init__(self, texts: list[str]):
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet() -> None:
    """Silence :data:`LOG_NOISE` and :data:`WARNING_NOISE` for the rest of the process."""
    texts: dict[str, list[str]] = {}
    for name, text in LOG_NOISE:
        texts.setdefault(name, []).append(text)
    for name, dropped in texts.items():
        logging.getLogger(name).addFilter(_DropMessages(dropped))
    for pattern in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # transformers' bars ("Loading weights", "Writing model shards" for every save_pretrained): it reads the hub's
    # switch when it is imported, and has its own once it is (not imported here: `alignkit plugins` stays light)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
