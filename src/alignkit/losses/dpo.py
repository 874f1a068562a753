"""Direct preference optimisation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]), shape (B,),
    and the implicit reward margin beta * [...] itself, shape (B,).

    Arguments are summed log-probs of each completion, shape (B,). Rafailov et al. 2023, "Direct
    Preference Optimization", eq. 7; beta * (log pi - log ref) is the implicit reward of section 5.
    """
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin), margin
