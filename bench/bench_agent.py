"""Agent benchmark: the ReAct loop's own cost per step, and the fine-tuned ShopBot on held-out requests.

    python bench/bench_agent.py [--runs 200] [--requests 10]

1. Loop overhead: `run_agent` driven by a scripted model (replies fixed in advance, so model time
   is nil) for many steps, once with an in-memory tool (calculator) and once with the ShopBot's
   tools on the real services (SQLite, HTTP label service, SMTP). Overhead per step = wall time of
   the runs minus the time inside the model calls and inside the tools (both measured by the loop
   itself), divided by the steps: building the prompt, parsing, checking arguments, the trace.
2. The fine-tuned embedded model (runs/shopbot/final) on held-out requests: task-success rate,
   format-following rate and seconds per request on CPU. Skipped, with a note, when there is no adapter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # examples/ is a folder of the repository, not an installed package

from alignkit.apps.agents.cot import load_prompt_file  # noqa: E402
from alignkit.apps.agents.react import PROMPT_KEYS, REACT_FEW_SHOT_FILE, run_agent  # noqa: E402
from alignkit.apps.agents.tools import calculator  # noqa: E402
from examples.shopbot.app import CustomerRequest, ShopServices, answer, load_prompt  # noqa: E402
from examples.shopbot.db import load_seed  # noqa: E402

ADAPTER = REPO / "runs" / "shopbot" / "final"
HELDOUT = REPO / "runs" / "shopbot-data" / "heldout_requests.jsonl"


class ScriptedReplies:
    """A chat backend that answers from a fixed list of replies, so no model time enters the measurement."""

    def __init__(self, replies):
        self.replies = list(replies)

    def chat(self, messages, *, max_tokens, temperature, stop=None):
        reply = self.replies.pop(0)
        return reply(messages[-1]["content"]) if callable(reply) else reply


def act(tool: str, arguments: dict) -> str:
    return f"Thought: next step.\nAction: {tool}\nAction Input: {json.dumps(arguments)}"


FINAL = "Thought: I know the final answer\nFinal Answer: done"


def overhead(results, wall_s: float) -> dict:
    steps = [s for r in results for s in r.steps]
    model_s = sum(s.latency_s for s in steps)
    tool_s = sum(s.tool_latency_s or 0.0 for s in steps)
    return {"steps": len(steps), "loop_us_per_step": round((wall_s - model_s - tool_s) / len(steps) * 1e6, 1),
            "tool_ms_per_call": round(tool_s / max(sum(s.tool is not None and s.final_answer is None for s in steps), 1) * 1e3, 3)}


def bench_calculator(runs: int) -> dict:
    script = [act("calculator", {"expression": f"{i} * 7"}) for i in range(7)] + [FINAL]
    # Loaded once, as an application serving many requests does: parsing the YAML file is per run,
    # not per step, and would otherwise dominate.
    prompt = load_prompt_file(REACT_FEW_SHOT_FILE, PROMPT_KEYS)
    started, results = time.perf_counter(), []
    for _ in range(runs):
        results.append(run_agent(ScriptedReplies(script), [calculator], "What is 6 * 7?", max_steps=8,
                                 prompt=prompt))
    return overhead(results, time.perf_counter() - started)


def bench_shopbot(runs: int, services: ShopServices) -> dict:
    sql = ("SELECT orders.id, customers.email FROM customers JOIN orders ON orders.customer_id = customers.id "
           "JOIN items ON items.order_id = orders.id WHERE customers.id = 1 AND items.name LIKE '%shoes%'")
    label = lambda obs: json.loads(obs.removeprefix("Observation:").strip())["label_id"]  # noqa: E731
    script = [act("sql_query", {"sql": sql}), act("create_return_label", {"order_id": 1002}),
              lambda obs: act("email_label", {"label_id": label(obs), "email": "anna.lund@example.com"}), FINAL]
    request = CustomerRequest(1, "I want to return my running shoes.")
    prompt = load_prompt()
    started, results = time.perf_counter(), []
    for _ in range(runs):
        results.append(answer(ScriptedReplies(script), services, request, prompt=prompt))
    wall = time.perf_counter() - started
    # Opening the read-only connection per conversation is part of the application, not of the loop:
    # it is inside `wall` and reported with the loop overhead.
    return overhead(results, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="Agent runs per loop-overhead measurement.")
    parser.add_argument("--requests", type=int, default=10, help="Held-out requests for the model measurement (about 1-2 min each on a busy 2-core CPU); 0 skips it.")
    args = parser.parse_args()

    calc = bench_calculator(args.runs)
    print(f"loop overhead, calculator tool: {calc['loop_us_per_step']} us/step over {calc['steps']} steps "
          f"(tool {calc['tool_ms_per_call']} ms/call)", flush=True)
    seed = load_seed()
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        shop = bench_shopbot(max(args.runs // 4, 10), services)
        print(f"loop overhead, ShopBot tools on real services: {shop['loop_us_per_step']} us/step over "
              f"{shop['steps']} steps (SQL/HTTP/SMTP tools {shop['tool_ms_per_call']} ms/call on average)",
              flush=True)
        if args.requests == 0:
            print("fine-tuned model: skipped (--requests 0)")
            return
        if not ADAPTER.is_dir() or not HELDOUT.is_file():
            print(f"fine-tuned model: skipped, no adapter at {ADAPTER.relative_to(REPO)} or no held-out requests "
                  "(python -m examples.shopbot.make_traces; alignkit train sft --config configs/shopbot_sft.yaml)")
            return
        from alignkit.apps.agents.backends import LocalBackend
        from examples.shopbot.evaluate import evaluate_model
        from examples.shopbot.make_traces import read_requests

        requests = read_requests(HELDOUT)[:args.requests]
        result = evaluate_model(LocalBackend(str(ADAPTER), device="cpu"), requests, services, seed, desc="shopbot")
        seconds = [r["seconds"] for r in result["runs"]]
        print(f"fine-tuned embedded model, {result['requests']} held-out requests: task success "
              f"{result['task_success']:.1%}, format-following {result['format_following']:.1%}, "
              f"{result['seconds_per_request']:.1f} s/request on CPU (median {statistics.median(seconds):.1f} s)")


if __name__ == "__main__":
    main()
