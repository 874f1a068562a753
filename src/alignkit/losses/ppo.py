"""PPO for language models: masked statistics, token rewards, GAE, clipped policy and value losses.

Tensors are (B, T) over response tokens; `mask` is 1 on real response tokens and 0 on padding.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; unbiased divides by n - 1."""
    mean = masked_mean(x, mask)
    sq = ((x - mean) ** 2 * mask).sum()
    n = mask.sum()
    return sq / (n - 1).clamp(min=1) if unbiased else sq / n.clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance); with shift_mean=False the mean
    is added back, which is how rewards are normalised without moving them.

    `all_sum` sums a tensor over processes (e.g. accelerator.reduce(t, "sum")): the mean and variance
    are then those of every process's masked entries together, as if the batch were in one process.
    """
    total = all_sum or (lambda t: t)
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n.clamp(min=1)
    var = total(((x - mean) ** 2 * mask).sum()) / (n - 1).clamp(min=1)
    white = (x - mean) * torch.rsqrt(var + eps)
    return (white if shift_mean else white + mean) * mask


def token_rewards(score: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL_t on every response token, plus the sequence score on the last.

    Ziegler et al. 2019, eq. 2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)), spread over tokens.
    score (B,), kl (B, T), mask (B, T) -> (B, T).
    """
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns = advantages + values).

    delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, with V and A zero after
    the last response token. Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16.
    """
    values = values * mask
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: mean of max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old_logp).

    Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7 (as a loss to minimise).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                 "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """0.5 * mean of max((V - R)^2, (V_clipped - R)^2), V_clipped = old_V + clip(V - old_V, -c, c).

    The value clipping of the PPO2 baselines, as used by Ziegler et al. 2019 and later RLHF codebases.
    """
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean(((clipped - returns) ** 2 > (values - returns) ** 2).float(), mask).item()}
    return loss, stats
