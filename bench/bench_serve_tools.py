"""Tool calling through `alignkit serve` on the embedded model: its cost, and the agent's accuracy with it.

    python bench/bench_serve_tools.py --repeats 3 --questions 6

1. One chat request forced to a tool call (`tools` + tool_choice "required", decoded under the
   grammar) against the same question without tools, and against the tool call's own prompt (with
   the tool listing) without a grammar, held to the call's number of tokens; alternating, greedy.
2. The first `--questions` held-out calculator questions (src/alignkit/data/examples/
   calculator_questions.jsonl) answered by the ReAct agent through the server's tool calling
   (OpenAIBackend, constrained) and by the local constrained path (LocalBackend, step grammar), same
   model, same settings as bench/bench_agent_accuracy.py.

Both run in one process against one server, so the ratios are comparable; absolute seconds depend on
how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import httpx
from bench_agent_accuracy import QUESTIONS, first_number_is  # noqa: I001  (same questions, same scoring)

from alignkit.apps.agents.backends import LocalBackend, OpenAIBackend
from alignkit.apps.agents.react import openai_tool, run_agent
from alignkit.apps.agents.tools import BUILTIN_TOOLS
from alignkit.models import load_model
from alignkit.serve.app import create_app
from alignkit.serve.protocol import ChatRequest
from alignkit.serve.structured import structured_plan, with_tool_prompt


def serve(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=int, default=6)
    args = parser.parse_args()
    model, tok = load_model(args.model, device="cpu")
    server = serve(create_app(model, tok, served_name=args.model), args.port)
    url = f"http://127.0.0.1:{args.port}/v1"
    tools = [openai_tool(t) for t in BUILTIN_TOOLS.values()]
    ask = [{"role": "user", "content": "What is 12.5% of 368? Use the calculator."}]
    body = {"model": args.model, "messages": ask, "temperature": 0, "max_tokens": 64}
    # The prompt the server builds for the tool call, sent without tools and held to the call's length
    # (ignore_eos): the same prompt and the same number of tokens, so the difference is the grammar.
    required = {"tools": tools, "tool_choice": "required"}
    plan = structured_plan(ChatRequest.model_validate({**body, **required}))
    call_tokens = httpx.post(f"{url}/chat/completions", json={**body, **required}, timeout=600).json()["usage"]
    same = {"messages": with_tool_prompt(ask, plan), "max_tokens": call_tokens["completion_tokens"], "ignore_eos": True}
    timing = {"free": [], "free, same prompt and length": [], "tool call": []}
    for _ in range(args.repeats):
        for kind, extra in (("free", {}), ("free, same prompt and length", same), ("tool call", required)):
            t = time.perf_counter()
            r = httpx.post(f"{url}/chat/completions", json={**body, **extra}, timeout=600).json()
            seconds = time.perf_counter() - t
            timing[kind].append((seconds, r["usage"]["completion_tokens"], r["usage"]["prompt_tokens"],
                                 r["choices"][0]["finish_reason"], r["choices"][0]["message"]))
    for kind, runs in timing.items():
        s = statistics.median(x[0] for x in runs)
        tokens, prompt = runs[-1][1], runs[-1][2]
        print(f"{kind}: median {s:.2f} s/request over {len(runs)}, {tokens} completion tokens "
              f"({s / max(tokens, 1) * 1000:.0f} ms/token incl. prefill), prompt {prompt} tokens, "
              f"finish {runs[-1][3]}, reply {json.dumps(runs[-1][4])[:160]}")
    median = {kind: statistics.median(x[0] for x in runs) for kind, runs in timing.items()}
    print(f"tool call / free: {median['tool call'] / median['free']:.2f}x; tool call / free with the same prompt "
          f"and length: {median['tool call'] / median['free, same prompt and length']:.2f}x seconds per request "
          "(same run)")

    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()][:args.questions]
    local = LocalBackend.from_loaded(model, tok, args.model)
    backends = {"served tool calling": OpenAIBackend(url, args.model, timeout=600), "local grammar": local}
    for label, backend in backends.items() if rows else ():
        right = format_errors = calls = via_tool_calls = 0
        started = time.perf_counter()
        for row in rows:
            result = run_agent(backend, list(BUILTIN_TOOLS.values()), row["question"], max_steps=4,
                               constrained=True, tool_choice="required")
            ok = first_number_is(result.answer, row["answer"])
            right += ok
            format_errors += sum(s.error_kind == "format" for s in result.steps)
            calls += sum(s.tool is not None for s in result.steps)
            via_tool_calls += sum(s.protocol == "tool_calls" for s in result.steps)
            print(f"  {label}: {'OK ' if ok else 'BAD'} {row['question']} -> {result.answer!r} "
                  f"({result.status}; protocols {[s.protocol for s in result.steps]})", flush=True)
        print(f"{label}: {right}/{len(rows)} right, {format_errors} format errors, {calls} tool calls "
              f"({via_tool_calls} through tool_calls), {(time.perf_counter() - started) / len(rows):.1f} s/question")
    server.should_exit = True


if __name__ == "__main__":
    main()
