"""Retrieval-augmented generation: ingest documents and databases into a persistent index, then search it.

    report = ingest(["docs/", "sqlite:///shop.db?table=orders"], "rag.db", tokenizer)
    hits = search("rag.db", "How do I reset my password?", k=4)
"""

from alignkit.apps.rag.chunk import Chunk, ChunkConfig, chunk_blocks, chunk_budget
from alignkit.apps.rag.embed import Embedder
from alignkit.apps.rag.ingest import IngestReport, ingest
from alignkit.apps.rag.retrieve import reciprocal_rank_fusion, search
from alignkit.apps.rag.sources import Block, Document, Skipped, scan_source
from alignkit.apps.rag.store import Hit, RagIndexError, SearchFilter, SqliteVecStore

__all__ = [
    "Block", "Chunk", "ChunkConfig", "Document", "Embedder", "Hit", "IngestReport", "RagIndexError",
    "SearchFilter", "Skipped", "SqliteVecStore", "chunk_blocks", "chunk_budget", "ingest",
    "reciprocal_rank_fusion", "scan_source", "search",
]
