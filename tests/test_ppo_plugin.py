"""PPO plugin: experience construction on a hand-made rollout, and an end-to-end run on the tiny model."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch

from alignkit.data import PromptData
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.ops import accepts_argument
from alignkit.plugin import Reward, RewardOutput
from alignkit.rollout import SamplingConfig
from alignkit.types import Rollout
from alignkit_plugins.ppo import PPO
from alignkit_plugins.ppo.algorithm import policy_forward
from alignkit_plugins.tasks import SentimentTask

TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))


class LetterReward(Reward):
    """Fraction of response characters that are the letter 'e' (an easy proxy for the policy to raise)."""

    def score(self, prompts, responses, rollout):
        return RewardOutput(self.reward_name, torch.tensor([r.count("e") / max(len(r), 1) for r in responses]))


def hand_rollout(lengths: list[int], prompt_length: int = 3, width: int = 4) -> Rollout:
    batch = len(lengths)
    response_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        response_mask[row, :n] = 1
    sequences = torch.randint(5, 40, (batch, prompt_length + width)) * torch.cat(
        [torch.ones(batch, prompt_length, dtype=torch.long), response_mask], 1)
    attention_mask = torch.cat([torch.ones(batch, prompt_length, dtype=torch.long), response_mask], 1)
    return Rollout(sequences=sequences, attention_mask=attention_mask,
                   response_mask=response_mask, logprobs=torch.zeros(batch, width), ended=torch.tensor([True] * batch),
                   prompt_length=prompt_length, prompts=["p"] * batch, responses=["r"] * batch)


def test_experience_puts_the_score_on_the_last_real_token():
    torch.manual_seed(0)
    # kl_coef 0, γ = λ = 1, no whitening, zero-initialised value head: the advantage of every real token is
    # the reward-to-go, i.e. the score (all reward sits on the last real token), and 0 on padding.
    algorithm = PPO(kl_coef=0.0, gamma=1.0, lam=1.0, whiten=False)
    module = AlignModule(algorithm=algorithm, policy=TINY)
    rollout = hand_rollout([3, 1, 4])
    scores = torch.tensor([1.0, -2.0, 0.5])
    exp = algorithm.alignkit_experience(module=module, rollout=rollout, scores=scores)
    expected = torch.tensor([[1.0, 1.0, 1.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(exp.advantages, expected)
    torch.testing.assert_close(exp.returns, expected)
    # the reference is a frozen copy of the initial policy: KL is exactly 0 at the start
    torch.testing.assert_close(exp.kl, torch.zeros(3, 4))


def test_missing_stop_penalty_applies_to_responses_without_a_stop():
    algorithm = PPO(kl_coef=0.0, whiten=False, missing_stop_penalty=-1.0)
    module = AlignModule(algorithm=algorithm, policy=TINY)
    rollout = hand_rollout([2, 4])
    rollout.ended = torch.tensor([True, False])
    exp = algorithm.alignkit_experience(module=module, rollout=rollout, scores=torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(exp.scores, torch.tensor([0.5, -0.5]))


def test_minibatches_cover_every_row_once_per_epoch():
    algorithm = PPO(num_minibatches=2, gradient_accumulation_steps=2)
    module = AlignModule(algorithm=algorithm, policy=TINY)
    exp = algorithm.alignkit_experience(module=module, rollout=hand_rollout([1, 2, 3, 4, 2, 1, 3, 4]),
                                        scores=torch.zeros(8))
    batches = list(algorithm.alignkit_minibatches(module=module, experience=exp))
    assert len(batches) == 2 and all(len(micro) == 2 for micro in batches)
    rows = sorted(tuple(r.tolist()) for mb in batches for micro in mb for r in micro.sequences)
    assert rows == sorted(tuple(r.tolist()) for r in exp.sequences)


def test_ppo_run_changes_weights_and_raises_the_proxy_reward(tmp_path):
    L.seed_everything(0)
    algorithm = PPO(sampling=SamplingConfig(max_new_tokens=12), kl_coef=0.01, update_epochs=2, num_minibatches=1)
    module = AlignModule(algorithm=algorithm, policy=TINY, rewards=[LetterReward()], completions_per_step=2)
    module.optimizer_config.lr = 3e-3
    policy_before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    reference_before = {k: v.clone() for k, v in module.reference.state_dict().items()}
    value_before = {k: v.clone() for k, v in algorithm.value_head.state_dict().items()}
    data = PromptData(task=SentimentTask(num_train_prompts=256, num_eval_prompts=8), batch_size=32)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="", version="")
    trainer = L.Trainer(max_steps=2 * 24, accelerator="cpu", logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)

    def changed(before, after):
        return any(not torch.equal(before[k], after[k]) for k in before)

    assert changed(policy_before, module.policy.state_dict())
    assert changed(value_before, algorithm.value_head.state_dict())
    assert not changed(reference_before, module.reference.state_dict())
    rows = csv.DictReader(open(tmp_path / "metrics.csv"))
    scores = [float(r["objective/scores"]) for r in rows if r.get("objective/scores")]
    assert len(scores) == 24
    assert sum(scores[-6:]) / 6 > sum(scores[:6]) / 6 + 0.02, scores
    assert (tmp_path / "completions.jsonl").read_text().count("\n") == 24 * 2


class FullLogits(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: the LM head runs on every position."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, use_cache, output_hidden_states):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=use_cache, output_hidden_states=output_hidden_states)


def test_logits_to_keep_gives_the_same_logprobs_as_full_logits():
    torch.manual_seed(0)
    policy = AlignModule(algorithm=PPO(), policy=TINY).policy
    assert accepts_argument(policy, "logits_to_keep") and not accepts_argument(FullLogits(policy), "logits_to_keep")
    rollout = hand_rollout([3, 1, 4])  # P = 3, R = 4
    args = (rollout.sequences, rollout.attention_mask, rollout.prompt_length, 0.7)
    lean = policy_forward(policy, *args, need_hidden=True)
    full = policy_forward(FullLogits(policy), *args, need_hidden=True)
    assert lean[1].shape == full[1].shape == (3, 4, policy.config.vocab_size)
    for a, b in zip(lean, full):  # log-probs, logits, hidden states
        torch.testing.assert_close(a, b)


def perturbed_module(algorithm: PPO) -> AlignModule:
    """Policy moved away from its reference (KL ≠ 0) and a non-zero value head, so every term of the loss
    and of the experience depends on the policy forward."""
    module = AlignModule(algorithm=algorithm, policy=TINY)
    with torch.no_grad():
        for p in [*module.policy.parameters(), *algorithm.value_head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
@pytest.mark.parametrize("rows", [None, [4, 0, 2]], ids=["minibatch-order", "row-subset"])
def test_single_pass_gives_the_two_pass_loss_and_gradients(entropy_coef, rows):
    torch.manual_seed(0)
    algorithm = PPO(kl_coef=0.1, entropy_coef=entropy_coef, update_epochs=1)
    module = perturbed_module(algorithm)
    rollout, scores = hand_rollout([3, 1, 4, 2, 4]), torch.tensor([1.0, -2.0, 0.5, 0.0, 0.7])

    def update(update_epochs: int):
        # update_epochs = 1: single pass (the experience's forward is reused); 2: the loss runs its own forward
        algorithm.update_epochs, algorithm.updates = update_epochs, 0  # same minibatch order both times
        exp = algorithm.alignkit_experience(module=module, rollout=rollout, scores=scores)
        assert (algorithm._pass is not None) == (update_epochs == 1)
        if rows is None:
            [[batch]] = algorithm.alignkit_minibatches(module=module, experience=exp)  # all rows, shuffled
        else:
            batch = exp.select(torch.tensor(rows))
        module.zero_grad(set_to_none=True)
        out = algorithm.alignkit_loss(module=module, batch=batch)
        assert algorithm._pass is None  # taken: the graph is freed by the backward
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        return exp, out, grads

    (exp1, out1, grads1), (exp2, out2, grads2) = update(1), update(2)
    for field in ("old_logprobs", "old_values", "advantages", "returns", "kl"):
        assert not getattr(exp1, field).requires_grad
        torch.testing.assert_close(getattr(exp1, field), getattr(exp2, field))
    assert float(exp1.kl.abs().sum()) > 0
    torch.testing.assert_close(out1.loss, out2.loss)
    assert out1.stats.keys() == out2.stats.keys()
    for key in out1.stats:
        torch.testing.assert_close(out1.stats[key], out2.stats[key])
    assert float(out1.stats["policy/ratio_mean"]) == 1.0  # exactly: π and π_old are the same tensor
    assert grads1.keys() == grads2.keys() and any("value_head" in n for n in grads1) and len(grads1) > 2
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], msg=name)


def test_single_pass_trains_and_keeps_no_graph(tmp_path):
    L.seed_everything(0)
    algorithm = PPO(sampling=SamplingConfig(max_new_tokens=6), update_epochs=1)
    module = AlignModule(algorithm=algorithm, policy=TINY, rewards=[LetterReward()])
    assert algorithm.single_pass(module)
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    forwards = []
    module.policy.register_forward_hook(lambda *_: forwards.append(torch.is_grad_enabled()))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=PromptData(task=SentimentTask(num_train_prompts=16), batch_size=4))
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
    assert algorithm._pass is None
    # per iteration: generation (no grad, prefill + decoding steps), then exactly one forward with grad
    assert forwards.count(True) == 2


def test_ppo_rejects_bad_settings():
    with pytest.raises(ValueError, match="num_minibatches"):
        PPO(num_minibatches=0)
    with pytest.raises(ValueError, match="update_epochs"):
        PPO(update_epochs=0)
