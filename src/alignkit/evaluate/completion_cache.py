"""Completions of `alignkit eval`, written batch by batch and reused: a killed evaluation continues
where it stopped, and a rerun with the same models, prompts and lengths generates nothing again.

One JSONL file holds every model's completions in the order evaluated (model, then prompt); each
record carries what the metrics need: the text, the prompt's and the completion's token ids, and
whether it ended with EOS, and for a fine-tuned model its exact KL to the base (evaluate/kl.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.evaluate.kl import generate_with_kl
from alignkit.io import ResumableJsonl
from alignkit.models.generation import Generation


class CompletionCache:
    """Greedy completions of several models on one prompt set, cached in `path`."""

    def __init__(self, path: Path, models: dict[str, str], prompts: list[str], *, max_new_tokens: int,
                 batch_size: int, restart: bool = False):
        self.prompts, self.batch_size, self.max_new_tokens = prompts, batch_size, max_new_tokens
        self.models = list(models)
        prompts_digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
        fingerprint = {"command": "eval", "models": models, "prompts": prompts_digest,
                       "max_new_tokens": max_new_tokens, "batch_size": batch_size}
        self.writer = ResumableJsonl(path, fingerprint, restart=restart)
        self._records = self.writer.records()

    def generate(self, name: str, model, tokenizer) -> Generation:
        """Model `name`'s completions: those cached, then the rest generated batch by batch (each
        batch appended to the cache before the next starts)."""
        n = len(self.prompts)
        first = self.models.index(name) * n  # models are cached one after another, in order
        have = self._records[first:first + n]
        starts = range(len(have), n, self.batch_size)
        for start in tqdm(starts, desc=f"eval {name}", unit="batch", initial=-(-len(have) // self.batch_size),
                          total=-(-n // self.batch_size)):
            batch = self.prompts[start:start + self.batch_size]
            gen, kls = generate_with_kl(model, tokenizer, batch, max_new_tokens=self.max_new_tokens)
            records = [{"model": name, "index": start + i, "prompt": p, "completion": gen.texts[i],
                        "tokens": gen.tokens[i], "prompt_ids": gen.prompt_ids[i], "finished": gen.finished[i],
                        **({"kl": kls[i]} if kls is not None else {})}
                       for i, p in enumerate(batch)]
            self.writer.append(records, done=first + start + len(batch))
            self._records += records
            have += records
        if first + n == len(self.prompts) * len(self.models):
            self.writer.finish()
        return Generation(prompt_ids=[r["prompt_ids"] for r in have], tokens=[r["tokens"] for r in have],
                          texts=[r["completion"] for r in have], finished=[r["finished"] for r in have])

    def kls(self, name: str) -> list[float] | None:
        """Model `name`'s per-reply KL to its base as recorded with its completions; None when any
        record lacks one (a model without adapter, or a cache written before KL was recorded)."""
        n = len(self.prompts)
        first = self.models.index(name) * n
        have = self._records[first:first + n]
        return [r["kl"] for r in have] if len(have) == n and all("kl" in r for r in have) else None
