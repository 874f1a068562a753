"""Benchmark the RAG index: ingest throughput, and query latency at 10k / 100k chunks against a numpy brute-force baseline.

Prints a table and appends one JSON line per figure to --out. Run:

    HF_HUB_OFFLINE=1 python bench/bench_rag.py [--sizes 10000 100000] [--queries 200] [--out runs/bench_rag.jsonl]

What is measured:
- ingest: real Markdown files through the whole pipeline (read, chunk with the MiniLM tokenizer,
  embed with all-MiniLM-L6-v2, write); also the embedding and store-write stages alone.
- query latency: synthetic chunks (Zipf-distributed words, random unit vectors of dimension 384)
  written through the store, then p50/p95 of dense (sqlite-vec vec0), BM25 (FTS5), hybrid
  (both + rank fusion, query embedding excluded and reported separately) and numpy exact search
  (one matrix-vector product over all vectors held in memory, then a top-k partition).
- recall@10 of vec0 against the numpy exact result. vec0 is itself an exact brute-force scan,
  not an approximate index, so this is expected to be 1.0 (ties aside); it is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Set before any Hugging Face import: nothing here may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from alignkit.apps.rag import ChunkConfig, SqliteVecStore, ingest
from alignkit.apps.rag.chunk import Chunk
from alignkit.apps.rag.embed import DEFAULT_MODEL_NAME, default_model_dir, load_embedder
from alignkit.apps.rag.retrieve import reciprocal_rank_fusion
from alignkit.apps.rag.store import StoredDocument

DIM = 384
K = 10


def record(out: Path, **figure: object) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(figure) + "\n")


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


def bench_ingest(docs: int, out: Path) -> None:
    from transformers import AutoTokenizer  # imported here: the query benchmarks do not need it

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(3000)] + ["the", "a", "to", "of", "service", "request", "deploy", "queue"]
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    embedder = load_embedder(DEFAULT_MODEL_NAME)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for d in range(docs):
            sections = []
            for s in range(3):
                paragraphs = [" ".join(rng.choice(words, size=rng.integers(30, 90))) + "." for _ in range(2)]
                sections.append(f"## Section {s}\n\n" + "\n\n".join(paragraphs))
            (folder / f"doc{d:05}.md").write_text(f"# Document {d}\n\n" + "\n\n".join(sections), encoding="utf-8")
        report = ingest([folder], Path(tmp) / "index.db", tokenizer, embedder=embedder, config=ChunkConfig(128, 16))
        rate = report.chunks_written / report.seconds
        print(f"ingest: {docs} docs -> {report.chunks_written} chunks in {report.seconds:.1f} s = {rate:.1f} chunks/s")
        record(out, figure="ingest_chunks_per_s", value=rate, docs=docs, chunks=report.chunks_written)

        with SqliteVecStore(Path(tmp) / "index.db") as store:
            texts = [t for (t,) in store.db.execute("SELECT text FROM chunks")]
        started = time.perf_counter()
        embedder.encode(texts)
        embed_rate = len(texts) / (time.perf_counter() - started)
        print(f"  embedding alone: {embed_rate:.1f} chunks/s (all-MiniLM-L6-v2, batch {embedder.batch_size}, CPU)")
        record(out, figure="embed_chunks_per_s", value=embed_rate)
        again = ingest([folder], Path(tmp) / "index.db", tokenizer, embedder=embedder, config=ChunkConfig(128, 16))
        print(f"  re-ingest, nothing changed: {len(again.unchanged)} files checked in {again.seconds:.2f} s")
        record(out, figure="reingest_unchanged_s", value=again.seconds, docs=docs)


def build_store(path: Path, size: int, rng: np.random.Generator, out: Path) -> np.ndarray:
    """Write `size` synthetic chunks (10 per document) through the store; return their vectors."""
    vocabulary = np.array([f"term{i}" for i in range(20000)])
    zipf = 1.0 / np.arange(1, len(vocabulary) + 1)
    zipf /= zipf.sum()
    vectors = rng.standard_normal((size, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = SqliteVecStore(path, embedder_name="synthetic", dim=DIM)
    started = time.perf_counter()
    per_doc, group = 10, []
    for start in range(0, size, per_doc):
        chunks = [
            Chunk(" ".join(rng.choice(vocabulary, size=60, p=zipf)), ("Synthetic",), i, i, i, 60)
            for i in range(min(per_doc, size - start))
        ]
        doc = StoredDocument(f"doc{start // per_doc}", "bench", "text", str(start), "sig", "line", 0)
        group.append((doc, chunks, vectors[start : start + len(chunks)]))
        if len(group) == 100:
            store.upsert(group)
            group = []
    store.upsert(group)
    seconds = time.perf_counter() - started
    store.close()
    print(f"store write: {size} chunks in {seconds:.1f} s = {size / seconds:.0f} chunks/s (FTS5 + vec0 + rows, one transaction per 1000)")
    record(out, figure="store_write_chunks_per_s", value=size / seconds, chunks=size)
    return vectors


def bench_queries(size: int, queries: int, out: Path) -> None:
    rng = np.random.default_rng(size)
    with tempfile.TemporaryDirectory() as tmp:
        vectors = build_store(Path(tmp) / "index.db", size, rng, out)
        store = SqliteVecStore(Path(tmp) / "index.db")
        # Queries near stored vectors, as real questions are near their answers.
        picks = rng.integers(0, size, queries)
        query_vectors = vectors[picks] + 0.5 * rng.standard_normal((queries, DIM)).astype(np.float32) / np.sqrt(DIM)
        query_vectors /= np.linalg.norm(query_vectors, axis=1, keepdims=True)
        query_texts = [" ".join(f"term{int(t)}" for t in rng.integers(0, 2000, 3)) for _ in range(queries)]

        timings: dict[str, list[float]] = {"dense (vec0)": [], "bm25 (fts5)": [], "hybrid": [], "numpy exact": []}
        recall_hits = 0
        for q, text in zip(query_vectors, query_texts):
            t0 = time.perf_counter()
            dense = store.dense_search(q, K)
            t1 = time.perf_counter()
            bm25 = store.bm25_search(text, K)
            t2 = time.perf_counter()
            reciprocal_rank_fusion([store.dense_search(q, 4 * K), store.bm25_search(text, 4 * K)])
            t3 = time.perf_counter()
            scores = vectors @ q
            top = np.argpartition(-scores, K)[:K]
            exact = top[np.argsort(-scores[top])]
            t4 = time.perf_counter()
            timings["dense (vec0)"].append(t1 - t0)
            timings["bm25 (fts5)"].append(t2 - t1)
            timings["hybrid"].append(t3 - t2)
            timings["numpy exact"].append(t4 - t3)
            # Chunk ids are assigned in insertion order from 1, so id - 1 indexes `vectors`.
            recall_hits += len({h.chunk_id - 1 for h in dense} & set(exact.tolist()))
            del bm25
        store.close()
    recall = recall_hits / (K * queries)
    print(f"queries at {size} chunks ({queries} queries, k={K}):")
    for name, seconds in timings.items():
        p50, p95 = percentiles(seconds)
        print(f"  {name:14} p50 {p50:8.2f} ms   p95 {p95:8.2f} ms")
        record(out, figure="query_latency_ms", method=name, chunks=size, p50=p50, p95=p95)
    print(f"  recall@{K} of vec0 against numpy exact search: {recall:.4f} (vec0 is exact brute force)")
    record(out, figure="recall_vs_exact", chunks=size, k=K, value=recall)


def bench_query_embedding(out: Path, queries: int = 50) -> None:
    embedder = load_embedder(DEFAULT_MODEL_NAME)
    embedder.encode(["warm up"])
    seconds = []
    for i in range(queries):
        started = time.perf_counter()
        embedder.encode([f"How do I configure retries for pipeline number {i}?"])
        seconds.append(time.perf_counter() - started)
    p50, p95 = percentiles(seconds)
    print(f"query embedding (MiniLM, one question): p50 {p50:.1f} ms  p95 {p95:.1f} ms")
    record(out, figure="query_embedding_ms", p50=p50, p95=p95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--ingest-docs", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_rag.jsonl"))
    args = parser.parse_args()
    # Latency figures mean little without the machine's state: other work on the cores slows
    # torch's threads much more than a single-threaded scan.
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, 1-minute load average {load:.2f} at start")
    record(args.out, figure="machine", cores=os.cpu_count(), load_average_1m=load)
    bench_ingest(args.ingest_docs, args.out)
    bench_query_embedding(args.out)
    for size in args.sizes:
        bench_queries(size, args.queries, args.out)
    print(f"figures appended to {args.out}")


if __name__ == "__main__":
    main()
