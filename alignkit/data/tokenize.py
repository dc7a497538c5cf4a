"""Text records → token ids, with the chat template where the prompt is a conversation (or when asked),
and one truncation policy for every data kind.

Truncation policy, applied per example with the limits ``max_length`` (prompt + response) and
``max_prompt_length``:

- ``truncate``: keep the end of the prompt (the part nearest the response) within ``max_prompt_length``,
  then cut responses at the end to fit ``max_length``;
- ``drop``: leave the example out;
- ``error``: stop with a one-line error naming the source and the row.

Every truncated or dropped example is counted, with the token lengths before truncation, in a
:class:`TruncationStats`; the data module prints them at set-up (:mod:`alignkit.data.report`) and stores them
in its ``state_dict`` (the run's ``metrics.json`` under ``data``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from alignkit.data.formats import Conversation, DataError

Truncation = Literal["truncate", "drop", "error"]


#: The reason counted for an example that ``truncation="drop"`` leaves out.
TOO_LONG = "longer than the limits (truncation: drop)"


@dataclass
class TruncationStats:
    """Counts of one data set's examples, and their token lengths before truncation.

    ``examples`` reached the length check; ``truncated`` were cut (``prompt_truncated`` of them in the prompt,
    ``responses_truncated[k]`` in their k-th response); ``dropped`` were left out, counted by reason in
    ``dropped_by``. ``prompt_lengths``, ``response_lengths[k]`` and ``total_lengths`` (prompt + longest response)
    hold one entry per checked example."""

    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_truncated: int = 0
    responses_truncated: list[int] = field(default_factory=list)
    dropped_by: dict[str, int] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[list[int]] = field(default_factory=list)
    total_lengths: list[int] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        """Count one example left out for ``reason``."""
        self.dropped += 1
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + 1

    def measure(self, prompt_ids: list[int], responses: list[list[int]]) -> None:
        """Record one example's lengths (before truncation)."""
        self.examples += 1
        while len(self.response_lengths) < len(responses):
            self.response_lengths.append([])
            self.responses_truncated.append(0)
        self.prompt_lengths.append(len(prompt_ids))
        for k, r in enumerate(responses):
            self.response_lengths[k].append(len(r))
        self.total_lengths.append(len(prompt_ids) + max(len(r) for r in responses))


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


def truncate_to_fit(prompt_ids: list[int], responses: list[list[int]], max_length: int, max_prompt_length: int,
                    policy: Truncation, stats: TruncationStats, where: str) -> tuple[list[int], list[list[int]]] | None:
    """One prompt and its response(s) cut to fit ``max_prompt_length`` / ``max_length`` by the truncation
    ``policy`` (``error`` raises a DataError, ``drop`` returns None); unchanged when they fit already."""
    stats.measure(prompt_ids, responses)
    longest = max(len(r) for r in responses)
    if len(prompt_ids) <= max_prompt_length and len(prompt_ids) + longest <= max_length:
        return prompt_ids, responses
    if policy == "error":
        raise DataError(f"{where}: prompt of {len(prompt_ids)} + response of {longest} tokens exceeds "
                        f"max_length={max_length} / max_prompt_length={max_prompt_length} (truncation: error)")
    if policy == "drop":
        stats.drop(TOO_LONG)
        return None
    stats.truncated += 1
    stats.prompt_truncated += len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids)
    if room < 1 and longest:  # a prompt alone (PromptData) needs no room for a response
        raise DataError(f"{where}: max_prompt_length={max_prompt_length} leaves no room for the response "
                        f"in max_length={max_length}")
    for k, r in enumerate(responses):
        stats.responses_truncated[k] += len(r) > room
    return prompt_ids, [r[:room] for r in responses]
