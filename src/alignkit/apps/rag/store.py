"""The RAG index: one SQLite file holding documents, chunks, an FTS5 index for BM25 and a sqlite-vec table of vectors.

All four are written in the same transactions, so a process killed at any instant leaves an index
whose every document has all of its chunks, each with its vector and its full-text entry. The
journal is WAL with synchronous=NORMAL: a killed process loses nothing committed; a power cut may
lose the last transactions but never corrupts the file.

Python's own sqlite3 is often built without extension loading, so the connection comes from
`sqlean` (a drop-in sqlite3 with FTS5) and loads sqlite-vec into it. The class has a narrow
interface (upsert, delete, dense_search, bm25_search, and the reads ingest needs) so a server
store could take its place.

sqlite-vec's vec0 table is an exact, brute-force scan: there is no approximate index, recall
against exact search is 1 by construction, and query time grows linearly with the chunk count.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import numpy as np
import sqlean
import sqlite_vec

from alignkit.apps.rag.chunk import HEADING_SEPARATOR, Chunk
from alignkit.errors import AlignkitError

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class StoredDocument:
    """What the index remembers about a document, to decide whether to re-ingest it."""

    source: str
    root: str
    kind: str
    content_hash: str
    signature: str
    """Chunking settings and tokenizer the chunks were made with; a change means re-chunk."""
    locator_unit: str
    chunk_count: int


@dataclass(frozen=True)
class SearchFilter:
    """Restricts a search to part of the index; fields left empty do not filter."""

    source_prefix: str | None = None
    """Keep chunks whose source starts with this (an absolute folder path, or "sqlite:///")."""
    kinds: tuple[str, ...] = ()
    """Keep these document kinds: markdown, text, html, pdf, csv, sqlite."""


@dataclass
class Hit:
    """A retrieved passage with where it came from, ranked by `score` (higher is better)."""

    text: str
    source: str
    score: float
    method: str
    """dense, bm25, hybrid, or custom:<name> for a passage from a custom retriever."""
    kind: str = "custom"
    heading_path: tuple[str, ...] = ()
    locator_unit: str = ""
    first_locator: int = 0
    last_locator: int = 0
    ordinal: int = 0
    chunk_id: int | None = None
    """Row id in the index; None for passages from a custom retriever."""

    @property
    def citation(self) -> str:
        """E.g. "handbook/vpn.md > Setup > Linux (lines 12-30)"."""
        parts = [self.source]
        if self.heading_path:
            parts.append(HEADING_SEPARATOR.join(self.heading_path))
        label = HEADING_SEPARATOR.join(parts)
        if self.locator_unit:
            if self.first_locator == self.last_locator:
                label += f" ({self.locator_unit} {self.first_locator})"
            else:
                label += f" ({self.locator_unit}s {self.first_locator}-{self.last_locator})"
        return label


class RagIndexError(AlignkitError):
    """The index file is missing, from another embedding model, or damaged."""


_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    root TEXT NOT NULL,
    kind TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    signature TEXT NOT NULL,
    locator_unit TEXT NOT NULL,
    chunk_count INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE INDEX documents_root ON documents(root);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents(id),
    ordinal INTEGER NOT NULL,
    text TEXT NOT NULL,
    text_hash TEXT NOT NULL,
    heading_path TEXT NOT NULL,
    first_locator INTEGER NOT NULL,
    last_locator INTEGER NOT NULL,
    token_count INTEGER NOT NULL
);
CREATE INDEX chunks_document ON chunks(document_id);
CREATE INDEX chunks_text_hash ON chunks(text_hash);
-- Contentless: the text lives once, in chunks. Porter stemming lets "installing" match "install".
CREATE VIRTUAL TABLE chunk_fts USING fts5(
    text, content='', contentless_delete=1, tokenize='porter unicode61 remove_diacritics 2'
);
"""

_HIT_COLUMNS = """
    c.id, c.text, d.source, d.kind, c.heading_path, d.locator_unit, c.first_locator, c.last_locator, c.ordinal
"""


def _filter_sql(filters: SearchFilter | None) -> tuple[str, list[object]]:
    """A WHERE fragment over documents d, and its parameters."""
    if filters is None:
        return "1", []
    clauses, params = ["1"], []
    if filters.source_prefix:
        clauses.append("substr(d.source, 1, ?) = ?")
        params += [len(filters.source_prefix), filters.source_prefix]
    if filters.kinds:
        clauses.append(f"d.kind IN ({','.join('?' * len(filters.kinds))})")
        params += list(filters.kinds)
    return " AND ".join(clauses), params


# Question words that match nearly every chunk: OR-ed into a query they put every chunk in the
# BM25 ranking, and then rank fusion rewards chunks for merely containing "how" or "my".
STOPWORDS = frozenset(
    """a about an and are as at be by can could did do does for from get got had has have how i if in
    into is it its me my of on or our should so than that the their them then there these they this
    to us was we what when where which who whom why will with would you your""".split()
)


def fts_query(text: str) -> str:
    """A free-text question as an FTS5 query: its content words quoted (so no syntax errors), OR-ed."""
    words = [w for w in dict.fromkeys(re.findall(r"\w+", text.lower())) if w not in STOPWORDS]
    return " OR ".join(f'"{w}"' for w in words)


class SqliteVecStore:
    """A persistent RAG index in one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path, embedder_name: str | None = None, dim: int | None = None) -> None:
        """Open an index; create it when `embedder_name` and `dim` are given and the file does not exist.

        Opening an existing index with a different embedder raises, since its vectors would not compare.
        """
        self.path = Path(path).expanduser().resolve()
        exists = self.path.is_file()
        if not exists and (embedder_name is None or dim is None):
            raise RagIndexError(f"no RAG index at {self.path}: run ingest first")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are begun and committed explicitly below.
        self.db = sqlean.connect(str(self.path), isolation_level=None, timeout=30.0)
        self.db.enable_load_extension(True)
        sqlite_vec.load(self.db)
        self.db.enable_load_extension(False)
        try:
            meta = self._meta()
            foreign = not meta and self.db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlean.DatabaseError as exc:
            self.db.close()
            raise RagIndexError(f"{self.path} is not a RAG index: {exc}") from exc
        if foreign:
            # Someone else's database (a source passed as the index by mistake): never write into it.
            self.db.close()
            raise RagIndexError(f"{self.path} is an SQLite database but not a RAG index: choose a new file for the index")
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.execute("PRAGMA foreign_keys = ON")
        if not meta:
            with self._transaction():
                meta = self._meta()  # another process may have created it meanwhile
                if not meta:
                    if embedder_name is None or dim is None:
                        raise RagIndexError(f"{self.path} is empty, not a RAG index: run ingest first")
                    meta = self._create(embedder_name, dim)
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise RagIndexError(f"{self.path}: index schema {meta.get('schema_version')}, this version reads {SCHEMA_VERSION}")
        self.embedder_name: str = meta["embedder"]
        self.dim: int = int(meta["dim"])
        if embedder_name is not None and embedder_name != self.embedder_name:
            raise RagIndexError(
                f"{self.path} was built with the embedding model {self.embedder_name!r}, not {embedder_name!r}: "
                "use that model, or ingest into a new index"
            )

    def _meta(self) -> dict[str, str]:
        # A plain read, no write lock: opening an index to query it must not wait for an ingest.
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            return {}
        return dict(self.db.execute("SELECT key, value FROM meta").fetchall())

    def _create(self, embedder_name: str, dim: int) -> dict[str, str]:
        # Statement by statement: executescript would commit the open transaction.
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                self.db.execute(statement)
        self.db.execute(f"CREATE VIRTUAL TABLE chunk_vec USING vec0(embedding float[{int(dim)}] distance_metric=cosine)")
        meta = {"schema_version": SCHEMA_VERSION, "embedder": embedder_name, "dim": str(int(dim))}
        self.db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", meta.items())
        return meta

    def _transaction(self) -> _Transaction:
        return _Transaction(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reads for ingest

    def documents(self, root: str | None = None) -> list[StoredDocument]:
        """All documents, or those ingested from the named root (folder, file or SQL spec)."""
        sql = "SELECT source, root, kind, content_hash, signature, locator_unit, chunk_count FROM documents"
        rows = self.db.execute(sql + (" WHERE root = ?" if root else "") + " ORDER BY source", (root,) if root else ())
        return [StoredDocument(*row) for row in rows]

    def document(self, source: str) -> StoredDocument | None:
        row = self.db.execute(
            "SELECT source, root, kind, content_hash, signature, locator_unit, chunk_count FROM documents WHERE source = ?",
            (source,),
        ).fetchone()
        return StoredDocument(*row) if row else None

    def cached_vectors(self, text_hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors already stored for chunks with these texts, so identical text is not embedded again."""
        found: dict[str, np.ndarray] = {}
        wanted = list(dict.fromkeys(text_hashes))
        for start in range(0, len(wanted), 500):
            batch = wanted[start : start + 500]
            rows = self.db.execute(
                f"""SELECT c.text_hash, v.embedding FROM chunks c JOIN chunk_vec v ON v.rowid = c.id
                    WHERE c.id IN (SELECT min(id) FROM chunks WHERE text_hash IN ({','.join('?' * len(batch))})
                                   GROUP BY text_hash)""",
                batch,
            )
            for text_hash, blob in rows:
                found[text_hash] = np.frombuffer(blob, dtype=np.float32)
        return found

    # ------------------------------------------------------------------ writes

    def upsert(self, items: Sequence[tuple[StoredDocument, Sequence[Chunk], np.ndarray]]) -> int:
        """Replace these documents' chunks (adding new documents) in one transaction; returns chunks removed."""
        removed = 0
        now = datetime.now(UTC).isoformat(timespec="seconds")
        with self._transaction():
            for doc, chunks, vectors in items:
                if len(chunks) != len(vectors):
                    raise ValueError(f"{doc.source}: {len(chunks)} chunks but {len(vectors)} vectors")
                removed += self._delete(doc.source)
                cursor = self.db.execute(
                    """INSERT INTO documents(source, root, kind, content_hash, signature, locator_unit, chunk_count, indexed_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                    (doc.source, doc.root, doc.kind, doc.content_hash, doc.signature, doc.locator_unit, len(chunks), now),
                )
                document_id = cursor.lastrowid
                for chunk, vector in zip(chunks, vectors):
                    cursor = self.db.execute(
                        """INSERT INTO chunks(document_id, ordinal, text, text_hash, heading_path, first_locator,
                                              last_locator, token_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                        (
                            document_id, chunk.ordinal, chunk.text, chunk.text_hash, json.dumps(chunk.heading_path),
                            chunk.first_locator, chunk.last_locator, chunk.token_count,
                        ),
                    )
                    chunk_id = cursor.lastrowid
                    self.db.execute("INSERT INTO chunk_fts(rowid, text) VALUES (?, ?)", (chunk_id, chunk.text))
                    self.db.execute(
                        "INSERT INTO chunk_vec(rowid, embedding) VALUES (?, ?)",
                        (chunk_id, np.asarray(vector, dtype=np.float32).tobytes()),
                    )
        return removed

    def delete(self, sources: Iterable[str]) -> int:
        """Remove these documents and their chunks in one transaction; returns chunks removed."""
        with self._transaction():
            return sum(self._delete(source) for source in sources)

    def _delete(self, source: str) -> int:
        row = self.db.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
        if row is None:
            return 0
        chunk_ids = "SELECT id FROM chunks WHERE document_id = ?"
        # Virtual tables are outside foreign keys: remove their rows first, by chunk id.
        self.db.execute(f"DELETE FROM chunk_fts WHERE rowid IN ({chunk_ids})", row)
        self.db.execute(f"DELETE FROM chunk_vec WHERE rowid IN ({chunk_ids})", row)
        removed = self.db.execute("DELETE FROM chunks WHERE document_id = ?", row).rowcount
        self.db.execute("DELETE FROM documents WHERE id = ?", row)
        return removed

    # ------------------------------------------------------------------ search

    def dense_search(self, vector: np.ndarray, k: int, filters: SearchFilter | None = None) -> list[Hit]:
        """k nearest chunks by cosine similarity (exact scan); score = 1 - cosine distance."""
        where, params = _filter_sql(filters)
        blob = np.asarray(vector, dtype=np.float32).tobytes()
        if filters is None:
            knn = "SELECT rowid, distance FROM chunk_vec WHERE embedding MATCH ? AND k = ?"
            knn_params: list[object] = [blob, k]
        else:
            # The filter goes inside the KNN query so that k results survive it.
            knn = f"""SELECT rowid, distance FROM chunk_vec WHERE embedding MATCH ? AND k = ? AND rowid IN
                      (SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {where})"""
            knn_params = [blob, k, *params]
        rows = self.db.execute(
            f"""WITH knn AS ({knn})
                SELECT {_HIT_COLUMNS}, knn.distance FROM knn
                JOIN chunks c ON c.id = knn.rowid JOIN documents d ON d.id = c.document_id
                ORDER BY knn.distance""",
            knn_params,
        ).fetchall()
        return [_hit(row[:-1], 1.0 - row[-1], "dense") for row in rows]

    def bm25_search(self, query: str, k: int, filters: SearchFilter | None = None) -> list[Hit]:
        """k best chunks by FTS5's BM25 over the question's words (any of them); score = -bm25."""
        match = fts_query(query)
        if not match:
            return []
        where, params = _filter_sql(filters)
        rows = self.db.execute(
            f"""WITH ranked AS (
                    SELECT rowid, bm25(chunk_fts) AS rank FROM chunk_fts WHERE chunk_fts MATCH ?
                    {"" if filters is None else "AND rowid IN (SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE " + where + ")"}
                    ORDER BY rank LIMIT ?)
                SELECT {_HIT_COLUMNS}, ranked.rank FROM ranked
                JOIN chunks c ON c.id = ranked.rowid JOIN documents d ON d.id = c.document_id
                ORDER BY ranked.rank""",
            [match, *params, k],
        ).fetchall()
        return [_hit(row[:-1], -row[-1], "bm25") for row in rows]

    # ------------------------------------------------------------------ health

    def stats(self) -> dict[str, int]:
        documents, chunks = self.db.execute(
            "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)"
        ).fetchone()
        return {"documents": documents, "chunks": chunks}

    def check(self) -> list[str]:
        """Consistency problems (empty when the index is sound): SQLite, FTS5, and chunk/vector/text agreement."""
        problems = []
        integrity = self.db.execute("PRAGMA integrity_check").fetchall()
        if integrity != [("ok",)]:
            problems.append(f"sqlite integrity_check: {integrity[:5]}")
        try:
            self.db.execute("INSERT INTO chunk_fts(chunk_fts) VALUES ('integrity-check')")
        except sqlean.DatabaseError as exc:
            problems.append(f"fts5 integrity-check: {exc}")
        for label, sql in (
            ("documents whose chunk_count differs from their chunks",
             "SELECT count(*) FROM documents d WHERE chunk_count != (SELECT count(*) FROM chunks WHERE document_id = d.id)"),
            ("chunks without a document",
             "SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"),
            ("chunks without a vector",
             "SELECT count(*) FROM chunks WHERE id NOT IN (SELECT rowid FROM chunk_vec)"),
            ("vectors without a chunk",
             "SELECT count(*) FROM chunk_vec WHERE rowid NOT IN (SELECT id FROM chunks)"),
            ("chunks without a full-text entry",
             "SELECT count(*) FROM chunks WHERE id NOT IN (SELECT rowid FROM chunk_fts)"),
            ("full-text entries without a chunk",
             "SELECT count(*) FROM chunk_fts WHERE rowid NOT IN (SELECT id FROM chunks)"),
        ):
            n = self.db.execute(sql).fetchone()[0]
            if n:
                problems.append(f"{n} {label}")
        return problems


def _hit(row: Sequence[object], score: float, method: str) -> Hit:
    chunk_id, text, source, kind, heading_path, unit, first, last, ordinal = row
    return Hit(
        text=str(text), source=str(source), score=float(score), method=method, kind=str(kind),
        heading_path=tuple(json.loads(str(heading_path))), locator_unit=str(unit), first_locator=int(first),  # type: ignore[arg-type]
        last_locator=int(last), ordinal=int(ordinal), chunk_id=int(chunk_id),  # type: ignore[arg-type]
    )


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

    IMMEDIATE takes the write lock up front (waiting up to the connection's timeout for another
    writer) instead of failing half-way when a read transaction tries to upgrade.
    """

    def __init__(self, db: sqlean.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
