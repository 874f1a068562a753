"""The ReAct agent's accuracy on held-out calculator questions, on the embedded model.

    python bench/bench_agent_accuracy.py                          # constrained, first reply a tool call
    python bench/bench_agent_accuracy.py --free --tool-choice auto   # the plain text protocol

The questions (src/alignkit/data/examples/calculator_questions.jsonl) were written for this
project; none is a worked example of prompts/react_few_shot.yaml. An answer is right when the
first number in its Final Answer equals the expected one (the examples teach the number first).
Format errors are replies that could not be parsed; tool calls count every Action.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from alignkit.apps.agents.backends import LocalBackend
from alignkit.apps.agents.react import run_agent
from alignkit.apps.agents.tools import BUILTIN_TOOLS

QUESTIONS = (Path(__file__).resolve().parents[1] / "src" / "alignkit" / "data" / "examples"
             / "calculator_questions.jsonl")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def first_number_is(answer: str | None, expected: float) -> bool:
    match = _NUMBER.search(answer or "")
    return bool(match) and abs(float(match.group().replace(",", "")) - expected) < 1e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--free", action="store_true", help="Plain decoding and the text protocol.")
    parser.add_argument("--tool-choice", default="required", choices=["auto", "required"])
    args = parser.parse_args()
    rows = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()][:args.limit]
    backend = LocalBackend(args.model, device="cpu")
    right = format_errors = calls = 0
    started = time.perf_counter()
    for row in rows:
        t = time.perf_counter()
        result = run_agent(backend, list(BUILTIN_TOOLS.values()), row["question"], max_steps=4,
                           constrained=not args.free, tool_choice=args.tool_choice)
        ok = first_number_is(result.answer, row["answer"])
        right += ok
        format_errors += sum(step.error_kind == "format" for step in result.steps)
        calls += sum(step.tool is not None for step in result.steps)
        print(f"{'OK ' if ok else 'BAD'} {row['question']} -> {result.answer!r} ({result.status}, "
              f"{time.perf_counter() - t:.1f} s)", flush=True)
    print(f"\n{right}/{len(rows)} right ({right / len(rows):.0%}), {format_errors} format errors, {calls} tool calls, "
          f"{(time.perf_counter() - started) / len(rows):.1f} s/question "
          f"({'free' if args.free else 'constrained'}, tool_choice {args.tool_choice}, {args.model})")


if __name__ == "__main__":
    main()
