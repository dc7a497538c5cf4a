"""A trained reward model as a reward plugin.

The reward model keeps its own tokenizer (it may differ from the policy's): the texts of each rollout are
re-tokenised exactly as the reward-model stage's ``PreferenceData`` saw them during training — prompt ids,
then response ids ending with EOS (:func:`~alignkit.data.tokenize.encode_prompt` /
:func:`~alignkit.data.tokenize.encode_response`), right padded — and scored at the last real token with
:func:`~alignkit.models.loading.sequence_scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from alignkit import (
    ConfigError,
    ModelConfig,
    Reward,
    RewardOutput,
    Rollout,
    TruncationStats,
    encode_prompt,
    encode_response,
    load_model,
    right_pad,
    sequence_scores,
    truncate_to_fit,
)


def resolve_model_dir(path: str) -> str:
    """``path`` itself, or ``path/model`` when ``path`` is a finished run directory (a pipeline stage)
    rather than the exported model folder."""
    root = Path(path).expanduser()
    if not (root / "config.json").is_file() and (root / "model" / "config.json").is_file():
        return str(root / "model")
    return path


class RewardModelReward(Reward):
    """Score ``(prompt, response)`` pairs with a frozen sequence-classification reward model.

    Example (recipe)::

        rewards:
          - class_path: alignkit_plugins.rewards.RewardModelReward
            init_args: {path: runs/pipeline/rm/model, weight: 1.0}
    """

    def __init__(self, path: str, batch_size: int = 64, chat_template: bool = False,
                 max_length: int | None = None, max_prompt_length: int | None = None,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 name: str | None = None, weight: float = 1.0):
        """
        Args:
            path: the reward model: a reward-model stage's ``model/`` folder (or the stage's run folder
                holding it), or an HF hub name / local folder of a sequence-classification model.
            batch_size: sequences per forward pass.
            chat_template: wrap plain-text prompts in the reward model's chat template (use the value the
                reward model was trained with, ``data.init_args.chat_template``).
            max_length: truncate prompt + response to this many tokens as in training (keeping the end of
                the prompt, cutting the response at its end); None: no truncation.
            max_prompt_length: longest prompt kept when truncating (default: ``max_length - 1``).
            dtype: parameter dtype of the reward model.
            name: the name its scores are logged under.
            weight: its weight in the combined reward.
        """
        super().__init__(name=name, weight=weight)
        if batch_size < 1:
            raise ConfigError(f"RewardModelReward.batch_size must be >= 1, got {batch_size}")
        if max_length is not None and max_length < 2:
            raise ConfigError(f"RewardModelReward.max_length must be >= 2 or None, got {max_length}")
        if max_prompt_length is not None and (max_length is None or not 1 <= max_prompt_length < max_length):
            raise ConfigError(f"RewardModelReward.max_prompt_length={max_prompt_length} needs a max_length "
                              f"greater than it (got max_length={max_length})")
        self.path, self.batch_size, self.chat_template = path, batch_size, chat_template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length or (max_length - 1 if max_length else None)
        try:
            model, tokenizer = load_model(ModelConfig(name_or_path=resolve_model_dir(path), dtype=dtype),
                                          "sequence_classification")
        except FileNotFoundError as exc:  # e.g. the reward-model stage was moved or deleted since the run began
            raise FileNotFoundError(f"RewardModelReward path {path!r}: no such reward model directory "
                                    f"(config.json missing)") from exc
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = tokenizer

    def train(self, mode: bool = True):
        """A reward model is frozen: it stays in eval mode (no dropout) whatever the host asks."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        """Token ids of each ``prompt + response + EOS`` as the reward-model stage encoded them."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows, stats = [], TruncationStats()
        for i, (prompt, response) in enumerate(zip(prompts, responses)):
            prompt_ids = encode_prompt(self.tokenizer, prompt, self.chat_template)
            response_ids = encode_response(self.tokenizer, prompt, prompt_ids, response, self.chat_template)
            if self.max_length is not None:
                prompt_ids, (response_ids,) = truncate_to_fit(prompt_ids, [response_ids], self.max_length,
                                                              self.max_prompt_length, "truncate", stats,
                                                              f"response {i}")
            rows.append(prompt_ids + response_ids)
        return rows

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> Tensor:
        """``(B,)`` float32 scores on the reward model's device."""
        rows = self.encode(prompts, responses)
        device, pad = self.device, self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = right_pad(rows[start: start + self.batch_size], pad)
            out.append(sequence_scores(self.model, ids.to(device), mask.to(device)))
        return torch.cat(out) if out else torch.zeros(0, device=device)

    def score(self, prompts: list[str], responses: list[str], rollout: Rollout | None = None) -> RewardOutput:
        return RewardOutput(self.reward_name, self.scores(prompts, responses), {})

    def extra_repr(self) -> str:
        return f"path={self.path!r}, name={self.reward_name!r}, weight={self.weight}"


__all__ = ["RewardModelReward", "resolve_model_dir"]
