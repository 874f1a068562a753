"""Find the passages that answer a question: dense, BM25, or both fused by reciprocal rank, plus custom retrievers.

Dense search finds paraphrases that share no words with the question; BM25 finds the exact
identifiers, names and codes that embeddings blur together. Reciprocal-rank fusion (Cormack,
Clarke and Buettcher, SIGIR 2009: score = sum over rankings of 1 / (60 + rank)) combines them
without having to calibrate their incomparable scores, and also folds in any custom retriever
(a callable question -> passages, e.g. a search API) as one more ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

from alignkit.apps.rag.embed import Embedder, load_embedder
from alignkit.apps.rag.sources import Retriever
from alignkit.apps.rag.store import Hit, RagIndexError, SearchFilter, SqliteVecStore

Mode = Literal["hybrid", "dense", "bm25"]
Reranker = Callable[[str, list[Hit]], list[Hit]]
"""(question, candidates) -> candidates reordered best first, e.g. by a cross-encoder."""

RRF_K = 60
"""The constant of reciprocal-rank fusion; 60 is the value from the paper and works across collections."""


def reciprocal_rank_fusion(rankings: Sequence[Sequence[Hit]], rrf_k: int = RRF_K) -> list[Hit]:
    """Merge rankings: a passage's score is the sum of 1 / (rrf_k + rank) over the rankings it appears in (rank from 1)."""
    fused: dict[object, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            key = hit.chunk_id if hit.chunk_id is not None else (hit.source, hit.text)
            if key not in fused:
                fused[key] = replace(hit, score=0.0, method="hybrid" if hit.chunk_id is not None else hit.method)
            fused[key].score += 1.0 / (rrf_k + rank)
    return sorted(fused.values(), key=lambda h: h.score, reverse=True)


def search(
    index: str | Path | SqliteVecStore,
    query: str,
    k: int = 5,
    mode: Mode = "hybrid",
    filters: SearchFilter | None = None,
    *,
    embedder: Embedder | None = None,
    retrievers: Mapping[str, Retriever] | None = None,
    rerank: Reranker | None = None,
    candidates: int | None = None,
) -> list[Hit]:
    """The k best passages for `query`, best first.

    index: an index file written by `ingest`, or an open store.
    mode: "dense" (embeddings), "bm25" (full text) or "hybrid" (both, fused by reciprocal rank).
    filters: restrict the index to a source prefix and/or document kinds (custom retrievers are not filtered).
    embedder: the model the index was built with; loaded from the index's record when omitted.
    retrievers: name -> callable(question) -> list of passage strings, fused with the index's ranking(s).
    rerank: reorders the fused candidates before the top k are kept.
    candidates: how many hits each method contributes before fusion (default max(4k, 20)).
    """
    if mode not in ("hybrid", "dense", "bm25"):
        raise ValueError(f"mode must be 'hybrid', 'dense' or 'bm25', got {mode!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    depth = candidates or max(4 * k, 20)
    store = index if isinstance(index, SqliteVecStore) else SqliteVecStore(index)
    try:
        rankings: list[list[Hit]] = []
        if mode in ("hybrid", "dense"):
            if embedder is None:
                embedder = load_embedder(store.embedder_name)
            elif embedder.name != store.embedder_name:
                raise RagIndexError(
                    f"{store.path} was built with {store.embedder_name!r}; the query embedder is {embedder.name!r}"
                )
            rankings.append(store.dense_search(embedder.encode([query])[0], depth, filters))
        if mode in ("hybrid", "bm25"):
            rankings.append(store.bm25_search(query, depth, filters))
    finally:
        if store is not index:
            store.close()
    for name, retriever in (retrievers or {}).items():
        passages = retriever(query)[:depth]
        rankings.append(
            [Hit(text=p, source=f"custom:{name}", score=1.0 / (i + 1), method=f"custom:{name}") for i, p in enumerate(passages)]
        )
    hits = rankings[0] if len(rankings) == 1 else reciprocal_rank_fusion(rankings)
    if rerank is not None:
        hits = rerank(query, hits)
    return hits[:k]
