"""The wiring around the online and preference math (issue "Correct online math in every setting"): entropy at
the sampling temperature, losses that do not depend on how a step is split into micro-batches and ranks, the
adaptive KL controller fed nats, IPO's length-averaged default, one sampling stream per rank, and reward models
judging the prompt the policy saw."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch

from alignkit.aggregation import StepMean, agg_loss
from alignkit.data import PromptData, SFTData
from alignkit.defaults import DefaultRollout, rank_sampling_seed
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule
from alignkit.ops import entropy_from_logits, masked_mean
from alignkit.rollout import SamplingConfig, generate
from alignkit.types import PromptBatch, Rollout
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO
from alignkit_plugins.ppo.algorithm import PPOExperience, policy_forward
from alignkit_plugins.ppo.math import entropy_bonus
from alignkit_plugins.sft import SFT, sft_loss

TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))


def rollout_with_lengths(lengths: list[int], prompt_length: int = 3, width: int = 10, seed: int = 0) -> Rollout:
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    response_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    prompt_mask = torch.ones(batch, prompt_length, dtype=torch.long)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    sequences = torch.randint(5, 40, (batch, prompt_length + width), generator=generator) * attention_mask
    return Rollout(sequences=sequences, attention_mask=attention_mask,
                   response_mask=response_mask, logprobs=torch.zeros(batch, width),
                   ended=torch.ones(batch, dtype=torch.bool),
                   prompt_length=prompt_length, prompts=["p"] * batch, responses=["r"] * batch)


# ---------------------------------------------------------------------------------------------- 1. entropy


def test_entropy_bonus_is_taken_at_the_sampling_temperature():
    # One token, logits [0, ln 3]. T = 1: p = [1/4, 3/4], H = −(¼ ln ¼ + ¾ ln ¾) = 0.562335.
    # T = 0.5: logits / T = [0, ln 9], p = [0.1, 0.9], H = −(0.1 ln 0.1 + 0.9 ln 0.9) = 0.325083.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    mask = torch.ones(1, 1)
    assert float(entropy_bonus(logits, mask)) == pytest.approx(0.562335, abs=1e-6)
    assert float(entropy_bonus(logits, mask, temperature=0.5)) == pytest.approx(0.325083, abs=1e-6)


def test_ppo_logs_the_entropy_of_the_tempered_policy():
    torch.manual_seed(0)
    algorithm = PPO(sampling=SamplingConfig(max_new_tokens=4, temperature=0.7), update_epochs=2)
    module = AlignModule(algorithm=algorithm, policy=TINY)
    with torch.no_grad():
        module.policy.get_output_embeddings().weight.mul_(5.0)  # peaked logits, as a trained model's
    rollout = rollout_with_lengths([4, 2, 3], width=4)
    experience = algorithm.alignkit_experience(module=module, rollout=rollout, scores=torch.zeros(3))
    out = algorithm.alignkit_loss(module=module, batch=experience)
    with torch.no_grad():
        _, logits, _ = policy_forward(module.policy, rollout.sequences, rollout.attention_mask, 3, 0.7,
                                      need_hidden=False)
    tempered = masked_mean(entropy_from_logits(logits.float() / 0.7), rollout.response_mask)
    raw = masked_mean(entropy_from_logits(logits.float()), rollout.response_mask)
    assert float(out.stats["policy/entropy"]) == pytest.approx(float(tempered), abs=1e-5)
    assert abs(float(tempered) - float(raw)) > 0.05  # the two differ, so the check above can tell them apart


# ---------------------------------------------------------------------------------------------- 2. aggregation


def test_agg_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5
    loss, units = agg_loss(values, mask, "token-mean")
    assert (float(loss), float(units)) == (2.5, 4.0)
    # seq-mean-token-sum: (6 + 4 + 0) / 3 sequences = 10/3
    loss, units = agg_loss(values, mask, "seq-mean-token-sum")
    assert float(loss) == pytest.approx(10 / 3) and float(units) == 3.0
    # seq-mean-token-mean: (6/3 + 4/1) / 2 sequences with a token = 3
    loss, units = agg_loss(values, mask, "seq-mean-token-mean")
    assert (float(loss), float(units)) == (3.0, 2.0)
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'.*token-mean"):
        agg_loss(values, mask, "sum")


def ppo_step_gradients(aggregation: str, micro_batches: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One PPO minibatch (4 responses of 10, 1, 1 and 1 tokens) split into ``micro_batches``, differentiated as the
    host does (``AlignModule.update``): the step's loss (Σ loss·units / Σ units) and its gradients."""
    torch.manual_seed(0)
    algorithm = PPO(update_epochs=2, gradient_accumulation_steps=micro_batches, loss_aggregation=aggregation,
                    entropy_coef=0.01, seed=3)
    module = AlignModule(algorithm=algorithm, policy=TINY)
    rollout = rollout_with_lengths([10, 1, 1, 1])
    experience = algorithm.alignkit_experience(module=module, rollout=rollout,
                                               scores=torch.tensor([1.0, -1.0, 0.5, 2.0]))
    (parts,) = list(algorithm.alignkit_minibatches(module=module, experience=experience))
    assert len(parts) == micro_batches
    total, units = 0.0, 0.0
    for micro in parts:
        out = module.loss(micro)
        (module.backward_loss(out, parts=len(parts)) / len(parts)).backward()
        total, units = total + float(out.loss) * float(out.units), units + float(out.units)
    module.mean_gradients()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return total / units, grads


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_ppo_loss_and_gradients_do_not_depend_on_the_micro_batch_split(aggregation):
    loss, grads = ppo_step_gradients(aggregation, 1)
    for k in (2, 4):
        loss_k, grads_k = ppo_step_gradients(aggregation, k)
        assert loss_k == pytest.approx(loss, abs=1e-6)
        assert grads_k.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grads_k[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_step_mean_over_two_ranks_equals_one_rank():
    """Two data-parallel ranks as DDP runs them: each differentiates its micro-batch, DDP averages the gradients,
    and each rank rescales by the step's units summed over the ranks. Equal to one rank holding every row."""
    weight = torch.tensor([1.0, -2.0], requires_grad=True)

    def values(rows):  # (rows/5, 5) tokens
        return (torch.arange(1.0, 11.0)[rows, None] * weight).sum(-1).view(-1, 5)

    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    loss, units = agg_loss(values(slice(0, 10)), mask)
    (expected,) = torch.autograd.grad(loss, weight)
    grads, per_rank_units = [], [float(mask[0].sum()), float(mask[1].sum())]
    for rank in (0, 1):
        w = weight.detach().clone().requires_grad_(True)
        rows = torch.arange(1.0, 11.0).view(2, 5)[rank]
        out_loss, out_units = agg_loss((rows[:, None] * w).sum(-1)[None], mask[rank:rank + 1])
        step = StepMean()
        step.backward_loss(out_loss, out_units, parts=1, world=2).backward()
        grads.append(w.grad)
    averaged = (grads[0] + grads[1]) / 2  # what DDP's all-reduce leaves on every rank
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = averaged.clone()
    step = StepMean()
    step.units, step.pending = per_rank_units[0], True
    step.rescale([w], world=2, reduce_sum=lambda t: t + per_rank_units[1], device=torch.device("cpu"))
    torch.testing.assert_close(w.grad, expected, atol=1e-6, rtol=0)
    assert float(units) == 6


def test_sft_loss_aggregations_by_hand():
    # Uniform logits over V = 4: every target token costs ln 4. Row 0 has 2 targets, row 1 has 1 (labels[t + 1]).
    logits = torch.zeros(2, 4, 4)
    labels = torch.tensor([[-100, -100, 1, 2], [-100, -100, -100, 3]])
    ln4 = math.log(4.0)
    expected = {"token-mean": (ln4, 3.0), "seq-mean-token-sum": (1.5 * ln4, 2.0), "seq-mean-token-mean": (ln4, 2.0)}
    for mode, (loss, units) in expected.items():
        out_loss, out_units = sft_loss(logits, labels, aggregation=mode)
        assert float(out_loss) == pytest.approx(loss, abs=1e-6) and float(out_units) == units, mode


class GradientCapture(AlignModule):
    """Records the gradients the optimiser steps with (after the host's hook, which rescales them)."""

    def on_before_optimizer_step(self, optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.grads = {n: p.grad.clone() for n, p in self.named_parameters() if p.grad is not None}


def sft_first_step_gradients(tmp_path, batch_size: int, accumulate: int) -> dict[str, torch.Tensor]:
    L.seed_everything(0)
    module = GradientCapture(algorithm=SFT(), policy=TINY)
    path = tmp_path / "demos.jsonl"  # responses of very unequal lengths: a mean of batch means would differ
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"review {i}:", "response": " great" * n}) + "\n"
                            for i, n in enumerate([20, 1, 1, 1, 9, 2, 3, 1])))
    data = SFTData(path=str(path), batch_size=batch_size, shuffle=False, val_fraction=0)
    trainer = L.Trainer(max_steps=1, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert module.grads
    return module.grads


def test_sft_gradient_accumulation_gives_the_token_mean_of_the_whole_step(tmp_path):
    whole = sft_first_step_gradients(tmp_path / "a", batch_size=8, accumulate=1)
    for batch_size, accumulate in ((4, 2), (2, 4)):
        split = sft_first_step_gradients(tmp_path / f"b{accumulate}", batch_size=batch_size, accumulate=accumulate)
        for name, grad in whole.items():
            torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- 4. ranks


def test_each_rank_samples_its_own_responses(monkeypatch):
    torch.manual_seed(0)
    module = AlignModule(algorithm=PPO(sampling=SamplingConfig(max_new_tokens=8)), policy=TINY)
    prompts = ["the movie was"] * 4
    ids = torch.tensor([module.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])
    batch = PromptBatch(input_ids=ids, attention_mask=torch.ones_like(ids), prompts=prompts, index=torch.arange(4))
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")

    def sample(rank: int) -> Rollout:
        monkeypatch.setattr(AlignModule, "global_rank", property(lambda self: rank))
        torch.manual_seed(0)  # seed_everything gives every rank the same global stream
        return DefaultRollout().alignkit_rollout(module=module, batch=batch)

    rank0, rank1 = sample(0), sample(1)
    assert not torch.equal(rank0.sequences, rank1.sequences)
    # rank 0 keeps the global stream: a single-process run samples exactly what it did before
    torch.manual_seed(0)
    single = generate(module.policy, module.tokenizer, ids, torch.ones_like(ids), prompts, module.algorithm.sampling)
    assert torch.equal(rank0.sequences, single.sequences)
    # rank r's stream is a function of (seed, rank, step): the same after a resume, distinct across ranks and steps
    assert torch.equal(sample(1).sequences, rank1.sequences)
    seeds = {rank_sampling_seed(0, r, s) for r in range(4) for s in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------- 5. smaller


class Host:
    """What ``alignkit_after_update`` reads from its module (one process)."""

    world_size = 1

    def reduce_mean(self, tensor):
        return tensor


@pytest.mark.parametrize("estimator", ["k1", "k3", "abs", "mse"])
def test_adaptive_kl_controller_is_fed_nats_whatever_the_penalty_estimator(estimator):
    # Per-token log-ratios log π − log π_ref = [+0.5, −0.5]: KL in nats (k1 sum) = 0, below the 0.1 target, so β
    # must shrink by the clipped error: β ← β·(1 − 0.2·n/horizon) = 1·(1 − 0.2·2/10) = 0.96. A k3 sum (0.255) would
    # grow it instead.
    algorithm = PPO(kl_coef=1.0, kl_estimator=estimator, kl_target=0.1, kl_horizon=10)
    old = torch.tensor([[0.5, -0.5], [0.5, -0.5]])
    ref = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    from alignkit_plugins.ppo.math import kl_penalty

    experience = PPOExperience(sequences=torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 4),
                               response_mask=mask, old_logprobs=old, ref_logprobs=ref, old_values=torch.zeros(2, 2),
                               advantages=torch.zeros(2, 2), returns=torch.zeros(2, 2),
                               kl=kl_penalty(old, ref, estimator), scores=torch.zeros(2), prompt_length=2,
                               rows=torch.arange(2))
    algorithm.alignkit_after_update(module=Host(), experience=experience, stats={})
    assert algorithm.kl_controller.value == pytest.approx(0.96)


def test_ipo_averages_log_ratios_over_the_response_by_default():
    assert DPO(loss_type="ipo").length_normalize is True
    assert DPO(loss_type="sigmoid").length_normalize is False
    assert DPO(loss_type="ipo", length_normalize=False).length_normalize is False


def test_a_truncated_prompt_is_judged_as_the_policy_saw_it(tmp_path):
    module = AlignModule(algorithm=PPO(), policy=TINY)
    long_prompt = " ".join(["the movie was good and the actors were great"] * 6)
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": long_prompt}) + "\n" + json.dumps({"prompt": "a short one"}) + "\n")
    data = PromptData(path=str(path), max_prompt_length=8, val_fraction=0, shuffle=False, batch_size=2)
    data.attach(module.tokenizer)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    texts = dict(zip([int(i) for i in batch.index], batch.prompts))
    row = int((batch.index == 0).nonzero())
    seen = module.tokenizer.decode(batch.input_ids[row][batch.attention_mask[row].bool()].tolist())
    assert texts[0] == seen != long_prompt and long_prompt.endswith(seen.strip())
    assert texts[1] == "a short one"  # an untruncated prompt keeps its own text
