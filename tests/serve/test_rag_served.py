"""`alignkit rag ask --base-url` against a real server on 127.0.0.1 serving the tiny model: the window is
read from /v1/models, the prompt is budgeted by bytes, and the answer is the very reply the same model
gives in process to the same messages."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.serve.app import create_app

from .conftest import running

CORPUS = Path(__file__).resolve().parents[2] / "src" / "alignkit" / "data" / "rag_corpus"
QUESTION = "How many paid vacation days do I get each year?"


def _cli(*args):
    from alignkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_utf8_budget_bounds_a_byte_level_bpe_tokenizer(tiny):
    """Every byte-level BPE token covers at least one byte: the byte count is never below the token count
    (checked on ASCII, accented, CJK and emoji text), and trimming keeps whole characters."""
    from alignkit.apps.rag.answer import Utf8Budget

    _, tok = tiny
    budget = Utf8Budget()
    for text in ("Where is my order?", "Crème brûlée à la carte, naïve café", "注文はどこですか", "ok 👍🏽 thanks"):
        assert len(budget(text)["input_ids"]) >= len(tok(text, add_special_tokens=False)["input_ids"])
    ids = budget("café")["input_ids"]
    assert len(ids) == 5 and budget.decode(ids[:4]) == "caf" and budget.decode(ids) == "café"


@pytest.fixture(scope="module")
def index(tmp_path_factory, long_tiny_dir):
    docs = tmp_path_factory.mktemp("docs") / "handbook"
    shutil.copytree(CORPUS / "docs" / "handbook", docs)
    index = docs.parent / "rag.db"
    result = _cli("rag", "ingest", str(docs), "--index", str(index), "--model", str(long_tiny_dir),
                  "--chunk-tokens", "256", "--json")
    assert result.exit_code == 0, result.output
    return index


def test_rag_ask_through_a_served_model_equals_the_local_reply(index, long_tiny_dir):
    from alignkit.apps.agents.backends import LocalBackend, OpenAIBackend
    from alignkit.apps.rag.answer import SERVER_TEMPLATE_TOKENS, Utf8Budget, build_prompt, load_prompt, served_context_window
    from alignkit.apps.rag.retrieve import search
    from alignkit.models import load_model

    name = str(long_tiny_dir)
    model, tok = load_model(name, device="cpu")
    app = create_app(model, tok, served_name=name)
    ask = ["rag", "ask", "--index", str(index), QUESTION, "--model", name, "--max-new-tokens", "12", "--json"]
    with running(app) as url:
        window = served_context_window(OpenAIBackend(url, name))
        served = _cli(*ask, "--base-url", url)
        requests = app.state.worker.health()["requests"]
        tight = _cli(*ask, "--base-url", url, "--context-tokens", "1200")
        too_small = _cli(*ask, "--base-url", url, "--context-tokens", "300")
    assert window == 4096  # the model's max_position_embeddings, from /v1/models
    assert served.exit_code == 0, served.output
    assert requests == 1  # the answer came from the server
    out = json.loads(served.output.strip().splitlines()[-1])
    assert out["abstained"] is False and out["answer"] and len(out["citations"]) == 4
    # The same messages (same retrieval, same byte budget) answered in process by the same weights.
    hits = search(index, QUESTION, k=4, mode="hybrid")
    messages, passages, _ = build_prompt(QUESTION, hits, Utf8Budget(), window - 2 * SERVER_TEMPLATE_TOKENS, 12,
                                         load_prompt())
    local = LocalBackend.from_loaded(model, tok, name).chat(messages, max_tokens=12, temperature=0.0)
    assert out["answer"] == local.strip()
    assert [c["citation"] for c in out["citations"]] == [p.citation for p in passages]
    # A smaller window trims or drops passages so the byte bound fits; one too small is a clear error.
    assert tight.exit_code == 0, tight.output
    small = json.loads(tight.output.strip().splitlines()[-1])
    _, kept, count = build_prompt(QUESTION, hits, Utf8Budget(), 1200 - 2 * SERVER_TEMPLATE_TOKENS, 12, load_prompt())
    assert count + 12 <= 1200 - 2 * SERVER_TEMPLATE_TOKENS
    assert [c["citation"] for c in small["citations"]] == [p.citation for p in kept]
    assert sum(len(p.text.encode()) for p in kept) < sum(len(p.text.encode()) for p in passages)
    assert too_small.exit_code != 0 and "context window" in str(too_small.exception)


def test_rag_ask_with_no_server_says_so(index):
    from .conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    result = _cli("rag", "ask", "--index", str(index), QUESTION, "--base-url", url)
    assert result.exit_code != 0 and "is the server running?" in str(result.exception)
