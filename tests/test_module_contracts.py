"""The host's contracts with its plugins (issue #23): what the host reads from and offers to an algorithm, instead
of reaching into it (or it into the host) by attribute or metric names."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from alignkit import Algorithm, LossOutput, OnlineAlgorithm, Reward, RewardOutput, SamplingConfig
from alignkit.completions import Completions
from alignkit.models import ModelConfig, TinyModelConfig
from alignkit.module import AlignModule, approx_kl
from alignkit_plugins.dpo import DPO
from alignkit_plugins.ppo import PPO

TINY = ModelConfig(name_or_path="tiny",
                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))


class Constant(Reward):
    def score(self, prompts, responses, rollout):
        return RewardOutput(self.name, torch.zeros(len(responses)))


def test_approx_kl_is_read_from_the_loss_output():
    assert approx_kl(LossOutput(torch.tensor(1.0), approx_kl=torch.tensor(0.25))) == 0.25
    assert approx_kl(LossOutput(torch.tensor(1.0))) == 0.0
    with pytest.warns(DeprecationWarning, match="LossOutput.approx_kl"):
        assert approx_kl(LossOutput(torch.tensor(1.0), stats={"policy/approxkl": 0.5})) == 0.5


def test_online_algorithms_declare_sampling_and_algorithms_their_checkpoint_state():
    class Bare(OnlineAlgorithm):
        pass

    assert Bare().sampling == SamplingConfig()
    assert PPO(sampling=SamplingConfig(max_new_tokens=3)).sampling.max_new_tokens == 3

    class Offline(Algorithm):
        pass

    algorithm = Offline()
    assert algorithm.extra_state() == {} and algorithm.load_extra_state({"a": 1}) is None
    assert "_extra_state" not in "".join(algorithm.state_dict())  # not torch's mechanism: weights stay as they were
    assert set(PPO().extra_state()) == {"kl_controller", "updates"}


def test_reward_name_is_name_and_the_old_attribute_still_reads_and_writes():
    reward = Constant(name="zero")
    assert reward.name == reward.reward_name == "zero"
    reward.reward_name = "nil"
    assert reward.name == "nil"
    assert Constant().name == "constant"


def test_ppo_critic_kind_and_its_deprecated_keyword():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PPO(critic_kind="separate").critic_kind == "separate"
    with pytest.warns(DeprecationWarning, match="critic_kind"):
        ppo = PPO(critic="separate")
    assert ppo.critic_kind == "separate" and ppo.critic is None  # the critic model is built at configure


def test_host_releases_the_reference_on_one_device_only_and_offers_the_loaders(preferences_file):
    module = AlignModule(algorithm=DPO(), policy=TINY)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.trainer = trainer
    assert module.dataloaders_to_precompute() is None  # no data module
    assert module.reference is not None and module.release_reference() is True and module.reference is None
    assert module.release_reference() is False  # nothing left to release


def test_completions_are_recorded_by_a_callback_of_online_algorithms_only():
    online = AlignModule(algorithm=PPO(), policy=TINY, rewards=[Constant()], completions_per_step=3)
    callbacks = online.configure_callbacks()
    assert len(callbacks) == 1 and isinstance(callbacks[0], Completions) and callbacks[0].per_step == 3
    assert AlignModule(algorithm=DPO(), policy=TINY).configure_callbacks() == []


def test_ppo_logs_value_function_stats_outside_the_validation_prefix():
    import inspect

    import alignkit_plugins.ppo.algorithm as ppo

    source = inspect.getsource(ppo)
    assert '"value/clipfrac"' in source and '"value/mean"' in source and '"val/' not in source
