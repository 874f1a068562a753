"""Knowledge distillation: the temperature-softened KL to a teacher plus cross-entropy on hard labels.

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(y, q_1)

with p_T = softmax(z_teacher / T), q_T = softmax(z_student / T) (Hinton, Vinyals & Dean 2015, sec. 2).
The T^2 keeps the soft term's gradient on the same scale as the hard term's when T changes.
Like sft_loss_sum, the functions return sums and a count so the caller divides by the token count
of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.losses.sft import IGNORE


def distill_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of per-token KL(p_T || q_T), sum of per-token CE, labelled-token count).

    Logits (B, T, V) at position t predict labels[t+1]; positions whose label is -100 count in
    neither term. The teacher's logits carry no gradient.
    """
    labels = labels[:, 1:]  # (B, T-1)
    mask = (labels != IGNORE).float()
    s = student_logits[:, :-1, :].float()
    t = teacher_logits[:, :-1, :].detach().float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T-1): KL(p || q) per token
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return (kl * mask).sum(), ce, mask.sum()


def distill_loss(kl_sum: torch.Tensor, ce_sum: torch.Tensor, alpha: float, temperature: float) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE, on sums (divide by the token count for the mean)."""
    return alpha * temperature ** 2 * kl_sum + (1 - alpha) * ce_sum


def hidden_mse_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over unmasked tokens of the mean squared difference of two (B, T, D) hidden states.

    The student's states must already be projected to the teacher's width D (FitNets, Romero et al. 2015).
    """
    per_token = (student_hidden.float() - teacher_hidden.detach().float()).pow(2).mean(-1)  # (B, T)
    return (per_token * mask.float()).sum()
