"""Text records → token ids, with the chat template where the prompt is a conversation (or when asked),
and one truncation policy for every data kind.

Truncation policy, applied per example with the limits ``max_length`` (prompt + response) and
``max_prompt_length``:

- ``truncate``: keep the end of the prompt (the part nearest the response) within ``max_prompt_length``,
  then cut responses at the end to fit ``max_length``;
- ``drop``: leave the example out;
- ``error``: stop with a one-line error naming the source and the row.

Every truncated or dropped example is counted; the data module logs the counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PreTrainedTokenizerBase

from alignkit.data.formats import Conversation, DataError

Truncation = Literal["truncate", "drop", "error"]


@dataclass
class TruncationStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0


def _ids(encoded) -> list[int]:
    """``apply_chat_template`` returns a list or a BatchEncoding depending on the transformers version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Conversation, chat_template: bool) -> list[int]:
    if isinstance(prompt, list) or chat_template:
        chat = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return _ids(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True))
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer: PreTrainedTokenizerBase, prompt: str | Conversation, prompt_ids: list[int],
                    response: str, chat_template: bool) -> list[int]:
    """Response ids ending with EOS. Under a chat template they are the template's tokens after the prompt."""
    if isinstance(prompt, list) or chat_template:
        chat = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        full = _ids(tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=True))
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            ids = full[len(prompt_ids):]
            eos = tokenizer.eos_token_id
            return ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]  # nothing after EOS (e.g. "\n")
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
        policy: Truncation, stats: TruncationStats, where: str) -> tuple[list[int], list[list[int]]] | None:
    """Apply the truncation policy to one prompt and its response(s); None means "drop"."""
    stats.examples += 1
    longest = max(len(r) for r in responses)
    if len(prompt_ids) <= max_prompt_length and len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses
    if policy == "error":
        raise DataError(f"{where}: prompt of {len(prompt_ids)} + response of {longest} tokens exceeds "
                        f"max_length={max_length} / max_prompt_length={max_prompt_length} (truncation: error)")
    if policy == "drop":
        stats.dropped += 1
        return None
    stats.truncated += 1
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room < 1 and longest:  # a prompt alone (PromptData) needs no room for a response
        raise DataError(f"{where}: max_prompt_length={max_prompt_length} leaves no room for the response in max_length={max_length}")
    return prompt_ids, [r[:room] for r in responses]
