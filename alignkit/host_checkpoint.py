"""What the host adds to and takes from Lightning's checkpoints: :class:`CheckpointState` is a mixin of
:class:`alignkit.module.AlignModule`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from alignkit.checkpoint import rng_states, set_rng_states

if TYPE_CHECKING:
    # The mixin is combined with `LightningModule` in `AlignModule`: type checkers see that base, run time does not.
    from lightning import LightningModule as _LightningModule
    from torch import nn

    from alignkit.plugin import Algorithm
    from alignkit.rewards import RunningMoments
else:
    _LightningModule = object


class CheckpointState(_LightningModule):
    """Checkpoints hold what trains, not the frozen models (rebuilt from their sources at start-up), plus the
    running reward statistics (``reward_moments``), the algorithm's :meth:`~alignkit.plugin.Algorithm.extra_state`
    and the state of the ``torch.Generator`` attributes of the algorithm and the reward plugins."""

    FROZEN_PREFIXES: ClassVar[tuple[str, ...]] = ("reference.", "rewards.")

    # Set by the host (`AlignModule`): declared here for type checkers only.
    algorithm: Algorithm
    rewards: nn.ModuleList
    reward_moments: RunningMoments

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Frozen models are rebuilt from their sources at start-up: checkpoints hold only what trains.
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith(self.FROZEN_PREFIXES)}
        checkpoint["alignkit"] = {"reward_moments": self.reward_moments.state_dict(),
                                  "algorithm": self.algorithm.extra_state(),
                                  "rng": rng_states(self.owned_generators())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # (a model-parallel strategy has already loaded the weights itself)
            frozen = {k: v for k, v in self.state_dict().items() if k.startswith(self.FROZEN_PREFIXES)}
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **frozen}
        state = checkpoint.get("alignkit", {})
        if "reward_moments" in state:
            self.reward_moments.load_state_dict(state["reward_moments"])
        if state.get("algorithm"):
            self.algorithm.load_extra_state(state["algorithm"])
        if "rng" in state and self._trainer is not None:  # resuming a fit, not just reading weights
            set_rng_states(state["rng"], self.owned_generators())

    def owned_generators(self) -> dict[str, torch.Generator]:
        """The ``torch.Generator`` attributes of the algorithm and the reward plugins, by dotted name."""
        owners = [("algorithm", self.algorithm), *((f"rewards.{i}", r) for i, r in enumerate(self.rewards))]
        return {f"{prefix}.{attr}": value for prefix, owner in owners for attr, value in vars(owner).items()
                if isinstance(value, torch.Generator)}
