"""Ingest and search end to end: incremental updates, the embedding cache, filters, custom retrievers, atomic writes."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from alignkit.apps.rag import ChunkConfig, SearchFilter, SqliteVecStore, ingest, search
from alignkit.apps.rag.chunk import Chunk
from alignkit.apps.rag.store import RagIndexError, StoredDocument

CONFIG = ChunkConfig(max_tokens=64, overlap_tokens=8)


def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def docs(tmp_path):
    folder = tmp_path / "docs"
    _write(folder, "vpn.md", "# VPN\n\nConnect with `vpn up`. The gateway is vpn.example.org.\n\nTokens expire after 12 hours.")
    _write(folder, "expenses.md", "# Expenses\n\nSubmit receipts within 30 days of purchase.")
    _write(folder, "sub/holidays.txt", "Everyone gets 25 vacation days a year.")
    return folder


def test_incremental_ingest_adds_updates_removes_and_skips_unchanged(docs, tmp_path, minilm_tokenizer, embedder):
    index = tmp_path / "index.db"
    first = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    assert len(first.added) == 3 and not (first.updated or first.unchanged or first.removed or first.skipped)
    assert first.embedded == first.chunks_written > 0

    again = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    assert len(again.unchanged) == 3 and again.chunks_written == 0 and again.embedded == 0

    # Tuesday: one file edited (one paragraph), one deleted, one new.
    vpn = _write(docs, "vpn.md", "# VPN\n\nConnect with `vpn up`. The gateway is vpn.example.org.\n\nTokens expire after 8 hours.")
    (docs / "expenses.md").unlink()
    new = _write(docs, "sub/travel.md", "# Travel\n\nBook trains for trips under four hours.")
    tuesday = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    assert tuesday.updated == [vpn] and tuesday.added == [new]
    assert tuesday.removed == [str(docs / "expenses.md")]
    assert tuesday.unchanged == [str(docs / "sub" / "holidays.txt")]

    with SqliteVecStore(index) as store:
        assert store.check() == []
        assert sorted(d.source for d in store.documents()) == sorted([vpn, new, str(docs / "sub" / "holidays.txt")])
        texts = [t for (t,) in store.db.execute("SELECT text FROM chunks")]
    assert not any("30 days" in t for t in texts) and not any("12 hours" in t for t in texts)
    assert any("8 hours" in t for t in texts)
    assert search(index, "receipts purchase", k=5, mode="bm25") == []  # deleted file is gone from BM25
    top = search(index, "how long until my VPN token runs out?", k=1, embedder=embedder)[0]
    assert top.source == vpn and "8 hours" in top.text


def test_identical_text_is_not_embedded_again(tmp_path, minilm_tokenizer, embedder):
    folder = tmp_path / "docs"
    paragraphs = [f"Paragraph {i} explains step {i} of the deployment in some detail." for i in range(6)]
    _write(folder, "guide.md", "# Guide\n\n" + "\n\n".join(paragraphs))
    _write(folder, "copy.md", "# Guide\n\n" + "\n\n".join(paragraphs))  # a duplicate file
    index = tmp_path / "index.db"
    config = ChunkConfig(max_tokens=20, overlap_tokens=0)  # one paragraph per chunk
    first = ingest([folder], index, minilm_tokenizer, embedder=embedder, config=config)
    assert first.chunks_written == 12 and first.embedded == 6 and first.reused_vectors == 6

    paragraphs[3] = "Paragraph 3 now says something entirely different about rollbacks."
    _write(folder, "guide.md", "# Guide\n\n" + "\n\n".join(paragraphs))
    second = ingest([folder], index, minilm_tokenizer, embedder=embedder, config=config)
    assert second.updated == [str(folder / "guide.md")]
    assert second.chunks_written == 6 and second.embedded == 1 and second.reused_vectors == 5


def test_changed_chunk_settings_rebuild_chunks(docs, tmp_path, minilm_tokenizer, embedder):
    index = tmp_path / "index.db"
    ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    rebuilt = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=ChunkConfig(max_tokens=32, overlap_tokens=4))
    assert len(rebuilt.updated) == 3


def test_bad_inputs_are_reported_and_the_rest_is_ingested(tmp_path, minilm_tokenizer, embedder):
    folder = tmp_path / "docs"
    good = _write(folder, "good.md", "# Good\n\nThe cafeteria opens at eight.")
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (folder / "empty.md").write_text("", encoding="utf-8")
    _write(folder, "rows.csv", "city,population\nOslo,709000\nBergen,291000,extra\n")
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE orders (id INTEGER, customer TEXT)")
        connection.execute("INSERT INTO orders VALUES (17, 'Ada Lovelace')")
    report = ingest(
        [folder, f"sqlite:///{db}?table=orders", f"sqlite:///{db}?table=missing", tmp_path / "nowhere"],
        tmp_path / "index.db", minilm_tokenizer, embedder=embedder, config=CONFIG,
    )
    assert sorted(report.added) == sorted([good, str(folder / "latin1.txt"), str(folder / "rows.csv"),
                                           f"sqlite:///{db}?table=orders"])
    assert report.decoded == [(str(folder / "latin1.txt"), "cp1252")]
    assert f"read {folder / 'latin1.txt'} as cp1252 (not UTF-8" in report.summary()
    reasons = {s.source.rsplit("/", 1)[-1] + (f"@{s.location}" if s.location else ""): s.reason for s in report.skipped}
    assert reasons == {
        "empty.md": "empty document: no text after extraction",
        "rows.csv@line 3": "broken CSV row: expected 2 fields like the header, got 3",
        "shop.db?table=missing": "no table 'missing' in shop.db; tables: orders",
        "nowhere": "not found: no such file or folder",
    }
    assert "skipped" in report.summary() and "empty.md" in report.summary()
    hit = search(tmp_path / "index.db", "Ada Lovelace", k=1, mode="bm25")[0]
    assert hit.text == "orders\nid: 17; customer: Ada Lovelace" and hit.citation.endswith("(row 1)")


def test_a_file_that_becomes_unreadable_leaves_the_index(docs, tmp_path, minilm_tokenizer, embedder):
    index = tmp_path / "index.db"
    ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    (docs / "expenses.md").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 binary")
    report = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    assert report.removed == [str(docs / "expenses.md")] and report.skipped[0].reason.startswith("binary file")
    # A folder that vanished (an unmounted drive) keeps what was indexed from it.
    moved = tmp_path / "moved"
    docs.rename(moved)
    gone = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    assert gone.removed == [] and "its 2 indexed documents were kept" in gone.skipped[0].reason


def test_filters_modes_citations_and_custom_retrievers(docs, tmp_path, minilm_tokenizer, embedder):
    index = tmp_path / "index.db"
    ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    query = "how many vacation days do I get?"
    assert search(index, query, k=1, embedder=embedder)[0].source.endswith("holidays.txt")
    only_md = search(index, query, k=5, filters=SearchFilter(kinds=("markdown",)), embedder=embedder)
    assert only_md and all(h.kind == "markdown" for h in only_md)
    in_sub = search(index, "gateway", k=5, mode="bm25", filters=SearchFilter(source_prefix=str(docs / "sub")))
    assert in_sub == []
    dense = search(index, query, k=2, mode="dense", filters=SearchFilter(source_prefix=str(docs / "vpn")), embedder=embedder)
    assert [h.source for h in dense] == [str(docs / "vpn.md")] and dense[0].method == "dense"
    assert dense[0].citation == f"{docs / 'vpn.md'} > VPN (lines 3-5)"

    def wiki(question: str) -> list[str]:
        return ["Vacation days can be bought: up to 5 extra days a year."]

    fused = search(index, query, k=3, embedder=embedder, retrievers={"wiki": wiki})
    assert {h.method for h in fused} == {"hybrid", "custom:wiki"}
    custom = next(h for h in fused if h.method == "custom:wiki")
    assert custom.source == "custom:wiki" and custom.chunk_id is None

    reranked = search(index, query, k=2, embedder=embedder, rerank=lambda q, hits: sorted(hits, key=lambda h: len(h.text)))
    assert len(reranked) == 2 and len(reranked[0].text) <= len(reranked[1].text)
    with pytest.raises(ValueError, match="mode"):
        search(index, query, mode="sparse")


def test_index_refuses_another_embedding_model(docs, tmp_path, minilm_tokenizer, embedder):
    index = tmp_path / "index.db"
    ingest([docs], index, minilm_tokenizer, embedder=embedder, config=CONFIG)
    with pytest.raises(RagIndexError, match="built with the embedding model 'all-MiniLM-L6-v2'"):
        SqliteVecStore(index, embedder_name="other-model", dim=384)
    with pytest.raises(RagIndexError, match="no RAG index"):
        search(tmp_path / "missing.db", "x", mode="bm25")
    (tmp_path / "notes.db").write_text("not a database", encoding="utf-8")
    with pytest.raises(RagIndexError, match="is not a RAG index"):
        search(tmp_path / "notes.db", "x", mode="bm25")
    with sqlite3.connect(tmp_path / "shop.db") as db:
        db.execute("CREATE TABLE orders (id INTEGER)")
    with pytest.raises(RagIndexError, match="not a RAG index: choose a new file"):
        ingest([docs], tmp_path / "shop.db", minilm_tokenizer, embedder=embedder)
    with sqlite3.connect(tmp_path / "shop.db") as db:
        assert [name for (name,) in db.execute("SELECT name FROM sqlite_master")] == ["orders"]


def test_a_failed_write_changes_nothing(tmp_path):
    """A group of documents is one transaction: a bad vector in the second document rolls back the first too."""
    store = SqliteVecStore(tmp_path / "index.db", embedder_name="test", dim=4)
    chunk = Chunk("alpha beta", (), 0, 1, 1, 2)
    doc = StoredDocument("a.md", "root", "markdown", "h1", "sig", "line", 0)
    store.upsert([(doc, [chunk], np.ones((1, 4), np.float32))])
    doc_b = StoredDocument("b.md", "root", "markdown", "h2", "sig", "line", 0)
    changed_a = StoredDocument("a.md", "root", "markdown", "h3", "sig", "line", 0)
    with pytest.raises(Exception, match="[Dd]imension"):
        store.upsert([(changed_a, [Chunk("gamma", (), 0, 1, 1, 1)], np.ones((1, 4), np.float32)),
                      (doc_b, [chunk], np.ones((1, 3), np.float32))])
    assert [d.content_hash for d in store.documents()] == ["h1"]
    assert [h.text for h in store.bm25_search("alpha gamma", 5)] == ["alpha beta"]
    assert store.check() == []
    store.close()


def test_any_local_sentence_transformers_folder_can_embed(tmp_path, embedder):
    from alignkit.apps.rag.embed import Embedder, default_model_dir
    from alignkit.errors import ModelLoadError

    local = Embedder(default_model_dir(), batch_size=2)
    assert local.name == str(default_model_dir().resolve()) and local.dim == 384
    texts = ["a cat on a mat", "a feline resting on a rug", "quarterly tax filing deadline"]
    vectors = local.encode(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, embedder.encode(texts), atol=1e-5)  # same weights, same vectors
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.4 > similarity[0, 2]  # real embeddings: paraphrases are close
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a sentence-transformers model folder"):
        Embedder(tmp_path / "empty")


def test_cli_names_the_guessed_encoding_and_exits_3_for_a_damaged_source(tmp_path, tiny_model_dir):
    """`rag ingest` as a user runs it: the Latin-1 file is read (its guessed encoding named), the CSV
    rows around a quote that never closes are indexed, the binary file is named, and the exit code
    is 3 because something was skipped."""
    from typer.testing import CliRunner

    from alignkit.cli import app

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "old.txt").write_bytes("Résumé of the café meeting: we open at eight.".encode("latin-1"))
    (folder / "cities.csv").write_text('city,note\nOslo,cold\nBergen,"rainy\nTromso,dark\n', encoding="utf-8")
    (folder / "logo.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    result = CliRunner().invoke(app, ["rag", "ingest", str(folder), "--index", str(tmp_path / "index.db"),
                                      "--model", str(tiny_model_dir)])
    assert result.exit_code == 3, result.output
    assert f"read {folder / 'old.txt'} as cp1252 (not UTF-8" in result.output
    assert f"skipped {folder / 'cities.csv'} (line 3): broken CSV row" in result.output
    assert f"skipped {folder / 'logo.txt'}: binary file" in result.output
    hits = search(tmp_path / "index.db", "Tromso dark", k=3, mode="bm25")
    assert any("city: Tromso; note: dark" in h.text for h in hits)
