"""The `alignkit rag` commands end to end on the shipped handbook: JSON schemas, abstention, evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.apps.rag.cli import rag_app
from alignkit.errors import DataError

CORPUS = Path(__file__).resolve().parents[3] / "src" / "alignkit" / "data" / "rag_corpus"
ABSENT = "How many moons does Jupiter have?"
runner = CliRunner()


def _run(*args: str) -> dict:
    result = runner.invoke(rag_app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory, make_tiny_model) -> Path:
    """The tiny model with 1024 positions: the shipped instructions alone take ~300 of its tiny-vocabulary tokens."""
    from transformers import AutoConfig

    out = make_tiny_model(tmp_path_factory.mktemp("gen") / "model")
    config = AutoConfig.from_pretrained(out)
    config.max_position_embeddings = 1024
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def handbook(tmp_path_factory, generator_dir):
    """(index, ingest JSON) for the handbook part of the shipped corpus, chunked in the tiny model's tokens."""
    docs = tmp_path_factory.mktemp("docs") / "handbook"
    shutil.copytree(CORPUS / "docs" / "handbook", docs)
    index = docs.parent / "rag.db"
    out = _run("ingest", str(docs), "--index", str(index), "--model", str(generator_dir), "--chunk-tokens", "256", "--json")
    return index, out


def test_ingest_json_schema_and_rerun(handbook, generator_dir):
    index, out = handbook
    assert set(out) == {"index", "added", "updated", "unchanged", "removed", "skipped", "chunks_written",
                        "chunks_removed", "embedded", "reused_vectors", "seconds"}
    assert len(out["added"]) == 12 and out["skipped"] == [] and out["chunks_written"] >= 12
    assert out["index"] == str(index.resolve())
    again = _run("ingest", str(index.parent / "handbook"), "--index", str(index), "--model", str(generator_dir), "--json")
    assert len(again["unchanged"]) == 12 and again["added"] == again["updated"] == [] and again["chunks_written"] == 0


def test_query_prints_ranked_chunks_as_json(handbook):
    index, _ = handbook
    rows = _run("query", "--index", str(index), "How long do I have to hand in receipts?", "--k", "3", "--json")
    assert [r["rank"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"rank", "score", "source", "text", "citation", "method"}
    assert rows[0]["source"].endswith("handbook/expenses.md") and rows[0]["score"] >= rows[1]["score"]


def test_ask_json_schema_without_generation(handbook):
    index, _ = handbook
    out = _run("ask", "--index", str(index), "How long do I have to hand in receipts?", "--k", "3", "--no-generate", "--json")
    assert set(out) == {"question", "answer", "abstained", "relevance", "threshold", "citations", "retrieval"}
    assert out["abstained"] is False and out["answer"] is None and out["threshold"] == 0.30
    assert [c["n"] for c in out["citations"]] == [1, 2, 3]
    assert set(out["citations"][0]) == {"n", "source", "citation", "score", "cited"}
    assert out["citations"][0]["source"].endswith("handbook/expenses.md")
    assert [r["rank"] for r in out["retrieval"]] == [1, 2, 3]
    assert set(out["retrieval"][0]) == {"rank", "source", "citation", "score", "method", "text"}


@pytest.mark.parametrize("mode", ["hybrid", "dense"])
def test_abstains_below_threshold_without_calling_the_model(handbook, generator_dir, monkeypatch, mode):
    """Nothing in the handbook is about Jupiter: nearest-chunk cosine is far below 0.30."""
    import alignkit.models

    def must_not_generate(*args, **kwargs):
        raise AssertionError("the model was called for a question the index cannot answer")

    monkeypatch.setattr(alignkit.models, "generate", must_not_generate)
    index, _ = handbook
    out = _run("ask", "--index", str(index), ABSENT, "--mode", mode, "--model", str(generator_dir), "--json")
    assert out["abstained"] is True and out["citations"] == []
    assert out["relevance"] < out["threshold"] == 0.30
    assert out["answer"].startswith("I don't know")
    assert len(out["retrieval"]) == 4  # what was found is still shown
    # Lowering the threshold below the score lets the question through.
    low = _run("ask", "--index", str(index), ABSENT, "--mode", mode, "--min-score", "-1", "--no-generate", "--json")
    assert low["abstained"] is False


def test_ask_generates_with_citations(handbook, generator_dir):
    index, _ = handbook
    out = _run("ask", "--index", str(index), "How many paid vacation days do I get each year?", "--answer", "generate",
               "--model", str(generator_dir), "--max-new-tokens", "16", "--device", "cpu", "--json")
    assert out["abstained"] is False and isinstance(out["answer"], str)
    assert 1 <= len(out["citations"]) <= 4
    assert any(c["source"].endswith("handbook/vacation.md") for c in out["citations"])
    text = runner.invoke(rag_app, ["ask", "--index", str(index), "When is my trial period over?", "--answer", "generate", "--model",
                                   str(generator_dir), "--max-new-tokens", "8", "--device", "cpu"])
    assert text.exit_code == 0 and "Sources:" in text.stdout and "[1] " in text.stdout


def test_eval_json_schema_and_metrics(handbook, generator_dir, tmp_path):
    index, _ = handbook
    handbook_questions = [line for line in (CORPUS / "questions.jsonl").read_text().splitlines() if '"handbook/' in line]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(handbook_questions + [json.dumps({"question": ABSENT, "source": "handbook/astronomy.md", "answer": "95 moons"})]) + "\n")
    out = _run("eval", "--index", str(index), "--qa", str(qa), "--k", "5", "--json")
    assert set(out) == {"k", "mode", "metrics", "questions"} and out["k"] == 5
    metrics = out["metrics"]
    assert set(metrics) == {"questions", "hit_rate@5", "mrr", "recall@5", "abstained"}
    n = len(handbook_questions) + 1
    assert metrics["questions"] == n and metrics["abstained"] >= 1
    # The absent question must miss; on this corpus hybrid finds all but at most one of the rest.
    assert out["questions"][-1]["rank"] is None
    assert (n - 2) / n <= metrics["hit_rate@5"] <= (n - 1) / n
    assert 0 < metrics["mrr"] <= metrics["hit_rate@5"]
    gen = _run("eval", "--index", str(index), "--qa", str(qa), "--k", "2", "--generate", "--answer", "generate", "--model", str(generator_dir),
               "--max-new-tokens", "8", "--device", "cpu", "--json")
    assert {"answer_accuracy", "faithfulness"} <= set(gen["metrics"])
    assert {"answer", "answer_correct", "faithfulness", "unsupported"} <= set(gen["questions"][0])
    assert gen["questions"][-1]["abstained"] is True and gen["questions"][-1]["answer_correct"] is False


def test_quoted_answers_need_no_model_and_copy_a_passage_sentence(handbook, tmp_path, monkeypatch):
    """The default answer quotes: the sentence closest to the question, with its passage number, and no model loaded."""
    import alignkit.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("quoting must not load a language model")

    monkeypatch.setattr(alignkit.models, "load_model", must_not_load)
    index, _ = handbook
    out = _run("ask", "--index", str(index), "How long do I have to hand in receipts?", "--json")
    assert out["answer"] == "Submit receipts through Ledgerly within 30 days of purchase. [1]"
    assert len(out["citations"]) == 3 and out["citations"][0]["cited"] and out["citations"][0]["source"].endswith("expenses.md")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "How long do I have to hand in receipts?", "answer": "30 days"}) + "\n"
                  + json.dumps({"question": "Who pays for my home office furniture?", "answer": "600 euros"}) + "\n")
    report = _run("eval", "--index", str(index), "--qa", str(qa), "--k", "5", "--generate", "--passages", "1", "--json")
    assert report["metrics"]["answer_accuracy"] == 1.0 and report["metrics"]["faithfulness"] == 1.0
    bad = runner.invoke(rag_app, ["ask", "--index", str(index), "q?", "--answer", "guess"])
    assert bad.exit_code == 2 and "quote, quote-grammar, generate" in bad.output


def test_eval_reports_bad_qa_lines(handbook, tmp_path):
    index, _ = handbook
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "ok", "source": "handbook/sick.md"}\n{"question": 5, "answer": "x"}\n{oops\n')
    result = runner.invoke(rag_app, ["eval", "--index", str(index), "--qa", str(qa)])
    assert isinstance(result.exception, DataError)
    assert "line 2: 'question'" in str(result.exception) and "line 3: invalid JSON" in str(result.exception)


def test_ingest_with_a_chosen_embedder_directory(tmp_path, generator_dir):
    """--embedder takes any local sentence-transformers folder; the index records it and queries use it."""
    from alignkit.apps.rag import SqliteVecStore
    from alignkit.apps.rag.embed import default_model_dir

    folder = tmp_path / "my-embedder"
    shutil.copytree(default_model_dir(), folder)
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(CORPUS / "docs" / "handbook" / "expenses.md", docs / "expenses.md")
    index = tmp_path / "rag.db"
    out = _run("ingest", str(docs), "--index", str(index), "--model", str(generator_dir), "--embedder", str(folder), "--json")
    assert len(out["added"]) == 1
    store = SqliteVecStore(index)
    try:
        assert store.embedder_name == str(folder.resolve())
    finally:
        store.close()
    rows = _run("query", "--index", str(index), "How long do I have to hand in receipts?", "--mode", "dense", "--json")
    assert rows and rows[0]["source"].endswith("expenses.md")
