"""Critic-free online RL: group advantage estimators, the clipped token-level loss and its aggregation.

Rewards arrive as (G, k): G prompts (groups), k sampled completions each. Token tensors are (B, T)
over response tokens with `mask` 1 on real tokens. The KL term in the loss is `losses.kl.kl_k3`.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["token", "sequence", "fixed"]


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps), the std unbiased (n - 1); (G, k) -> (G, k).

    Shao et al. 2024, "DeepSeekMath", section 4.1.2 (outcome supervision). A group whose rewards are
    all equal has std 0 and gets advantage 0 (no NaN: the numerator is exactly 0).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return (rewards - mean) / (std + eps)


def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r - group mean, without the std division; (G, k) -> (G, k).

    Liu et al. 2025, "Understanding R1-Zero-Like Training" (Dr. GRPO), eq. 3: dividing by the std
    up-weights groups that are nearly all right or all wrong. Pair it with aggregation "fixed".
    """
    return rewards - rewards.mean(dim=1, keepdim=True)


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_i - mean of the other k - 1 rewards of its group (leave-one-out baseline); (G, k) -> (G, k).

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization", eq. 4. Equal to
    k / (k - 1) * (r_i - group mean).
    """
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


def group_advantages(rewards: torch.Tensor, estimator: str) -> tuple[torch.Tensor, int]:
    """Advantages of the named estimator, and how many groups had all-equal rewards. Such a group
    carries no signal: its advantages are set to exactly 0 (a mean of equal floats can be off by an ulp)."""
    if rewards.shape[1] < 2:
        raise ValueError("group advantages need at least 2 completions per prompt")
    flat = rewards.max(dim=1).values == rewards.min(dim=1).values  # (G,)
    return ESTIMATORS[estimator](rewards) * ~flat[:, None], int(flat.sum().item())


def clipped_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                       clip_low: float, clip_high: float) -> torch.Tensor:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - old_logp).

    Schulman et al. 2017 (PPO), eq. 7, with a sequence's advantage on each of its tokens (advantages
    (B,)) as in GRPO; clip_high > clip_low is DAPO's "clip-higher" (Yu et al. 2025). (B, T) -> (B, T).
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation, *, n_tokens: float | None = None,
              n_seqs: float | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """A per-token loss (B, T) reduced to a scalar over the masked tokens:

    - "token": sum over every token / n_tokens (each token weighs the same; DAPO, TRL's default);
    - "sequence": mean over sequences of each one's token mean (the GRPO paper's 1/G sum 1/|o_i| sum_t);
    - "fixed": sum over every token / (n_seqs * max_tokens) (Dr. GRPO: no length normalisation).

    n_tokens / n_seqs default to this batch's; pass the global counts when a batch is split across
    processes or minibatches so that the pieces add up to the loss of the whole.
    """
    n_seqs = mask.shape[0] if n_seqs is None else n_seqs
    if how == "token":
        n_tokens = mask.sum() if n_tokens is None else n_tokens
        return (per_token * mask).sum() / max(float(n_tokens), 1.0)
    if how == "sequence":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / n_seqs
    if how == "fixed":
        if max_tokens is None:
            raise ValueError("aggregation 'fixed' needs max_tokens")
        return (per_token * mask).sum() / (n_seqs * max_tokens)
    raise ValueError(f"unknown aggregation {how!r}")
