"""Chat backends: OpenAIBackend against a real HTTP server on 127.0.0.1, LocalBackend on the tiny model."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alignkit.apps.agents.backends import BackendError, LocalBackend, OpenAIBackend, cut_at_stop

MESSAGES = [{"role": "user", "content": "Say hello."}]


class ChatCompletionsHandler(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/chat/completions server; it records every request it gets."""

    requests: list[dict] = []

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "body": body, "authorization": self.headers.get("Authorization")})
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "the model crashed"}')
            return
        if body["model"] == "slow":
            threading.Event().wait(2.0)
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        if body.get("stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": keep-alive comment\n\n")
            for piece in ["Hel", "lo", " there", "!"]:
                chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.write(b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
            self.wfile.write(b"data: [DONE]\n\n")
            return
        reply = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there!"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply.encode())


@pytest.fixture(scope="module")
def server_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletionsHandler)  # port 0: a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_chat_sends_the_request_and_reads_the_reply(server_url, monkeypatch):
    monkeypatch.setenv("TEST_ALIGNKIT_KEY", "sk-secret-123")
    ChatCompletionsHandler.requests.clear()
    backend = OpenAIBackend(server_url + "/", "tiny-chat", api_key_env="TEST_ALIGNKIT_KEY", timeout=5)
    text = backend.chat(MESSAGES, max_tokens=12, temperature=0.5, stop=["\n"])
    assert text == "Hello there!"
    [request] = ChatCompletionsHandler.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["authorization"] == "Bearer sk-secret-123"
    assert request["body"] == {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 12,
                               "temperature": 0.5, "stop": ["\n"]}
    assert "sk-secret" not in repr(backend)


def test_openai_without_key_sends_no_authorization(server_url, monkeypatch):
    monkeypatch.delenv("TEST_ALIGNKIT_KEY", raising=False)
    ChatCompletionsHandler.requests.clear()
    OpenAIBackend(server_url, "tiny-chat", api_key_env="TEST_ALIGNKIT_KEY").chat(MESSAGES, max_tokens=4, temperature=0)
    assert ChatCompletionsHandler.requests[0]["authorization"] is None
    assert "stop" not in ChatCompletionsHandler.requests[0]["body"]


def test_openai_stream_yields_the_sse_chunks(server_url, monkeypatch):
    monkeypatch.setenv("TEST_ALIGNKIT_KEY", "sk-secret-123")
    ChatCompletionsHandler.requests.clear()
    backend = OpenAIBackend(server_url, "tiny-chat", api_key_env="TEST_ALIGNKIT_KEY")
    pieces = list(backend.stream(MESSAGES, max_tokens=12, temperature=0.0))
    assert pieces == ["Hel", "lo", " there", "!"]
    [request] = ChatCompletionsHandler.requests
    assert request["body"]["stream"] is True
    assert request["authorization"] == "Bearer sk-secret-123"


def test_openai_http_error_is_clear_and_keeps_the_key_secret(server_url, monkeypatch, caplog):
    monkeypatch.setenv("TEST_ALIGNKIT_KEY", "sk-secret-123")
    backend = OpenAIBackend(server_url, "broken", api_key_env="TEST_ALIGNKIT_KEY")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BackendError) as info:
            backend.chat(MESSAGES, max_tokens=4, temperature=0)
        with pytest.raises(BackendError) as streamed:
            list(backend.stream(MESSAGES, max_tokens=4, temperature=0))
    for error in (info.value, streamed.value):
        assert "HTTP 500" in str(error) and "the model crashed" in str(error)
        assert f"{server_url}/chat/completions" in str(error)
        assert "sk-secret" not in str(error)
    assert "sk-secret" not in caplog.text


def test_openai_timeout_and_unreachable_server(server_url):
    with pytest.raises(BackendError, match="no response within 0.3 s"):
        OpenAIBackend(server_url, "slow", timeout=0.3).chat(MESSAGES, max_tokens=4, temperature=0)
    with pytest.raises(BackendError, match="cannot connect"):
        OpenAIBackend("http://127.0.0.1:9/v1", "m", timeout=2).chat(MESSAGES, max_tokens=4, temperature=0)


def test_cut_at_stop():
    assert cut_at_stop("a1b2c3", ["2", "1"]) == "a"
    assert cut_at_stop("abc", ["x"]) == "abc"
    assert cut_at_stop("abc", None) == "abc"


@pytest.fixture(scope="module")
def local(make_tiny_model, tmp_path_factory):
    """The tiny model with its weights redrawn at a larger scale: as initialised, its greedy reply is
    one whitespace token repeated, which would make the streaming checks vacuous."""
    import torch

    from alignkit.models import load_model

    model, tokenizer = load_model(str(make_tiny_model(tmp_path_factory.mktemp("tiny_chatty") / "model")),
                                  device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        # Only whole words (" fox") may win the argmax, so that the reply is readable text that the
        # streamer emits word by word (it holds back pieces until a space or the end).
        output = torch.nn.Parameter(model.get_input_embeddings().weight.clone())  # untied from the input
        for token_id in range(output.shape[0]):
            piece = tokenizer.decode([token_id])
            if not (piece.startswith(" ") and piece[1:].isalpha()):
                output[token_id] = 0.0  # logit 0, below the best of the random word logits
        model.lm_head.weight = output
    return LocalBackend.from_loaded(model, tokenizer, name="tiny")


def test_local_chat_and_stream_agree_with_greedy_decoding(local):
    text = local.chat(MESSAGES, max_tokens=24, temperature=0.0)
    assert isinstance(text, str) and len(text) > 10
    pieces = list(local.stream(MESSAGES, max_tokens=24, temperature=0.0))
    assert len(pieces) > 1  # it really streams
    assert "".join(pieces) == text


def test_local_stop_strings_cut_chat_and_stream(local):
    text = local.chat(MESSAGES, max_tokens=24, temperature=0.0)
    # A stop string taken from the middle of the greedy reply: both paths must end just before it.
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.find(stop)].strip()
    assert local.chat(MESSAGES, max_tokens=24, temperature=0.0, stop=[stop]) == expected
    assert "".join(local.stream(MESSAGES, max_tokens=24, temperature=0.0, stop=[stop])) == expected


def test_local_stream_can_be_abandoned(local):
    stream = local.stream(MESSAGES, max_tokens=24, temperature=0.0)
    first = next(stream)
    stream.close()  # the generation thread is stopped and joined, not left running
    assert first


def test_local_chat_reuses_the_prompt_prefix_and_replies_as_without_reuse(local):
    """An agent's next step is the previous prompt plus the reply and an observation: with prefix reuse
    only the new part is read, and the replies are those of a backend that re-reads every prompt."""
    fresh = LocalBackend.from_loaded(local.model, local.tokenizer, name="tiny", prefix_reuse=False)
    first = local.chat(MESSAGES, max_tokens=12, temperature=0.0)
    first_prompt = local.prompt_tokens
    assert fresh.chat(MESSAGES, max_tokens=12, temperature=0.0) == first
    following = MESSAGES + [{"role": "assistant", "content": first}, {"role": "user", "content": "Observation: 42"}]
    second = local.chat(following, max_tokens=12, temperature=0.0)
    # The first prompt at least (this model's replies start with a space, which the chat drops).
    assert first_prompt <= local.reused_tokens < local.prompt_tokens
    assert fresh.chat(following, max_tokens=12, temperature=0.0) == second
    assert fresh.reused_tokens == 0 and fresh.prompt_tokens == local.prompt_tokens
