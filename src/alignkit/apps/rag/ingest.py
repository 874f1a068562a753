"""Bring an index up to date with its sources: new and changed documents in, vanished ones out, unchanged ones skipped.

Run it on Monday, edit and delete some files, run it again on Tuesday: only what changed is
re-chunked, only chunk texts never seen before are embedded, and a document's old chunks are
swapped for its new ones in the same transaction. Documents are written in groups of about
`batch_chunks` chunks, one transaction per group, so a killed ingest keeps every group it
committed and the next run picks up the rest.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignkit.apps.rag.chunk import Chunk, ChunkConfig, TokenCounter, chunk_blocks
from alignkit.apps.rag.embed import DEFAULT_MODEL_NAME, Embedder, load_embedder
from alignkit.apps.rag.sources import DEFAULT_MAX_ROWS, Skipped, scan_source
from alignkit.apps.rag.store import SqliteVecStore, StoredDocument
from alignkit.io import record_skipped

log = logging.getLogger(__name__)

# Bump when extraction or chunking changes in a way that should rebuild existing chunks.
PIPELINE_VERSION = "1"


@dataclass
class IngestReport:
    """What one ingest did, document by document, and what it could not read and why."""

    index_path: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    """Documents deleted from the index: vanished from an ingested folder, or no longer readable."""
    skipped: list[Skipped] = field(default_factory=list)
    decoded: list[tuple[str, str]] = field(default_factory=list)
    """(source, encoding) of text files that were not UTF-8 and were read with a detected encoding."""
    chunks_written: int = 0
    chunks_removed: int = 0
    """Old chunks deleted, including those replaced by a changed document's new chunks."""
    embedded: int = 0
    """Chunk texts sent to the embedding model."""
    reused_vectors: int = 0
    """Chunks whose vector was already in the index (identical text) or repeated within this ingest."""
    seconds: float = 0.0

    def summary(self) -> str:
        headline = (
            f"{self.index_path}: {len(self.added)} added, {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed, {len(self.skipped)} skipped; "
            f"{self.chunks_written} chunks written ({self.embedded} embedded, {self.reused_vectors} reused), "
            f"{self.chunks_removed} removed, in {self.seconds:.1f} s"
        )
        lines = [headline]
        for source, encoding in self.decoded:
            lines.append(f"  read {source} as {encoding} (not UTF-8; the encoding is charset-normalizer's guess)")
        for skip in self.skipped:
            where = f" ({skip.location})" if skip.location else ""
            lines.append(f"  skipped {skip.source}{where}: {skip.reason}")
        return "\n".join(lines)


@dataclass
class _Pending:
    document: StoredDocument
    chunks: list[Chunk]
    is_new: bool


def ingest(
    sources: Iterable[str | os.PathLike],
    index_path: str | Path,
    tokenizer: object,
    *,
    embedder: Embedder | None = None,
    config: ChunkConfig = ChunkConfig(),
    max_rows: int = DEFAULT_MAX_ROWS,
    batch_chunks: int = 256,
) -> IngestReport:
    """Index `sources` (files, folders, `sqlite:///db?table=` / `?query=` specs) into the index file at `index_path`.

    tokenizer: the generator's Hugging Face tokenizer; chunk sizes are measured in its tokens.
    embedder: the embedding model (default all-MiniLM-L6-v2); an existing index must be given the same one.
    config: chunk size and overlap in tokens (see chunk.chunk_budget to derive max_tokens from a context window).
    max_rows: cap on rows read from one CSV file or SQL source.
    batch_chunks: chunks embedded and committed together; smaller loses less work to a crash, larger embeds faster.
    """
    started = time.perf_counter()
    embedder = embedder or load_embedder(DEFAULT_MODEL_NAME)
    counter = TokenCounter(tokenizer)
    signature = f"{PIPELINE_VERSION}:{counter.fingerprint()}:{config.max_tokens}:{config.overlap_tokens}"
    report = IngestReport(index_path=str(Path(index_path).expanduser().resolve()))
    with SqliteVecStore(index_path, embedder.name, embedder.dim) as store:
        pending: list[_Pending] = []
        for spec in sources:
            scan = scan_source(spec, max_rows)
            seen = set()
            for doc in scan.documents:
                seen.add(doc.source)
                if doc.encoding != "utf-8":
                    report.decoded.append((doc.source, doc.encoding))
                old = store.document(doc.source)
                if old and (old.content_hash, old.signature, old.root) == (doc.content_hash, signature, doc.root):
                    report.unchanged.append(doc.source)
                    continue
                stored = StoredDocument(doc.source, doc.root, doc.kind, doc.content_hash, signature, doc.locator_unit, 0)
                pending.append(_Pending(stored, chunk_blocks(doc.blocks, counter, config), old is None))
                if sum(len(p.chunks) for p in pending) >= batch_chunks:
                    _write(store, embedder, pending, report)
                    pending = []
            _write(store, embedder, pending, report)
            pending = []
            report.skipped.extend(scan.skipped)  # complete only now that the documents were read
            for skip in scan.skipped:
                # Damage in a source the user meant to ingest makes the exit code 3; a folder's
                # images and other files of no supported type are passed over without it.
                if not skip.reason.startswith("unsupported file type"):
                    record_skipped(f"{skip.source} {skip.location}".strip())
            if scan.complete:
                gone = [d.source for d in store.documents(root=scan.root) if d.source not in seen]
                if gone:
                    report.chunks_removed += store.delete(gone)
                    report.removed.extend(gone)
                    log.info("removed %d documents no longer readable under %s", len(gone), scan.root)
            else:
                # A folder that is missing (an unmounted drive, a typo) is not evidence that its
                # files were deleted: keep what was indexed from it, and say so.
                kept = len(store.documents(root=scan.root))
                if kept:
                    report.skipped = [
                        Skipped(s.source, f"{s.reason}; its {kept} indexed documents were kept", s.location)
                        if s.source == scan.root else s
                        for s in report.skipped
                    ]
    report.seconds = time.perf_counter() - started
    log.info(report.summary())
    return report


def _write(store: SqliteVecStore, embedder: Embedder, pending: list[_Pending], report: IngestReport) -> None:
    """Embed what is not cached, then replace the pending documents in one transaction."""
    if not pending:
        return
    all_chunks = [c for p in pending for c in p.chunks]
    vectors = store.cached_vectors(c.text_hash for c in all_chunks)
    to_embed = {c.text_hash: c.text for c in all_chunks if c.text_hash not in vectors}
    if to_embed:
        for text_hash, vector in zip(to_embed, embedder.encode(list(to_embed.values()))):
            vectors[text_hash] = vector
    items = []
    for p in pending:
        matrix = np.stack([vectors[c.text_hash] for c in p.chunks]) if p.chunks else np.zeros((0, embedder.dim), np.float32)
        items.append((p.document, p.chunks, matrix))
    report.chunks_removed += store.upsert(items)
    report.chunks_written += len(all_chunks)
    report.embedded += len(to_embed)
    report.reused_vectors += len(all_chunks) - len(to_embed)
    for p in pending:
        (report.added if p.is_new else report.updated).append(p.document.source)
        log.info("%s %s (%d chunks)", "added" if p.is_new else "updated", p.document.source, len(p.chunks))
