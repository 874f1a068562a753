"""Measure a model as the ShopBot on held-out customer requests: format-following, task success, seconds per request.

    python -m examples.shopbot.evaluate --model embedded --model runs/shopbot/final \
        --requests runs/shopbot-data/heldout_requests.jsonl --limit 12

For every request the agent runs against fresh real services (database, label service, SMTP).
Format-following is the share of model turns that parse as an action or a final answer; task
success is `app.outcome` (the label mailed to the customer's own address, or "not found" said to a
customer who does not exist). Results go to --out as JSON, one entry per model, with every request.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.apps.agents.backends import LocalBackend
from alignkit.io import atomic_write_text

from .app import CustomerRequest, ShopServices, answer, load_prompt, outcome
from .db import load_seed
from .make_traces import read_requests


def evaluate_model(backend, requests: list[CustomerRequest], services: ShopServices, seed: dict,
                   desc: str = "eval") -> dict:
    """Rates over `requests`, and one record per request (outcome, turns, seconds)."""
    prompt, runs = load_prompt(), []
    for request in tqdm(requests, desc=desc):
        before = len(services.mail.messages)
        started = time.perf_counter()
        result = answer(backend, services, request, prompt=prompt)
        seconds = time.perf_counter() - started
        judged = outcome(request, result, services.mail.messages[before:], seed)
        runs.append({"request": request.question(), "success": judged.success, "why": judged.why,
                     "status": result.status, "turns": len(result.steps),
                     "parsed_turns": sum(s.error_kind != "format" for s in result.steps),
                     "seconds": round(seconds, 2), "answer": result.answer})
    turns = sum(r["turns"] for r in runs)
    return {"requests": len(runs),
            "format_following": round(sum(r["parsed_turns"] for r in runs) / max(turns, 1), 3),
            "task_success": round(sum(r["success"] for r in runs) / max(len(runs), 1), 3),
            "seconds_per_request": round(sum(r["seconds"] for r in runs) / max(len(runs), 1), 2),
            "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True,
                        help="A model to evaluate: 'embedded', a model or adapter directory; repeat for several.")
    parser.add_argument("--requests", type=Path, default=Path("runs/shopbot-data/heldout_requests.jsonl"),
                        help="Held-out requests written by make_traces.py.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N requests.")
    parser.add_argument("--out", type=Path, default=Path("runs/shopbot/eval.json"),
                        help="Where to write the results (JSON).")
    args = parser.parse_args(argv)

    seed = load_seed()
    requests = read_requests(args.requests)[:args.limit]
    results = {}
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        for spec in args.model:
            backend = LocalBackend(spec, device="cpu")
            results[spec] = evaluate_model(backend, requests, services, seed, desc=spec)
            r = results[spec]
            print(f"{spec}: {r['requests']} requests | format-following {r['format_following']:.1%} | "
                  f"task success {r['task_success']:.1%} | {r['seconds_per_request']:.1f} s/request (CPU)",
                  flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
