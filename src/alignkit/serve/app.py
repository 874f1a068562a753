"""An OpenAI-compatible HTTP server for one model, on FastAPI, batching requests in one worker thread.

    app = create_app(model, tokenizer, served_name="my-model", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent
events ending with `data: [DONE]`, or one JSON body), GET /health. Errors use OpenAI's error JSON.
Structured output (`response_format`, `tools` + `tool_choice`) is decoded under a grammar: see
structured.py.
With an API key, every /v1 route needs `Authorization: Bearer KEY`; the comparison takes constant
time and the key is never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from alignkit.models.rollout import encode_prompts
from alignkit.serve.errors import APIError, bad_request
from alignkit.serve.protocol import ChatRequest, CompletionRequest, Params, params, parse
from alignkit.serve.structured import (StructuredPlan, format_plan, history_message, structured_plan, tool_call,
                                       with_tool_prompt)
from alignkit.serve.worker import BatchWorker, Job

DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks whether its client is still there


def context_window(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def create_app(model, tokenizer, *, served_name: str, api_key: str | None = None, max_batch: int = 32,
               max_queue: int = 64, default_max_tokens: int = 256) -> FastAPI:
    worker = BatchWorker(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    window = context_window(model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="alignkit serve", lifespan=lifespan)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
        if not ok:
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                           type="invalid_request_error", code="invalid_api_key")

    async def read_body(request: Request):
        check_key(request)
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError:
            raise bad_request("we could not parse the JSON body of your request (it must be a JSON object)",
                              code="invalid_json") from None

    def check_model(name: str) -> None:
        if name != served_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{served_name}'",
                           param="model", code="model_not_found")

    def check_window(prompts: list[list[int]], p: Params, explicit: bool) -> Params:
        longest = max(len(ids) for ids in prompts)
        if longest >= window or (explicit and longest + p.max_tokens > window):
            raise bad_request(f"this model's maximum context length is {window} tokens; the prompt has "
                              f"{longest} tokens and max_tokens is {p.max_tokens}",
                              param="messages" if p.chat else "prompt", code="context_length_exceeded")
        p.max_tokens = min(p.max_tokens, window - longest)  # the default never overflows the window
        return p

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_name, **worker.health()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": created,
                                            "owned_by": "alignkit", "max_model_len": window}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_body(request))
        check_model(req.model)
        p = params(req, chat=True, default_max_tokens=default_max_tokens)
        plan = structured_plan(req)
        p.grammar = checked_grammar(plan, req)
        messages = with_tool_prompt([history_message(m) for m in req.messages], plan)
        try:
            prompts = encode_prompts(tokenizer, [messages], chat=True)
        except Exception as e:  # a chat template can refuse a conversation (e.g. roles out of order)
            raise bad_request(f"the model's chat template refused these messages: {e}", param="messages") from None
        explicit = req.max_tokens is not None or req.max_completion_tokens is not None
        return await run(request, prompts, check_window(prompts, p, explicit), "chat.completion", req, plan)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request))
        check_model(req.model)
        p = params(req, chat=False, default_max_tokens=default_max_tokens)
        plan = format_plan(req.response_format) if req.response_format is not None else None
        p.grammar = checked_grammar(plan, req)
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt or any(len(x) == 0 for x in prompt):
            raise bad_request("prompt must not be empty", param="prompt")
        if any(isinstance(x, list) and max(x) >= len(tokenizer) for x in prompt):
            raise bad_request(f"token ids must be below the vocabulary size {len(tokenizer)}", param="prompt")
        prompts = encode_prompts(tokenizer, prompt, chat=False)
        return await run(request, prompts, check_window(prompts, p, req.max_tokens is not None),
                         "text_completion", req, plan)

    def checked_grammar(plan: StructuredPlan | None, req) -> str | None:
        if plan is not None and req.ignore_eos:
            raise bad_request("ignore_eos cannot be combined with response_format or tools (a finished "
                              "structure must end the reply)", param="ignore_eos")
        return plan.grammar if plan is not None else None

    async def run(request: Request, prompts, p: Params, kind: str, req, plan: StructuredPlan | None):
        job = worker.submit(prompts, p, asyncio.get_running_loop())
        job.plan = plan
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, rid, kind, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, rid, kind)

    def usage(job: Job) -> dict:
        prompt_tokens = sum(len(ids) for ids in job.prompts)
        completion_tokens = sum(len(c.tokens) for c in job.choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def complete(request: Request, job: Job, rid: str, kind: str):
        events = job.events()
        pending = asyncio.ensure_future(anext(events))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=DISCONNECT_POLL_S)
                if not done:
                    if await request.is_disconnected():
                        job.cancelled.set()
                    continue
                event = pending.result()
                if event[0] == "error":
                    raise event[1]
                if event[0] == "done":
                    break
                pending = asyncio.ensure_future(anext(events))
        finally:
            if not pending.done():
                pending.cancel()
        body = {"id": rid, "object": kind, "created": int(time.time()), "model": served_name,
                "choices": [choice_body(job, i, kind) for i in range(job.rows)], "usage": usage(job)}
        return JSONResponse(body)

    def choice_body(job: Job, i: int, kind: str) -> dict:
        choice = job.choices[i]
        if kind == "chat.completion":
            lp = {"content": [chat_logprob(e) for e in choice.logprobs]} if job.params.logprobs else None
            call = tool_call(choice.text, job.plan) if choice.finish_reason == "stop" else None
            if call is not None:
                return {"index": i, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                        "logprobs": lp, "finish_reason": "tool_calls"}
            return {"index": i, "message": {"role": "assistant", "content": choice.text}, "logprobs": lp,
                    "finish_reason": choice.finish_reason}
        return {"index": i, "text": choice.text, "logprobs": completion_logprobs(choice.logprobs)
                if job.params.logprobs else None, "finish_reason": choice.finish_reason}

    async def stream(job: Job, rid: str, kind: str, include_usage: bool):
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        created = int(time.time())

        def chunk(choices, **extra) -> str:
            return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created,
                                          "model": served_name, "choices": choices, **extra}) + "\n\n"

        # With tools, a choice's text is held back until it shows whether it is a call (it starts with
        # "{"): a call is sent whole as a tool_calls delta when it is complete, text as it comes.
        tools = kind == "chat.completion" and job.plan is not None and job.plan.tools is not None
        held, is_call = [""] * job.rows, [None] * job.rows
        try:
            if kind == "chat.completion":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(job.rows)])
            async for event in job.events():
                if event[0] == "delta" and tools and is_call[event[1]] is not False:
                    _, i, text, _ = event
                    held[i] += text
                    if held[i].strip() and is_call[i] is None:
                        is_call[i] = held[i].lstrip().startswith("{")
                        if not is_call[i]:
                            yield chunk([{"index": i, "delta": {"content": held[i]}, "logprobs": None,
                                          "finish_reason": None}])
                elif event[0] == "delta":
                    _, i, text, entry = event
                    if kind == "chat.completion":
                        lp = {"content": [chat_logprob(entry)]} if entry is not None else None
                        yield chunk([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}])
                    else:
                        lp = completion_logprobs([entry]) if entry is not None else None
                        yield chunk([{"index": i, "text": text, "logprobs": lp, "finish_reason": None}])
                elif event[0] == "finish":
                    _, i, reason = event
                    if tools and is_call[i] is not False:
                        call = tool_call(job.choices[i].text, job.plan) if reason == "stop" else None
                        delta = {"tool_calls": [{"index": 0, **call}]} if call else {"content": held[i]}
                        yield chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}])
                        reason = "tool_calls" if call else reason
                    body = {"delta": {}} if kind == "chat.completion" else {"text": ""}
                    yield chunk([{"index": i, **body, "logprobs": None, "finish_reason": reason}])
                elif event[0] == "error":
                    yield "data: " + json.dumps(event[1].body()) + "\n\n"
                    break
            else:
                if include_usage:
                    yield chunk([], usage=usage(job))
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (the response was cancelled) or the stream ended: stop its rows.
            job.cancelled.set()

    return app


def chat_logprob(entry) -> dict:
    token, logprob, top = entry
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": t, "logprob": l, "bytes": list(t.encode("utf-8"))} for t, l in top]}


def completion_logprobs(entries) -> dict:
    offsets, at = [], 0
    for token, _, _ in entries:
        offsets.append(at)
        at += len(token)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [dict(e[2]) for e in entries] if any(e[2] for e in entries) else None,
            "text_offset": offsets}
