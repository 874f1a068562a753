"""Token-level cross-entropy for supervised fine-tuning, counting completion tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of -log p(y_t | y_<t) over labelled tokens, and how many there were.

    logits (B, T, V) predict the next token, so position t is scored against labels[t+1]; labels
    equal to -100 (prompt and padding) are skipped. Returning the sum and the count, not the mean,
    lets the caller divide by the token count of the whole global batch, so that gradient
    accumulation and several processes give the same update as one big batch.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]  # (B, T-1)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    count = (shift_labels != IGNORE).sum()
    return total, count
