"""Chat backends: one `chat`/`stream` interface over a local model or any OpenAI-compatible HTTP endpoint.

Agents, chain of thought and PAL talk to a `ChatBackend` only, so the same code runs on the embedded
model, a fine-tuned directory or a served model (vLLM, llama.cpp server, Ollama, OpenAI itself).

* `LocalBackend` runs a model loaded by `alignkit.models` (chat template, greedy or sampled decoding).
  `chat` decodes under a grammar when given one (`alignkit.models.constrained`), stops as soon as
  a stop string appears, and reuses the key/value cache of the longest prompt prefix it has
  already computed (`alignkit.models.prefix_cache`, on the rollout engine's weights): an agent's
  prompt is the previous step's prompt plus the reply and observation, and every request starts
  with the same system prompt and worked examples, so most of a prompt is never run through the
  model twice (`prefix_reuse=False` re-reads it all, to measure the difference). Streaming uses transformers' `TextIteratorStreamer` with
  generation on a background thread.
* `OpenAIBackend` POSTs to `{base_url}/chat/completions`; with streaming it reads the server-sent
  events (`data: {...}` lines, ending with `data: [DONE]`). `chat_tools` sends OpenAI `tools` and
  `tool_choice` and returns the reply's first tool call, if any; a server that refuses tools
  (HTTP 400 or 422) raises `ToolsRefused`, and the backend remembers it (`tool_calling` False) so
  that its callers can fall back to a text protocol. The API key is read from an environment
  variable at each request and only ever sent in the Authorization header: never stored, printed
  or put into an error message.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Iterator, Protocol

import httpx

from alignkit.errors import AlignkitError


class BackendError(AlignkitError):
    """A backend could not produce a reply: HTTP error, timeout, unreachable server, malformed answer."""


class ToolsRefused(BackendError):
    """The server answered a request carrying `tools` with 400 or 422: it has no (usable) tool calling."""


class ChatBackend(Protocol):
    """Anything that answers a list of chat messages [{"role", "content"}, ...] with text."""

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float,
             stop: list[str] | None = None) -> str: ...

    def stream(self, messages: list[dict], *, max_tokens: int, temperature: float,
               stop: list[str] | None = None) -> Iterator[str]: ...


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string after its first character.

    A reply that begins with a stop string (a small model imitating the turn that should follow,
    "Observation: ...") is not cut to nothing there: it is cut at the next occurrence, and the
    reader of the reply deals with the stray beginning.
    """
    body = text.lstrip()
    offset = len(text) - len(body)
    cut = min((i for i in (body.find(s, 1) for s in stop or [] if s) if i >= 0), default=len(body))
    return text[:offset + cut]


class _Cancelled(Exception):
    pass


def _cancellable_streamer(tokenizer):
    from transformers import TextIteratorStreamer

    class CancellableStreamer(TextIteratorStreamer):
        # Raising inside put() is the only way to end model.generate early from outside: the
        # consumer sets `cancelled` when a stop string appears or when it stops iterating.
        cancelled = False

        def put(self, value):
            if self.cancelled:
                raise _Cancelled
            super().put(value)

    return CancellableStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


DRAFT = 8
"""Tokens drafted per forward pass in a local model's greedy replies, looked up in the prompt and in the
backend's earlier replies (`alignkit.models.drafting`; the ShopBot, README: 3.1 against 7.1 s per
request over 10 requests); 0 turns drafting off."""


class LocalBackend:
    """A model loaded by `alignkit.models.load_model`: 'embedded', an HF directory, an adapter directory, a .gguf."""

    def __init__(self, model_spec: str = "embedded", *, device: str = "auto", prefix_reuse: bool = True,
                 draft: int = DRAFT):
        from alignkit.models import load_model

        model, tokenizer = load_model(model_spec, device=device)
        self._setup(model, tokenizer, model_spec, prefix_reuse, draft)

    @classmethod
    def from_loaded(cls, model, tokenizer, name: str = "local", *, prefix_reuse: bool = True,
                    draft: int = DRAFT) -> LocalBackend:
        """Wrap a (model, tokenizer) pair that is already in memory. draft: most tokens drafted per
        forward pass in greedy replies, looked up in the prompt and in earlier replies
        (`alignkit.models.drafting`; 0: none)."""
        backend = cls.__new__(cls)
        backend._setup(model, tokenizer, name, prefix_reuse, draft)
        return backend

    def _setup(self, model, tokenizer, name: str, prefix_reuse: bool, draft: int = DRAFT) -> None:
        from alignkit.models.prefix_cache import PrefixCachedDecoder

        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.decoder = PrefixCachedDecoder(model, tokenizer, reuse=prefix_reuse, draft=draft)
        self.prompt_tokens = self.reused_tokens = 0

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float,
             stop: list[str] | None = None, grammar: str | None = None) -> str:
        """The reply to `messages`; under `grammar` (see alignkit.models.constrained) when given one.

        Decoded by `self.decoder` (`alignkit.models.prefix_cache`): the part of the prompt shared with
        what was read before is not run through the model again (`reused_tokens` says how much was),
        and tokens the grammar forces are run together in one forward pass.
        """
        from alignkit.models.generation import render_prompt

        tokenizer = self.tokenizer
        with_template = tokenizer.chat_template is not None
        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=not with_template)["input_ids"]
        eos = self.decoder.eos
        stops = [s for s in stop or [] if s]

        def stopped(new: list[int]) -> bool:  # a stop string in the reply (not at its very start) ends it
            text = tokenizer.decode(new, skip_special_tokens=True)
            return cut_at_stop(text, stops) != text

        new = self.decoder.generate(ids, max_new_tokens=max_tokens, temperature=temperature,
                                    grammar=grammar, stop=stopped if stops else None)
        self.prompt_tokens, self.reused_tokens = self.decoder.prompt_tokens, self.decoder.reused_tokens
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        return cut_at_stop(text, stop).strip()

    def stream(self, messages: list[dict], *, max_tokens: int, temperature: float,
               stop: list[str] | None = None) -> Iterator[str]:
        """Yield pieces of the reply as they are decoded; with greedy decoding they join to `chat()`'s text.

        Leading and trailing whitespace is dropped, as `chat()` does, and text that could be the start
        of a stop string is held back until it is known not to be one.
        """
        from alignkit.models import generate

        streamer = _cancellable_streamer(self.tokenizer)
        failure: list[BaseException] = []

        def run():
            try:
                generate(self.model, self.tokenizer, [messages], max_new_tokens=max_tokens,
                         temperature=temperature, streamer=streamer)
            except _Cancelled:
                streamer.text_queue.put(streamer.stop_signal)
            except BaseException as e:  # handed to the consumer, which re-raises it
                failure.append(e)
                streamer.text_queue.put(streamer.stop_signal)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        stops = [s for s in stop or [] if s]
        hold = max((len(s) for s in stops), default=1) - 1
        text, emitted = "", 0
        try:
            for piece in streamer:
                text = (text + piece).lstrip()
                if stops and cut_at_stop(text, stops) != text:
                    streamer.cancelled = True
                    break
                safe = min(len(text.rstrip()), len(text) - hold)
                if safe > emitted:
                    yield text[emitted:safe]
                    emitted = safe
        finally:
            streamer.cancelled = True
            thread.join()
        if failure:
            raise failure[0]
        final = cut_at_stop(text, stops).strip()
        if len(final) > emitted:
            yield final[emitted:]


class OpenAIBackend:
    """Any OpenAI-compatible chat completions endpoint, e.g. base_url="http://127.0.0.1:8000/v1"."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.name = model
        self.api_key_env = api_key_env
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={self.base_url!r}, model={self.name!r}, api_key_env={self.api_key_env!r})"

    tool_calling: bool | None = None
    """None until a request with tools was made; then whether the server took it."""

    def _request(self, messages, max_tokens, temperature, stop, stream, **extra) -> tuple[str, dict, dict]:
        body = {"model": self.name, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature, **extra}
        if stop:
            body["stop"] = stop
        if stream:
            body["stream"] = True
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:  # servers on localhost often need no key; send none rather than an empty one
            headers["Authorization"] = f"Bearer {key}"
        return f"{self.base_url}/chat/completions", body, headers

    def _fail(self, url: str, e: Exception) -> BackendError:
        # Messages name the URL and the cause only: the request headers (the key) never appear.
        if isinstance(e, httpx.TimeoutException):
            return BackendError(f"POST {url}: no response within {self.timeout:g} s (timeout); is the "
                                "server overloaded, or is max_tokens too large?")
        if isinstance(e, httpx.ConnectError):
            return BackendError(f"POST {url}: cannot connect ({e}); is the server running at {self.base_url}?")
        return BackendError(f"POST {url}: {type(e).__name__}: {e}")

    @staticmethod
    def _http_error(url: str, status: int, body: str) -> BackendError:
        hint = {401: " (check the API key environment variable)", 404: " (check base_url and the model name)",
                429: " (rate limited: retry later)"}.get(status, "")
        return BackendError(f"POST {url}: HTTP {status}{hint}: {body.strip()[:500]}")

    def _post(self, messages, max_tokens, temperature, stop, **extra) -> dict:
        """The reply's first choice's message; ToolsRefused for a 400/422 to a request with tools."""
        url, body, headers = self._request(messages, max_tokens, temperature, stop, stream=False, **extra)
        try:
            response = httpx.post(url, json=body, headers=headers, timeout=self.timeout)
        except httpx.HTTPError as e:
            raise self._fail(url, e) from None
        if response.status_code in (400, 422) and "tools" in extra:
            self.tool_calling = False
            raise ToolsRefused(str(self._http_error(url, response.status_code, response.text)))
        if response.status_code >= 400:
            raise self._http_error(url, response.status_code, response.text)
        try:
            message = response.json()["choices"][0]["message"]
            message["content"] = message.get("content") or ""
            return message
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise BackendError(f"POST {url}: the reply is not a chat completion: {response.text[:500]}") from None

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float,
             stop: list[str] | None = None) -> str:
        return self._post(messages, max_tokens, temperature, stop)["content"]

    def chat_tools(self, messages: list[dict], tools: list[dict], *, tool_choice: str | dict, max_tokens: int,
                   temperature: float, stop: list[str] | None = None) -> tuple[str, dict | None]:
        """(the reply's text, its first tool call {"id", "name", "arguments": dict} or None), asking the
        server to use OpenAI tool calling with `tools` (OpenAI's function definitions)."""
        message = self._post(messages, max_tokens, temperature, stop, tools=tools, tool_choice=tool_choice)
        self.tool_calling = True
        calls = message.get("tool_calls") or []
        if not calls:
            return message["content"], None
        function = calls[0].get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            arguments = function.get("arguments")  # the agent reports arguments that do not parse to the model
        return message["content"], {"id": calls[0].get("id"), "name": function.get("name"), "arguments": arguments}

    def stream(self, messages: list[dict], *, max_tokens: int, temperature: float,
               stop: list[str] | None = None) -> Iterator[str]:
        url, body, headers = self._request(messages, max_tokens, temperature, stop, stream=True)
        try:
            with httpx.stream("POST", url, json=body, headers=headers, timeout=self.timeout) as response:
                if response.status_code >= 400:
                    raise self._http_error(url, response.status_code, response.read().decode("utf-8", "replace"))
                for line in response.iter_lines():
                    # SSE: only `data:` lines carry chunks; comments (":...") and blank lines are framing.
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:"):].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                        choices = chunk["choices"]
                    except (ValueError, KeyError, TypeError):
                        raise BackendError(f"POST {url}: malformed stream chunk: {data[:300]}") from None
                    if choices:  # some servers send a final usage chunk with no choices
                        piece = (choices[0].get("delta") or {}).get("content")
                        if piece:
                            yield piece
        except httpx.HTTPError as e:
            raise self._fail(url, e) from None
