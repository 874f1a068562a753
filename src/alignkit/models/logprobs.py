"""Log-probabilities of given tokens under a causal LM, the quantity DPO and PPO optimise."""

from __future__ import annotations

import torch

from alignkit.models.shared_prefix import PrefixSplit, forward_shared


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1, shape (B, T-1); any padding side (positions follow the mask)."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(2, input_ids[:, 1:, None]).squeeze(2)


def sequence_logprob(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     target_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p over the tokens where target_mask is 1 (e.g. the completion), shape (B,)."""
    return (token_logprobs(model, input_ids, attention_mask) * target_mask[:, 1:]).sum(dim=1)


def shared_sequence_logprob(model, split: PrefixSplit, target_from: torch.Tensor) -> torch.Tensor:
    """`sequence_logprob` of rows cut by models.shared_prefix.split_shared_prefix, summing the tokens at
    positions >= target_from[i] of each row (its completion), shape (B,). The prefixes must end
    before the first target token's prediction (need_from <= target_from - 1 when splitting)."""
    logits = forward_shared(model, split).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, split.tail_ids[:, 1:, None]).squeeze(2)
    target = (split.tail_pos[:, 1:] >= target_from[:, None]) & split.tail_mask[:, 1:].bool()
    return (logp * target).sum(dim=1)
