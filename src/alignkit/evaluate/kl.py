"""Exact KL to the base during `alignkit eval`'s generation: the policy's distributions are captured
as its greedy replies are decoded, so only the base (the adapter disabled) runs a second pass.

    KL(reply) = sum over reply positions t of sum_v pi(v | y_<t) (log pi(v | y_<t) - log ref(v | y_<t))

`compare.kl_to_base` computes the same number with two teacher-forced passes (policy and base) over
the finished replies; here the policy's half comes from the decode steps that produced the reply
(the rollout engine's merged weights, so the two agree up to float rounding: tested). On the demo's
evaluation that pass was about half of each fine-tuned model's KL time. Where the engine decodes in
bfloat16 (CPUs with AMX, models.cpu_linear) the captured distributions carry bfloat16's rounding, which
a KL would count as distance (0.028 nats per 48-token reply of a zero adapter against its own base on
the AMX Xeon): there the policy's half is a float32 teacher-forced pass too.
"""

from __future__ import annotations

import torch

from alignkit.models import generate
from alignkit.models.generation import Generation, left_pad


class CaptureLogSoftmax:
    """A logits processor that keeps the log-softmax of every decode step and changes nothing."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(torch.log_softmax(scores.float(), dim=-1).cpu())
        return scores


@torch.no_grad()
def base_kl(model, gen: Generation, captured: list[torch.Tensor] | None, pad_id: int) -> list[float]:
    """Per reply, sum over its tokens of KL(policy || base), the policy's log-softmax taken from
    `captured` (one (B, V) tensor per decode step; None: from a float32 pass with the adapter on) and
    the base's from one pass with the adapter off."""
    toks = [t or [pad_id] for t in gen.tokens]
    seqs = [p + t for p, t in zip(gen.prompt_ids, toks)]
    ids, mask = left_pad(seqs, pad_id, next(model.parameters()).device)
    keep = max(len(t) for t in gen.tokens) if any(gen.tokens) else 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

    def logprobs():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1)
        return torch.log_softmax(out.logits[:, :-1].float(), dim=-1).cpu()  # (B, keep, V), replies right-aligned

    policy = logprobs() if captured is None else None
    with model.disable_adapter():
        ref = logprobs()
    kls = []
    for i, t in enumerate(gen.tokens):
        n = len(t)
        if n == 0:
            kls.append(0.0)
            continue
        pol = policy[i, keep - n:] if captured is None else torch.stack([captured[s][i] for s in range(n)])
        kls.append(float((pol.exp() * (pol - ref[i, keep - n:])).sum()))
    return kls


def generate_with_kl(model, tokenizer, prompts: list, *, max_new_tokens: int) -> tuple[Generation, list[float] | None]:
    """Greedy replies to `prompts` (one batch) and, for a model with an adapter, each reply's exact KL
    to its base; None for a model without one (it is its own base)."""
    if not hasattr(model, "disable_adapter"):
        return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens), None
    from alignkit.models.cpu_linear import decode_precision

    exact = next(model.parameters()).device.type != "cpu" or decode_precision() == "float32"
    capture = CaptureLogSoftmax() if exact else None  # else the decode's bfloat16 rounding would count as KL
    gen = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, logits_processor=capture)
    return gen, base_kl(model, gen, capture.steps if capture else None, tokenizer.pad_token_id)
