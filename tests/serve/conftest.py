"""A real server on 127.0.0.1: uvicorn in a thread of the test process, serving the tiny model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

SERVED = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free port until the block ends; yields the base URL (…/v1)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(tiny):
    """(base_url, app) of the tiny model served without an API key."""
    from alignkit.serve.app import create_app

    model, tok = tiny
    app = create_app(model, tok, served_name=SERVED, max_batch=32, max_queue=64, default_max_tokens=16)
    with running(app) as url:
        yield url, app


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def long_tiny_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a 4096-token window (the agents' few-shot prompts are longer than 256 tokens)
    and an untied random output layer: tied, it repeats the prompt's last token ("\n") forever, and a
    reply of newlines is empty once stripped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.max_position_embeddings = 4096
    model.config.tie_word_embeddings = False
    torch.manual_seed(0)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    out = tmp_path_factory.mktemp("long") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out
