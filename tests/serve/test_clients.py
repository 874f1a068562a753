"""The server under load and behind alignkit's own clients: 32 concurrent streams each complete with the
right number of tokens and get batched; `alignkit pal` and `alignkit agent run` with --base-url see
exactly the replies the same model gives them in process."""

import asyncio
import json

from typer.testing import CliRunner

from alignkit.serve.app import create_app

from .conftest import running


def test_32_concurrent_streams_complete_with_the_right_token_counts(tiny):
    from openai import AsyncOpenAI

    model, tok = tiny
    app = create_app(model, tok, served_name="tiny", max_batch=32, max_queue=64)
    clients, rounds = 32, 3

    async def one_client(client, c):
        got = []
        for j in range(rounds):
            want = 3 + (c * rounds + j) % 8
            stream = await client.completions.create(
                model="tiny", prompt=f"Order {c} question {j}: where is it?", max_tokens=want, temperature=0.7,
                seed=c * 10 + j, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            tokens, finish, usage = 0, None, None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.finish_reason is None:
                        tokens += 1  # one chunk per generated token
                    else:
                        finish = choice.finish_reason
            got.append((want, tokens, usage.completion_tokens, finish))
        return got

    async def load(url):
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        results = await asyncio.gather(*(one_client(client, c) for c in range(clients)))
        await client.close()
        return [r for rs in results for r in rs]

    with running(app) as url:
        results = asyncio.run(load(url))
    assert len(results) == clients * rounds
    assert all(want == tokens == used and finish == "length" for want, tokens, used, finish in results), results
    stats = app.state.worker.health()
    assert stats["requests"] == clients * rounds and stats["rejected"] == 0
    assert stats["largest_batch"] >= 8 and stats["batches"] < clients * rounds  # batched, not one at a time


def _cli(*args):
    from alignkit.cli import app

    return CliRunner().invoke(app, list(args))


def test_pal_and_agent_over_http_see_the_same_replies_as_in_process(long_tiny_dir):
    from alignkit.models import load_model

    name = str(long_tiny_dir)
    model, tok = load_model(name, device="cpu")
    app = create_app(model, tok, served_name=name)
    pal_args = ["pal", "What is 17 * 23?", "--model", name, "--max-tokens", "24", "--max-retries", "0",
                "--json", "--device", "cpu"]
    agent_args = ["agent", "run", "What is 12.5% of 368?", "--tools", "builtin", "--model", name, "--max-steps", "2",
                  "--max-tokens", "24", "--json", "--device", "cpu", "--free"]
    local_pal = _cli(*pal_args)
    with running(app) as url:
        served_pal, served_agent = _cli(*pal_args, "--base-url", url), _cli(*agent_args, "--base-url", url)
        requests = app.state.worker.health()["requests"]
    assert requests >= 2  # both commands went through the server
    assert local_pal.exit_code == served_pal.exit_code, served_pal.output
    pal_local, pal_served = (json.loads(r.output.strip().splitlines()[-1]) for r in (local_pal, served_pal))
    assert [a["reply"] for a in pal_served["attempts"]] == [a["reply"] for a in pal_local["attempts"]]
    assert pal_served["attempts"][0]["reply"]  # the tiny model said something, and the same thing both ways

    # With --free, a served model gets the text protocol (without it, the server's tool calling: see
    # tests/apps/agents). The same text protocol run in process must see the very replies the server gave.
    from alignkit.apps.agents.agent_cli import load_tools
    from alignkit.apps.agents.backends import LocalBackend
    from alignkit.apps.agents.react import run_agent

    local_agent = run_agent(LocalBackend.from_loaded(model, tok, name), load_tools("builtin"), "What is 12.5% of 368?",
                            max_steps=2, max_tokens=24, constrained=False).to_dict()
    agent_served = json.loads(served_agent.output.strip().splitlines()[-1])
    assert [s["output"] for s in agent_served["steps"]] == [s["output"] for s in local_agent["steps"]]
    assert agent_served["status"] == local_agent["status"] and len(agent_served["steps"]) == 2


def test_alignkit_serve_command(tiny_model_dir, tmp_path):
    """The real command in its own process: serves the model under its --model name, requires the key
    from --api-key-env and never prints it; an unset key variable is refused before loading."""
    import os
    import subprocess
    import sys
    import time

    import httpx

    from .conftest import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "SERVE_TEST_KEY": "sk-never-print-me"}
    bad = subprocess.run([sys.executable, "-m", "alignkit.cli", "serve", "--model", str(tiny_model_dir),
                          "--api-key-env", "NO_SUCH_VARIABLE_SET"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "NO_SUCH_VARIABLE_SET" in bad.stderr
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "serve", "--model", str(tiny_model_dir),
                                 "--port", str(port), "--api-key-env", "SERVE_TEST_KEY", "--max-tokens", "4"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.3)
        headers = {"Authorization": "Bearer sk-never-print-me"}
        body = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(f"{base}/v1/chat/completions", json=body).status_code == 401
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "POST /v1/chat/completions" in text and "sk-never-print-me" not in text


def test_serves_packed_int4_and_gguf_exports(tiny, tmp_path, monkeypatch):
    """--model takes a quantized directory or a .gguf as well: each served greedy completion equals the
    same loaded model's greedy completion in process."""
    import httpx

    from alignkit.compress.quantize import quantize_model, save_quantized
    from alignkit.export.to_gguf import export_gguf
    from alignkit.models import generate, load_model

    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))
    model, tok = tiny
    q4 = save_quantized(quantize_model(model, "int4-weight", 32), tok, tmp_path / "q4", {"method": "int4-weight"})
    gguf = tmp_path / "tiny-q8.gguf"
    export_gguf(str(tmp_path / "q4"), gguf, quant="q8_0", progress=False)
    for spec in (str(q4), str(gguf)):
        served, served_tok = load_model(spec, device="cpu")
        want = generate(served, served_tok, ["Hello there"], max_new_tokens=6, chat=False).tokens[0]
        with running(create_app(served, served_tok, served_name="m")) as url:
            r = httpx.post(f"{url}/completions", json={"model": "m", "prompt": "Hello there", "max_tokens": 6,
                                                       "temperature": 0}, timeout=60).json()
        assert r["choices"][0]["text"] == served_tok.decode(want, skip_special_tokens=True)
        assert r["usage"]["completion_tokens"] == len(want)
