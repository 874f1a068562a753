"""`alignkit serve`: one model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from typing import Optional

import typer

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit (base + adapter), a merged or quantized directory, or a .gguf file")


def serve(
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key_env: Optional[str] = typer.Option(None, help="Name of an environment variable holding the API key; "
                                                        "clients must then send `Authorization: Bearer KEY`. "
                                                        "No key: anyone who reaches the port may use it."),
    served_model_name: Optional[str] = typer.Option(None, help="The name clients put in `model` (default: the "
                                                               "--model value as given)."),
    max_batch: int = typer.Option(32, help="Most completions decoded together in one batch."),
    max_queue: int = typer.Option(64, help="Most requests waiting for a batch; past it the server answers 503 "
                                           "with Retry-After."),
    max_tokens: int = typer.Option(256, help="max_tokens of requests that give none (never past the context window)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
):
    """Serve a model with an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Concurrent requests are batched onto the model; streaming uses server-sent events. Any OpenAI
    client works, and so does `alignkit pal/agent run --base-url http://HOST:PORT/v1 --model NAME`.
    Structured output: `response_format` (json_object, json_schema) and `tools` with `tool_choice`
    are decoded under a grammar, so a finished reply parses and validates; calls come back as
    `message.tool_calls`.

    Example: alignkit serve --model runs/ppo1/final --port 8000
    Then:    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json'
             -d '{"model": "runs/ppo1/final", "messages": [{"role": "user", "content": "Hi"}]}'
    """
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning, a 2-thread
    # server's decode threads fight its own event loop and HTTP threads for the cores: on a busy
    # 2-core machine, alternating runs of bench_serve.py --quick served 6.6 and 10.5 requests/s
    # one at a time with PASSIVE, 1.2 and 1.6 with OMP_WAIT_POLICY=ACTIVE.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn

    from alignkit.errors import AlignkitError
    from alignkit.models import load_model
    from alignkit.serve.app import create_app

    if max_batch < 1 or max_queue < 1 or max_tokens < 1:
        raise typer.BadParameter("--max-batch, --max-queue and --max-tokens must be at least 1")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise AlignkitError(f"--api-key-env {api_key_env}: that environment variable is not set or empty")
    loaded, tokenizer = load_model(model, device=device)
    name = served_model_name or model
    app = create_app(loaded, tokenizer, served_name=name, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue, default_max_tokens=max_tokens)
    print(f"serving '{name}' on http://{host}:{port}/v1 (batch {max_batch}, queue {max_queue}"
          f"{', API key required' if api_key else ', no API key'})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")


def register_serve(app: typer.Typer) -> None:
    app.command("serve")(serve)
