"""The LM head runs only on the columns that predict targets (``logits_to_keep``): SFT's loss and DPO's
sequence log-probs equal the full-logits computation, and ``first_target_column`` on hand-made masks."""

import torch

from alignkit.models.tiny import TinyModelConfig, build_tiny_model
from alignkit.ops import first_target_column, token_logprobs
from alignkit.types import PreferenceBatch, SFTBatch
from alignkit_plugins.dpo import concatenated_logps
from alignkit_plugins.dpo.losses import sequence_logps
from alignkit_plugins.sft import IGNORE, SFT, sft_loss

TINY = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def test_first_target_column_by_hand():
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]])
    assert first_target_column(mask) == 3
    assert first_target_column(torch.tensor([[1, 1, 0]])) == 1  # column 0 has no predecessor: clamp to 1
    assert first_target_column(torch.zeros(2, 4)) == 1  # nothing to predict
    assert first_target_column(torch.tensor([[0, 0, 0], [0, 1, 1]])) == 1  # the empty row is ignored


class Host:
    """What the SFT plugin reads from its module: the policy and the data-parallel mean (one process)."""

    def __init__(self, policy):
        self.policy = policy

    def reduce_mean(self, tensor):
        return tensor


def batch_with_prompt(vocab: int, prompt: int = 6, response: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (3, prompt + response), generator=generator)
    targets = torch.zeros_like(input_ids, dtype=torch.bool)
    targets[0, prompt:] = True
    targets[1, prompt + 1:] = True
    targets[2, prompt + 2:-1] = True
    return input_ids, targets


def test_sft_loss_on_kept_logits_equals_the_full_computation():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TINY)
    input_ids, targets = batch_with_prompt(len(tokenizer))
    labels = torch.where(targets, input_ids, torch.full_like(input_ids, IGNORE))
    batch = SFTBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels)
    full, count = sft_loss(model(input_ids=input_ids).logits, labels)
    out = SFT().alignkit_loss(module=Host(model), batch=batch)
    torch.testing.assert_close(out.loss, full, rtol=1e-5, atol=1e-6)
    assert int(out.stats["tokens/trained"]) == int(count) == 5 + 4 + 2


def test_dpo_sequence_logps_on_kept_logits_equal_the_full_computation():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(TINY)
    input_ids, targets = batch_with_prompt(len(tokenizer), prompt=7, response=4)
    input_ids, targets = torch.cat([input_ids, input_ids.flip(0)]), torch.cat([targets, targets.flip(0)])
    batch = PreferenceBatch(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), loss_mask=targets.long(),
                            margin=torch.zeros(3), index=torch.arange(3))
    logits = model(input_ids=input_ids).logits
    expected = sequence_logps(token_logprobs(logits[:, :-1], input_ids[:, 1:]), targets.long()[:, 1:], False)
    chosen, rejected = concatenated_logps(model, batch)
    torch.testing.assert_close(torch.cat([chosen, rejected]), expected, rtol=1e-5, atol=1e-5)
