"""PPO-RLHF (RLHF stage 3): maximise ``E[r(x, y)] − β·KL(π ‖ π_SFT)`` with the clipped PPO objective.

One training step (driven by the host, :class:`alignkit.module.AlignModule`):

1. rollout: sample responses to a batch of prompts (shared engine, KV cache, stop handling);
2. score: the reward plugins' weighted sum, placed on the last real response token;
3. experience (this plugin): log π_old, log π_ref and values of the sampled tokens in one pass each,
   per-token KL penalty, GAE advantages (whitened) and returns;
4. ``update_epochs`` × ``num_minibatches`` optimiser steps of clipped policy + clipped value loss
   (with gradient accumulation), stopping early when approx-KL exceeds the target;
5. after the update, the adaptive KL controller (Ziegler et al. 2019) adapts β.

With one epoch, one minibatch, no accumulation and the value-head critic, step 4's forward is step 3's
forward: it runs once (see :meth:`PPO.single_pass`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alignkit import (
    ALGORITHM,
    LossAggregation,
    LossOutput,
    OnlineAlgorithm,
    Rollout,
    SamplingConfig,
    TensorRecord,
    hookimpl,
    last_columns,
    masked_mean,
    position_ids_from_mask,
    resolve_seed,
    response_logprobs,
    shuffled_minibatches,
    token_logprobs,
)
from alignkit_plugins.ppo.math import (
    AdaptiveKLController,
    FixedKLController,
    KLEstimator,
    entropy_bonus,
    gae,
    policy_loss,
    shaped_rewards,
    value_loss,
    whiten_advantages,
)


@dataclass
class PPOExperience(TensorRecord):
    """A scored rollout ready for PPO updates. ``B`` responses, ``P`` prompt and ``R`` response length."""

    sequences: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    response_mask: Tensor  # (B, R)
    old_logprobs: Tensor  # (B, R) log π_old of the sampled tokens
    ref_logprobs: Tensor  # (B, R) log π_ref of the sampled tokens
    old_values: Tensor  # (B, R) V_old at the state before each response token
    advantages: Tensor  # (B, R)
    returns: Tensor  # (B, R)
    kl: Tensor  # (B, R) per-token KL estimate used in the penalty
    scores: Tensor  # (B,) the combined reward (after the missing-stop penalty)
    prompt_length: int
    rows: Tensor  # (B,) each row's index in the experience as built (``select`` keeps it)

    def select(self, rows: Tensor) -> PPOExperience:
        fields = {k: (v[rows] if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return PPOExperience(**fields)

    @property
    def size(self) -> int:
        return self.sequences.shape[0]


CriticKind = Literal["value_head", "separate"]


class ValueHead(nn.Module):
    """Scalar value of each position from the last hidden state: ``(B, T, H) -> (B, T)``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden).squeeze(-1).float()


PolicyPass = tuple[Tensor, Tensor, Tensor | None]  # policy_forward's (log-probs, logits, hidden state)


def policy_forward(model: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                   temperature: float, need_hidden: bool) -> PolicyPass:
    """One forward pass over prompt + response: log-probs ``(B, R)`` of the response tokens under
    ``softmax(logits / temperature)``, the logits that predicted them ``(B, R, V)``, and the last hidden
    state at those positions ``(B, R, H)`` when asked (for a value head). The LM head runs on the last
    ``R + 1`` positions only when the model allows it, and so does the final decoder layer
    (:func:`~alignkit.models.final_layer.last_columns`): the hidden state is read from the end."""
    R = sequences.shape[1] - prompt_length
    with last_columns(model, R + 1) as extra:
        out = model(input_ids=sequences, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                    output_hidden_states=need_hidden, **extra)
    logits = out.logits[:, -(R + 1):-1]  # position t predicts token t + 1
    logprobs = token_logprobs(logits, sequences[:, prompt_length:], temperature)
    hidden = out.hidden_states[-1][:, -(R + 1):-1] if need_hidden else None  # (B, R, H), read from the end
    return logprobs, logits, hidden


class PPO(OnlineAlgorithm):
    """Proximal policy optimisation against reward plugins with a KL penalty to the frozen SFT policy."""

    needs_reference = True

    def __init__(
        self,
        sampling: SamplingConfig = SamplingConfig(max_new_tokens=24),
        kl_coef: float = 0.05,
        kl_estimator: KLEstimator = "k1",
        kl_target: float | None = None,
        kl_horizon: int = 10000,
        gamma: float = 1.0,
        lam: float = 0.95,
        clip_range: float = 0.2,
        clip_range_value: float = 0.2,
        vf_coef: float = 0.1,
        entropy_coef: float = 0.0,
        whiten: bool = True,
        missing_stop_penalty: float | None = None,
        critic_kind: CriticKind = "value_head",
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 1,
        update_epochs: int = 4,
        target_approx_kl: float | None = None,
        max_grad_norm: float | None = 1.0,
        loss_aggregation: LossAggregation = "token-mean",
        seed: int | None = None,
        critic: CriticKind | None = None,
    ):
        """
        Args:
            sampling: how responses are sampled (max new tokens, temperature, top-p/k, stop strings/tokens).
            kl_coef: β, the per-token KL penalty coefficient (the initial value when ``kl_target`` is set).
            kl_estimator: per-token KL estimator in the penalty: k1 (log-ratio), k3, abs or mse.
            kl_target: target KL per sequence (nats) of the adaptive controller; None keeps β fixed.
            kl_horizon: horizon of the adaptive controller, in samples.
            gamma: discount γ of GAE.
            lam: λ of GAE.
            clip_range: ε of the clipped surrogate objective.
            clip_range_value: ε of the clipped value loss.
            vf_coef: weight of the value loss.
            entropy_coef: weight of the entropy bonus (0: off).
            whiten: whiten advantages over the batch's response tokens.
            missing_stop_penalty: added to the score of responses that hit max_new_tokens without a configured
                stop token or stop string (None: off).
            critic_kind: ``value_head`` on the policy's trunk, or a ``separate`` copy of the policy as critic
                (the critic itself is the attribute ``critic``: None with the value head).
            num_minibatches: optimiser steps per update epoch.
            gradient_accumulation_steps: micro-batches accumulated into each minibatch step.
            update_epochs: passes over each rollout batch (PPO epochs).
            target_approx_kl: stop the update epochs once mean approx-KL exceeds this (None: never).
            max_grad_norm: gradient clipping norm (None: off).
            loss_aggregation: how per-token policy, value and entropy terms are averaged
                (:func:`alignkit.aggregation.agg_loss`); exact over a minibatch's micro-batches and ranks.
            seed: seed of the minibatch shuffling; None: derived from the run's seed (role
                ``model.algorithm.seed``, :mod:`alignkit.seeds`).
            critic: deprecated name of ``critic_kind``.
        """
        if critic is not None:
            warnings.warn("algorithm.critic is deprecated: use algorithm.critic_kind (the attribute `critic` is the "
                          "critic model)", DeprecationWarning, stacklevel=2)
            critic_kind = critic
        super().__init__(update_epochs=update_epochs, target_approx_kl=target_approx_kl, max_grad_norm=max_grad_norm)
        counts = (("num_minibatches", num_minibatches), ("gradient_accumulation_steps", gradient_accumulation_steps))
        for name, value in counts:
            if value < 1:
                raise ValueError(f"algorithm.{name} must be >= 1, got {value}")
        self.sampling = sampling
        self.kl_estimator, self.gamma, self.lam = kl_estimator, gamma, lam
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.vf_coef, self.entropy_coef, self.whiten = vf_coef, entropy_coef, whiten
        self.loss_aggregation = loss_aggregation
        self.missing_stop_penalty, self.critic_kind = missing_stop_penalty, critic_kind
        self.num_minibatches, self.gradient_accumulation_steps = num_minibatches, gradient_accumulation_steps
        self.seed = seed
        self.kl_controller = (AdaptiveKLController(kl_coef, kl_target, kl_horizon) if kl_target is not None
                              else FixedKLController(kl_coef))
        self.value_head: ValueHead | None = None
        self.critic: nn.Module | None = None  # the separate critic (``critic_kind="separate"``), built at configure
        self.updates = 0
        self._pass: PolicyPass | None = None  # the experience's forward with its graph, for the single pass

    # ------------------------------------------------------------------------------------------ setup
    @hookimpl
    def alignkit_configure(self, module) -> None:
        self.seed = resolve_seed(self.seed, ALGORITHM)
        self.value_head = ValueHead(module.policy.config.get_text_config().hidden_size)  # Gemma 3 nests it
        if self.critic_kind == "separate":
            self.critic = copy.deepcopy(module.policy)

    def values(self, module, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
               hidden: Tensor | None) -> Tensor:
        """V of the state before each response token, ``(B, R)``: from the policy's hidden state, or from
        the separate critic's own forward pass."""
        if self.critic is not None:
            *_, hidden = policy_forward(self.critic, sequences, attention_mask, prompt_length, 1.0, need_hidden=True)
        return self.value_head(hidden)

    # ------------------------------------------------------------------------------------------ experience
    def single_pass(self, module) -> bool:
        """Whether the update reuses the experience's policy forward instead of running its own.

        With one update epoch, one minibatch and no gradient accumulation, the host's update (see
        ``AlignModule.update``) calls ``alignkit_loss`` exactly once, on a selection of the experience's rows,
        with the weights the experience saw: its forward would repeat the experience's (ratio = 1 exactly).
        So ``alignkit_experience`` runs that forward with grad, keeps it in ``self._pass`` and uses detached
        copies for log π_old, the values, the rewards and GAE; the next ``alignkit_loss`` takes it (rows
        indexed by ``batch.rows``, so any order or subset works) and drops the reference, so the graph lives
        only until that loss's backward. ``alignkit_after_update`` drops an unused one. A separate critic has
        its own forward, so it keeps the two-pass path."""
        return (module.training and self.update_epochs == 1 and self.num_minibatches == 1
                and self.gradient_accumulation_steps == 1 and self.critic is None)

    @hookimpl
    def alignkit_experience(self, module, rollout: Rollout, scores: Tensor) -> PPOExperience:
        rollout = rollout.to(module.device)
        P, mask = rollout.prompt_length, rollout.response_mask.float()
        temperature = self.sampling.temperature
        single = self.single_pass(module)
        with torch.set_grad_enabled(single):
            forward = policy_forward(module.policy, rollout.sequences, rollout.attention_mask, P, temperature,
                                     need_hidden=self.critic is None)
        self._pass = forward if single else None
        old_logprobs, _, hidden = (t.detach() if t is not None else None for t in forward)
        with torch.no_grad():
            old_values = self.values(module, rollout.sequences, rollout.attention_mask, P, hidden) * mask
            with module.reference_model() as reference:
                ref_logprobs = response_logprobs(reference, rollout.sequences, rollout.attention_mask, P, temperature)
            scores = scores.to(module.device).float()
            if self.missing_stop_penalty is not None:
                scores = torch.where(rollout.ended.to(scores.device), scores, scores + self.missing_stop_penalty)
            rewards, kl = shaped_rewards(scores, old_logprobs * mask, ref_logprobs * mask, mask,
                                         self.kl_controller.value, self.kl_estimator)
            advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
            if self.whiten:
                advantages = whiten_advantages(advantages, mask, reduce=module.reduce_sum)
        rows = torch.arange(rollout.sequences.shape[0], device=module.device)
        return PPOExperience(rollout.sequences, rollout.attention_mask, mask, old_logprobs * mask, ref_logprobs * mask,
                             old_values, advantages, returns, kl, scores, P, rows)

    @hookimpl
    def alignkit_minibatches(self, module, experience: PPOExperience) -> Iterator[list[PPOExperience]]:
        self.updates += 1
        yield from shuffled_minibatches(experience, self.num_minibatches, self.gradient_accumulation_steps,
                                        resolve_seed(self.seed, ALGORITHM), self.updates - 1)

    # ------------------------------------------------------------------------------------------ loss
    @hookimpl
    def alignkit_loss(self, module, batch: PPOExperience) -> LossOutput:
        mask = batch.response_mask
        forward, self._pass = self._pass, None  # used once: the graph goes with this loss's backward
        if forward is not None:
            logprobs, logits, hidden = (t[batch.rows] if t is not None else None for t in forward)
        else:
            logprobs, logits, hidden = policy_forward(module.policy, batch.sequences, batch.attention_mask,
                                                      batch.prompt_length, self.sampling.temperature,
                                                      need_hidden=self.critic is None)
        values = self.values(module, batch.sequences, batch.attention_mask, batch.prompt_length, hidden)
        aggregation, temperature = self.loss_aggregation, self.sampling.temperature
        pg = policy_loss(logprobs, batch.old_logprobs, batch.advantages, mask, self.clip_range, aggregation)
        vf = value_loss(values, batch.old_values, batch.returns, mask, self.clip_range_value, aggregation)
        with torch.set_grad_enabled(bool(self.entropy_coef) and torch.is_grad_enabled()):
            # only logged when the bonus is off: then the full-vocabulary softmax stays out of the graph
            entropy = entropy_bonus(logits, mask, temperature, aggregation)
        loss = pg.loss + self.vf_coef * vf.loss - self.entropy_coef * entropy
        return LossOutput(loss, units=pg.units, approx_kl=pg.approxkl, stats={
            "train/loss": loss.detach(), "loss/policy": pg.loss.detach(), "loss/value": vf.loss.detach(),
            "policy/approxkl": pg.approxkl, "policy/clipfrac": pg.clipfrac, "policy/entropy": entropy.detach(),
            "policy/ratio_mean": pg.ratio_mean, "value/clipfrac": vf.clipfrac,
        })

    # ------------------------------------------------------------------------------------------ after
    @hookimpl
    def alignkit_after_update(self, module, experience: PPOExperience, stats: dict[str, float]) -> None:
        self._pass = None  # normally taken by the loss already; never keep a graph past the update
        # The controller's target is in nats per sequence: feed it the k1 log-ratio sum (the KL itself, estimated
        # without bias), whatever estimator the penalty uses (k3, abs and mse are on other scales).
        log_ratio = (experience.old_logprobs - experience.ref_logprobs) * experience.response_mask  # (B, R)
        kl_per_sequence = module.reduce_mean(log_ratio.sum(-1).mean())
        self.kl_controller.update(float(kl_per_sequence), experience.size * module.world_size)

    @hookimpl
    def alignkit_metrics(self, module, rollout: Rollout, experience: PPOExperience) -> dict[str, float]:
        mask = experience.response_mask
        kl = (experience.kl * mask).sum(-1)  # (B,) per-sequence KL estimate
        log_ratio = ((experience.old_logprobs - experience.ref_logprobs) * mask).sum(-1)
        return {
            "objective/kl": float(log_ratio.mean()),
            "objective/kl_penalty": float(kl.mean()),
            "objective/kl_coef": float(self.kl_controller.value),
            "objective/rlhf_reward": float((experience.scores - self.kl_controller.value * kl).mean()),
            "tokens/response_len_mean": float(mask.sum(-1).mean()),
            "tokens/ended_frac": float(rollout.ended.float().mean()),
            "policy/advantages_mean": float(masked_mean(experience.advantages, mask)),
            "value/mean": float(masked_mean(experience.old_values, mask)),
        }

    # ------------------------------------------------------------------------------------------ checkpoint
    def extra_state(self) -> dict[str, Any]:
        """The adaptive KL coefficient and the count of updates (which seeds the minibatch shuffling)."""
        return {"kl_controller": self.kl_controller.state_dict(), "updates": self.updates}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.updates = state["updates"]
