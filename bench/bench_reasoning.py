"""Word-problem accuracy of the bare model, chain of thought, few-shot CoT, PAL and constrained PAL.

    python bench/bench_reasoning.py                       # all 45 problems, all methods, embedded model
    python bench/bench_reasoning.py --limit 10 --methods pal,pal_constrained

The problems (src/alignkit/data/examples/word_problems.jsonl) are short grade-school arithmetic
written for this project; none is a prompt's worked example. Every method runs greedy on the same
local backend, one question at a time; seconds per question include everything the method does
(PAL: writing the program, the sandbox run, retries; not the answer sentence, which adds nothing
to accuracy). A reply counts as right when the number it states (CoT: `extract_answer`) or the
program's `answer` equals the expected number. Per-question records go to --out as JSONL.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from alignkit.apps.agents.backends import LocalBackend
from alignkit.apps.agents.cot import extract_answer, run_cot
from alignkit.apps.agents.pal import run_pal

PROBLEMS = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "data" / "examples" / "word_problems.jsonl"
METHODS = ("bare", "cot", "cot_few_shot", "pal", "pal_constrained")


def same_number(value, expected: float) -> bool:
    try:
        return abs(float(str(value).replace(",", "")) - expected) < 1e-6
    except (TypeError, ValueError):
        return False


def solve(backend: LocalBackend, method: str, question: str, max_tokens: int) -> tuple[object, str]:
    """(the method's answer, what the model wrote)."""
    if method == "bare":
        reply = backend.chat([{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0.0)
        return extract_answer(reply).answer, reply
    if method in ("cot", "cot_few_shot"):
        result = run_cot(backend, question, few_shot=method == "cot_few_shot", max_tokens=max_tokens)
        return result.answer, result.reasoning
    result = run_pal(backend, question, max_tokens=max_tokens, constrained=method == "pal_constrained",
                     answer_sentence=False)
    return result.answer, result.code or (result.attempts[-1].reply if result.attempts else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--problems", type=Path, default=PROBLEMS, help="JSONL of {id, question, answer}.")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N problems.")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}.")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_reasoning.jsonl"))
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s): {', '.join(sorted(unknown))}")
    problems = [json.loads(line) for line in args.problems.read_text().splitlines() if line.strip()][:args.limit]
    backend = LocalBackend(args.model, device="cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    right = {m: 0 for m in methods}
    seconds = {m: 0.0 for m in methods}
    with args.out.open("w") as out:
        # Question by question, every method on each: an interrupted run still compares like with like.
        for n, problem in enumerate(problems, 1):
            for method in methods:
                started = time.perf_counter()
                answer, text = solve(backend, method, problem["question"], args.max_tokens)
                elapsed = time.perf_counter() - started
                ok = same_number(answer, problem["answer"])
                right[method] += ok
                seconds[method] += elapsed
                out.write(json.dumps({"id": problem["id"], "method": method, "expected": problem["answer"],
                                      "answer": answer, "right": ok, "seconds": round(elapsed, 2),
                                      "text": text}, default=str) + "\n")
                out.flush()
            print(f"{n}/{len(problems)} " + "  ".join(f"{m} {right[m]}" for m in methods), flush=True)
    print(f"\n{'method':<16}{'accuracy':>10}{'right':>8}{'s/question':>12}   ({len(problems)} problems, {args.model})")
    for method in methods:
        print(f"{method:<16}{right[method] / len(problems):>10.3f}{right[method]:>8}"
              f"{seconds[method] / len(problems):>12.1f}")


if __name__ == "__main__":
    main()
