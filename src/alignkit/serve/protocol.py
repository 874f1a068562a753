"""The OpenAI request bodies the server accepts, validated into one `Params` per request.

Supported: `max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `stop` (a string or up
to 4), `seed`, `n`, `stream` (+ `stream_options.include_usage`), `logprobs` (+ `top_logprobs` for
chat; an int for completions), `response_format`, `tools` and `tool_choice` (chat; see structured.py), and
two extensions other servers share: `top_k` and `ignore_eos`.
Fields OpenAI defines that change nothing here (`user`, `presence_penalty` 0, ...) are accepted and
ignored; a penalty or `logit_bias` that would change the output is refused rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alignkit.serve.errors import APIError, bad_request

MAX_N = 16
MAX_TOP_LOGPROBS = 20


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[TextPart], None] = None
    tool_calls: list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    response_format: dict | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list | None = None
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False


@dataclass
class Params:
    """What the batching worker needs of one request, the same for chat and completions."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    n: int
    stop: list[str]
    seed: int | None
    logprobs: bool
    top_logprobs: int
    ignore_eos: bool
    chat: bool
    grammar: str | None = None
    """llguidance grammar every choice is decoded under (response_format, tools); see serve/structured.py."""

    def sampling_key(self) -> tuple:
        """Requests with equal keys can share a batch (the engine samples a batch with one setting)."""
        return (0.0, 1.0, 0) if self.temperature == 0 else (self.temperature, self.top_p, self.top_k)


def parse(kind: type[Common], body) -> Common:
    """The validated request, or a 400 naming the first offending field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        missing = err["type"] == "missing"
        message = f"missing required parameter '{param}'" if missing else f"invalid value for '{param}': {err['msg']}"
        raise APIError(400, message, param=param, code="missing_required_parameter" if missing
                       else "invalid_value") from None


def params(req: Common, *, chat: bool, default_max_tokens: int) -> Params:
    """Resolve defaults and the checks pydantic cannot express."""
    if req.presence_penalty or req.frequency_penalty:
        raise bad_request("presence_penalty and frequency_penalty are not supported (use 0)",
                          param="presence_penalty" if req.presence_penalty else "frequency_penalty")
    if req.logit_bias:
        raise bad_request("logit_bias is not supported", param="logit_bias")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
        raise bad_request("stop takes at most 4 non-empty strings", param="stop")
    max_tokens = req.max_tokens
    if chat and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if chat:
        logprobs, top = req.logprobs, req.top_logprobs or 0
        if top and not logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        if req.echo:
            raise bad_request("echo is not supported", param="echo")
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    return Params(max_tokens=max_tokens or default_max_tokens, temperature=req.temperature, top_p=req.top_p,
                  top_k=req.top_k, n=req.n, stop=stop, seed=req.seed, logprobs=logprobs, top_logprobs=top,
                  ignore_eos=req.ignore_eos, chat=chat)
