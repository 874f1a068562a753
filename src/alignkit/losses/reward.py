"""Pairwise reward-model losses: Bradley-Terry with an optional margin, and reward centering."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin), shape (B,).

    Bradley-Terry preference model as used for reward models in Ouyang et al. 2022 (InstructGPT),
    eq. 1; the margin term follows Touvron et al. 2023 (Llama 2), eq. 2.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def soft_bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-pair -(p log sigmoid(d) + (1 - p) log sigmoid(-d)), d = r_chosen - r_rejected, shape (B,).

    Bradley-Terry with a soft label p = P(chosen is better), the cross-entropy against the AI
    labeler's probability used for preference models trained on AI feedback (Bai et al. 2022, CAI,
    section 4.1); p = 1 gives bradley_terry_loss without a margin.
    """
    diff = r_chosen - r_rejected
    return -(p * F.logsigmoid(diff) + (1 - p) * F.logsigmoid(-diff))


def reward_centering(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair (r_chosen + r_rejected)^2, shape (B,): pulls rewards toward zero mean.

    The auxiliary centering loss of Eisenstein et al. 2023 ("Helping or Herding?"), section 3.
    """
    return (r_chosen + r_rejected) ** 2
