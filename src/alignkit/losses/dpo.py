"""Direct preference optimisation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """-log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), mean over pairs.

    Arguments are summed log-probs of each completion, shape (B,). Rafailov et al. 2023, "Direct
    Preference Optimization", eq. 7. The implicit rewards beta * (log pi - log ref) are returned.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    stats = {"reward_chosen": chosen_reward.mean().item(), "reward_rejected": rejected_reward.mean().item(),
             "accuracy": (chosen_reward > rejected_reward).float().mean().item()}
    return loss, stats
