"""SimPO, simple preference optimisation with a reference-free reward (Meng et al. 2024, "SimPO: Simple
Preference Optimization with a Reference-Free Reward"), as an alignkit algorithm plugin.

Where DPO's implicit reward is β·log π(y|x)/π_ref(y|x), SimPO's is the policy's own *average* token
log-probability, β/|y|·log π(y|x): no reference model (half the memory, one forward per batch), and no
reward for length. A target margin γ asks the chosen response to win by more than γ.

Shapes: ``B`` preference pairs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from alignkit import Algorithm, LossOutput, PreferenceBatch, hookimpl
from alignkit_plugins.dpo import concatenated_logps


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float,
               gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """The SimPO loss (Meng et al. 2024, Eq. 6) of each pair:

        L = −log σ( β/|y_c|·log π(y_c|x) − β/|y_r|·log π(y_r|x) − γ )

    Args:
        chosen_logps: ``(B,)`` length-normalised log-probabilities (1/|y_c|)·log π(y_c|x) of the chosen responses.
        rejected_logps: ``(B,)`` the same for the rejected responses.
        beta: β > 0, scale of the reward.
        gamma: γ ≥ 0, the target reward margin.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards β·logps are detached.
    """
    chosen, rejected = beta * chosen_logps, beta * rejected_logps
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


class SimPO(Algorithm):
    """Reference-free preference optimisation on length-normalised log-probabilities with a target margin."""

    data_kind = "preference"
    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        """
        Args:
            beta: β, scale of the implicit reward β/|y|·log π(y|x) (the paper uses 2 to 10).
            gamma: γ, the target margin between the chosen and the rejected reward (the paper uses 0.3 to 1.6).
        """
        super().__init__()
        if not beta > 0 or gamma < 0:
            raise ValueError(f"algorithm: SimPO needs beta > 0 and gamma >= 0, got beta={beta}, gamma={gamma}")
        self.beta, self.gamma = beta, gamma

    @hookimpl
    def alignkit_loss(self, module, batch: PreferenceBatch) -> LossOutput:
        chosen_logps, rejected_logps = concatenated_logps(module.policy, batch, length_normalize=True)
        losses, chosen, rejected = simpo_loss(chosen_logps, rejected_logps, self.beta, self.gamma)
        return LossOutput(losses.mean(), {
            "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": chosen_logps.detach().mean(), "logps/rejected": rejected_logps.detach().mean(),
        })
