"""Chat backends: one `chat`/`stream` interface over a local model or any OpenAI-compatible HTTP endpoint.

Agents, chain of thought and PAL talk to a `ChatBackend` only, so the same code runs on the embedded
model, a fine-tuned directory or a served model (vLLM, llama.cpp server, Ollama, OpenAI itself).

* `LocalBackend` runs a model loaded by `alignkit.models` (chat template, greedy or sampled decoding).
  `chat` decodes under a grammar when given one (`alignkit.models.constrained`), stops a row as
  soon as a stop string appears, and reuses the key/value cache of the longest prompt prefix it has
  already computed: an agent's prompt is the previous step's prompt plus the reply and observation,
  and every request starts with the same system prompt and worked examples, so most of a prompt
  is never run through the model twice. Streaming uses transformers' `TextIteratorStreamer` with
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


class StopStringsProcessor:
    """HF-style logits processor that ends a row (only EOS allowed) once its new text contains a stop string.

    Works in any decoding loop that takes logits processors, unlike a stopping criterion. Text
    before the first stop string is kept; a stop string at the very start does not count (see
    `cut_at_stop`).
    """

    def __init__(self, tokenizer, stop: list[str], eos_token_id: int):
        self.tokenizer, self.stop, self.eos = tokenizer, [s for s in stop if s], eos_token_id
        self.prompt_width: int | None = None

    def __call__(self, input_ids, scores):
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        for row in range(input_ids.shape[0]):
            text = self.tokenizer.decode(input_ids[row, self.prompt_width:], skip_special_tokens=True)
            if cut_at_stop(text, self.stop) != text:
                scores[row, :] = float("-inf")
                scores[row, self.eos] = 0.0
        return scores


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


class LocalBackend:
    """A model loaded by `alignkit.models.load_model`: 'embedded', an HF directory, an adapter directory, a .gguf."""

    def __init__(self, model_spec: str = "embedded", *, device: str = "auto"):
        from alignkit.models import load_model

        self.name = model_spec
        self.model, self.tokenizer = load_model(model_spec, device=device)
        self._cache, self._cached_ids = None, []

    @classmethod
    def from_loaded(cls, model, tokenizer, name: str = "local") -> LocalBackend:
        """Wrap a (model, tokenizer) pair that is already in memory."""
        backend = cls.__new__(cls)
        backend.name, backend.model, backend.tokenizer = name, model, tokenizer
        backend._cache, backend._cached_ids = None, []
        return backend

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float,
             stop: list[str] | None = None, grammar: str | None = None) -> str:
        """The reply to `messages`; under `grammar` (see alignkit.models.constrained) when given one."""
        import copy

        import torch
        from transformers import DynamicCache, GenerationConfig, LogitsProcessorList

        from alignkit.models.constrained import GrammarLogitsProcessor
        from alignkit.models.generation import eos_ids, render_prompt

        tokenizer, device = self.tokenizer, next(self.model.parameters()).device
        with_template = tokenizer.chat_template is not None
        ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=not with_template)["input_ids"]
        eos = eos_ids(tokenizer, self.model)
        processors = LogitsProcessorList()
        if grammar is not None:
            processors.append(GrammarLogitsProcessor(tokenizer, grammar, eos_token_ids=eos))
        if stop:
            processors.append(StopStringsProcessor(tokenizer, stop, eos[0]))
        # Prefix reuse: the cache holds the keys and values of `cached_ids`; keep the part shared with
        # this prompt (at least one prompt token must still go through the model).
        shared = 0
        for a, b in zip(self._cached_ids, ids[:-1]):
            if a != b:
                break
            shared += 1
        cache = DynamicCache()
        if shared:
            cache = copy.deepcopy(self._cache)
            surplus = cache.get_seq_length() - shared
            if surplus:
                cache.crop(-surplus)  # this transformers version takes the number of positions to drop
        sample = temperature > 0
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=sample, eos_token_id=eos,
                                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
                                  return_dict_in_generate=True,
                                  **({"temperature": temperature, "top_k": 0} if sample else {}))
        input_ids = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      past_key_values=cache, generation_config=config,
                                      logits_processor=processors)
        sequence = out.sequences[0].tolist()
        self._cache = out.past_key_values
        self._cached_ids = sequence[:self._cache.get_seq_length()]
        self.prompt_tokens, self.reused_tokens = len(ids), shared
        new = [t for t in sequence[len(ids):] if t not in eos]
        return cut_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop).strip()

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
