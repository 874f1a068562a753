"""Generation: the result dataclass, chat templates, left padding, and `generate`, the entry point every caller uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Prompt = str | list[dict]  # plain text, or chat messages [{"role", "content"}, ...]


@dataclass
class Generation:
    prompt_ids: list[list[int]]
    """Token ids of each rendered prompt, unpadded."""
    tokens: list[list[int]]
    """New token ids of each completion, up to and including EOS when it was produced."""
    texts: list[str]
    """Decoded completions, special tokens removed."""
    finished: list[bool]
    """True where the completion ended with EOS rather than at max_new_tokens."""
    logprobs: list[torch.Tensor] | None = None
    """Per new token, log p(token | prefix) under the model at the sampling temperature
    (no top-k/top-p truncation); float32 on the CPU. None unless asked for."""


def render_prompt(tokenizer, prompt: Prompt, chat: bool = True) -> str:
    """The text fed to the model: the tokenizer's chat template with a generation prompt,
    or the plain prompt for models without a template (or with chat=False)."""
    if chat and tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        return "\n".join(m["content"] for m in prompt)
    return prompt


def eos_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, list) else [cfg_eos])
    return sorted(i for i in ids if i is not None)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def tail_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) float mask of each row's last `lengths[b]` columns: where the responses of a
    left-padded batch lie when only its last `width` positions are kept."""
    return (torch.arange(width, device=lengths.device)[None, :] >= (width - lengths)[:, None]).float()


def generate(model, tokenizer, prompts: Sequence[Prompt | list[int]], *, n: int = 1, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | list[int] | None = None, return_logprobs: bool = False, chat: bool = True,
             batch_size: int | None = None, streamer=None, progress: str | None = None,
             logits_processor=None, on_step=None, min_new_tokens: int = 0) -> Generation:
    """Generate `n` completions of each prompt with the rollout engine (`alignkit.models.rollout`), in
    batches of `batch_size` rows (default: all at once); `progress` names a progress bar over the batches.

    temperature 0 is greedy decoding; otherwise sampling with optional top-k/top-p. A `seed` (an int,
    or one per row) makes sampling repeatable without touching the global RNG. A plain model generates
    from its own weights; a peft model from a merged copy that is re-synced when its weights change.
    See `RolloutEngine.generate` for every option.
    """
    from alignkit.models.rollout import engine_for

    return engine_for(model, tokenizer).generate(
        prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, return_logprobs=return_logprobs, chat=chat, batch_size=batch_size, progress=progress,
        streamer=streamer, logits_processor=logits_processor, on_step=on_step, min_new_tokens=min_new_tokens)
