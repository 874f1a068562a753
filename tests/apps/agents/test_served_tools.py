"""`agent run --base-url` against alignkit serve (the tiny model, a real server on 127.0.0.1): the step goes
through the server's tool calling (a call comes back as tool_calls, the tool runs, the trace says so), and
against a server that refuses tools the agent falls back to the text protocol once and stays there.

The tiny model's answers are nonsense; these tests check the protocol, not the answer."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ...serve.conftest import long_tiny_dir, running  # noqa: F401  (long_tiny_dir is a fixture)


@pytest.fixture(scope="module")
def served_tiny(long_tiny_dir):
    from alignkit.models import load_model

    model, tok = load_model(str(long_tiny_dir), device="cpu")
    return str(long_tiny_dir), model, tok


# A tool whose arguments the random tiny model can finish within a few tokens (the calculator's free-text
# expression it writes until max_tokens cuts the call).
LOOKUP_TOOL = '''
from typing import Literal

from alignkit.apps.agents.tools import tool

@tool
def lookup(table: Literal["rates", "sizes"]) -> str:
    """Look up a table.

    Args:
        table: Which table.
    """
    return f"table {table}: 12.5% = 0.125"
'''


def _agent(url: str, name: str, trace, *extra: str):
    from alignkit.cli import app

    tools = trace.parent / "lookup_tools.py"
    tools.write_text(LOOKUP_TOOL)
    args = ["agent", "run", "What is 12.5% of 368?", "--tools", str(tools), "--model", name, "--base-url", url,
            "--max-steps", "2", "--max-tokens", "120", "--trace", str(trace), "--json", *extra]
    result = CliRunner().invoke(app, args)
    return result, json.loads(result.output.strip().splitlines()[-1])


def test_agent_over_serve_calls_the_tool_through_tool_calls(served_tiny, tmp_path):
    from alignkit.serve.app import create_app

    name, model, tok = served_tiny
    app = create_app(model, tok, served_name=name)
    bodies = []

    @app.middleware("http")
    async def record(request, call_next):  # test-only: keeps what the agent sent
        bodies.append(json.loads(await request.body() or b"{}"))
        return await call_next(request)

    trace = tmp_path / "run.jsonl"
    with running(app) as url:
        result, out = _agent(url, name, trace)
    first = out["steps"][0]
    assert first["protocol"] == "tool_calls", result.output
    assert first["tool"] == "lookup" and first["output"].startswith("Action: lookup\nAction Input: {")
    assert first["error_kind"] is None and first["tool_latency_s"] is not None  # the tool ran...
    assert first["observation"] in ("table rates: 12.5% = 0.125", "table sizes: 12.5% = 0.125")  # ...and said this
    assert bodies[0]["tool_choice"] == "required" and bodies[0]["tools"][0]["function"]["name"] == "lookup"
    assert all(s["protocol"] in ("tool_calls", "tools_text") for s in out["steps"])
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["protocol"] for r in records if r["event"] == "step"] == [s["protocol"] for s in out["steps"]]


def test_agent_falls_back_to_text_when_the_server_refuses_tools(served_tiny, tmp_path):
    from fastapi.responses import JSONResponse

    from alignkit.serve.app import create_app

    name, model, tok = served_tiny
    app = create_app(model, tok, served_name=name)
    refused = []

    @app.middleware("http")
    async def no_tools(request, call_next):  # test double: a server without tool calling
        if "tools" in json.loads(await request.body() or b"{}"):
            refused.append(1)
            return JSONResponse({"error": {"message": "tools are not supported", "type": "invalid_request_error",
                                           "param": "tools", "code": None}}, status_code=400)
        return await call_next(request)

    with running(app) as url:
        result, out = _agent(url, name, tmp_path / "run.jsonl")
    steps = out["steps"]
    assert len(steps) == 2 and refused == [1], result.output  # refused once, then not asked again
    assert [s["protocol"] for s in steps] == ["text", "text"]
    assert "refused tool calling" in steps[0]["protocol_note"] and "HTTP 400" in steps[0]["protocol_note"]
    assert steps[1]["protocol_note"] is None
    from alignkit.apps.agents.trace import read_trace, render_trace

    text = render_trace(read_trace(tmp_path / "run.jsonl"))  # `agent trace` shows why the protocol changed
    assert "; via text" in text and text.count("note: the server refused tool calling") == 1
