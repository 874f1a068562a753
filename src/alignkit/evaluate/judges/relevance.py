"""The relevance judge: cosine similarity of prompt and reply under a sentence-embedding model.

It reads meaning, not phrases, and shares nothing with a rule-based labeler, so it guards an
evaluation against a policy that pastes the same reply under every message: such replies stay
equally (un)related to every prompt while an answer to the message at hand is closer to it. The
default model is all-MiniLM-L6-v2, which the RAG code already loads offline from its package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch


class RelevanceJudge:
    """cos(embed(prompt), embed(reply)), -1..1 (in practice 0..1 for text pairs)."""

    name = "relevance"

    def __init__(self, model_dir: Path | str | None = None, device: str = "cpu"):
        from alignkit.apps.rag.embed import Embedder

        self.embedder = Embedder(model_dir, device=device)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        if not completions:
            return []
        # Rows are unit length, so the row-wise dot product is the cosine.
        a, b = self.embedder.encode(list(prompts)), self.embedder.encode(list(completions))
        return [float(x) for x in (a * b).sum(axis=1)]


class RelevanceComponent(ComponentBase):
    judge: Literal["relevance"]
    """Cosine similarity of prompt and reply embeddings (all-MiniLM-L6-v2 by default)."""
    model: Path | None = None
    """A local sentence-transformers folder; default the packaged all-MiniLM-L6-v2."""

    def build(self, device: str) -> Judge:
        return RelevanceJudge(self.model, device="cpu" if device == "auto" else device)
