"""An ingest killed with SIGKILL mid-way leaves a consistent, searchable index, and the next ingest completes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import sqlean

from alignkit.apps.rag import ChunkConfig, RagIndexError, SqliteVecStore, ingest, search

SRC = Path(__file__).resolve().parents[3] / "src"
DOCS = 400

CHILD = textwrap.dedent(
    """
    import sys
    from transformers import AutoTokenizer
    from alignkit.apps.rag import ChunkConfig, ingest
    from alignkit.apps.rag.embed import default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    print("ready", flush=True)
    # Small groups: many commits, so the kill lands between or inside them.
    ingest([sys.argv[1]], sys.argv[2], tokenizer, config=ChunkConfig(48, 8), batch_chunks=4)
    print("finished", flush=True)
    """
)


def _committed(index: Path) -> int:
    if not index.exists():
        return 0
    try:
        with SqliteVecStore(index) as store:
            return store.stats()["documents"]
    except (RagIndexError, sqlean.Error):  # the child may be creating the schema right now
        return 0


def test_sigkill_mid_ingest_leaves_a_consistent_index(tmp_path, minilm_tokenizer, embedder):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(DOCS):
        (docs / f"note{i:03}.md").write_text(
            f"# Note {i}\n\nMaintenance window {i} starts at {i % 24:02}:00 on rack R{i}.\n\n"
            f"Owner of rack R{i} is team {i % 7}. Escalate to pager {1000 + i}.",
            encoding="utf-8",
        )
    index = tmp_path / "index.db"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(docs), str(index)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        while _committed(index) < 20 and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    with SqliteVecStore(index) as store:
        assert store.check() == []
        committed = store.stats()["documents"]
    assert 20 <= committed < DOCS, "the kill should land mid-ingest"
    assert search(index, "pager", k=3, mode="bm25")

    report = ingest([docs], index, minilm_tokenizer, embedder=embedder, config=ChunkConfig(48, 8))
    assert len(report.unchanged) == committed and len(report.added) == DOCS - committed
    with SqliteVecStore(index) as store:
        assert store.check() == []
        assert store.stats()["documents"] == DOCS
    top = search(index, "who owns rack R377?", k=1, mode="bm25")[0]
    assert top.source.endswith("note377.md")
