"""The one batched generation helper: chat templates, left padding, sampling, stop at EOS, per-token log-probs."""

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


@torch.inference_mode()
def generate(model, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, return_logprobs: bool = False, chat: bool = True,
             batch_size: int | None = None, streamer=None, progress: str | None = None) -> Generation:
    """Generate completions for `prompts`, in batches of `batch_size` (default: all at once);
    `progress` names a progress bar over the batches.

    temperature 0 is greedy decoding; otherwise sampling with optional top-k/top-p. A `seed` makes
    sampling repeatable without touching the global RNG.
    """
    from transformers import GenerationConfig

    if isinstance(prompts, (str, dict)):
        raise TypeError("prompts must be a list of prompts")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(tokenizer, model)
    sample = temperature > 0
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if sample else {}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=eos,
                              pad_token_id=pad_id, return_dict_in_generate=True,
                              output_logits=return_logprobs, **sampling)
    rendered = [render_prompt(tokenizer, p, chat) for p in prompts]
    # A chat template already holds its special tokens; a plain prompt gets the model's usual ones.
    with_template = chat and tokenizer.chat_template is not None
    prompt_ids = [tokenizer(t, add_special_tokens=not with_template)["input_ids"] for t in rendered]
    out = Generation(prompt_ids=prompt_ids, tokens=[], texts=[], finished=[],
                     logprobs=[] if return_logprobs else None)
    step = batch_size or len(prompt_ids)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(prompt_ids), step), desc=progress, unit="batch", disable=progress is None):
            batch = prompt_ids[start:start + step]
            ids, mask = left_pad(batch, pad_id, device)
            result = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                    streamer=streamer)
            new = result.sequences[:, ids.shape[1]:].cpu()
            if return_logprobs:
                scale = temperature if sample else 1.0
                # logits[t]: raw scores for new token t, (B, V); one step at a time keeps memory at B*V.
                lp = torch.stack([
                    torch.log_softmax(step_logits.float() / scale, dim=-1)
                    .gather(1, new[:, t:t + 1].to(step_logits.device)).squeeze(1).cpu()
                    for t, step_logits in enumerate(result.logits)], dim=1)
            for i in range(new.shape[0]):
                row = new[i].tolist()
                cut = next((j + 1 for j, tok in enumerate(row) if tok in eos), None)
                kept = row[:cut] if cut is not None else row
                out.tokens.append(kept)
                out.finished.append(cut is not None)
                out.texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
                if return_logprobs:
                    out.logprobs.append(lp[i, :len(kept)].clone())
    return out
