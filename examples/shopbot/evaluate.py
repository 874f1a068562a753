"""Measure a model as the ShopBot on held-out customer requests: format-following, task success, seconds per request.

    python -m examples.shopbot.evaluate                       # the default model, first 10 held-out requests
    python -m examples.shopbot.evaluate --model embedded --model runs/shopbot/final --limit 12
    python -m examples.shopbot.evaluate --prefix-reuse compare   # seconds per request with and without
    python -m examples.shopbot.evaluate --drafting compare       # the same for drafting (prompt and earlier replies)

For every request the agent runs against the real services (database, label service, SMTP), under
the constrained ReAct grammar. Format-following is the share of model turns that parse as an
action or a final answer; task success is `app.outcome` (the label mailed to the customer's own
address, or "not found" said to a customer who does not exist). The default model is chosen as
the demo chooses it (`app.choose_model`). With --prefix-reuse compare, each request is answered
twice in the same run, by the same weights, once reusing the key/value cache of the prompt prefix
read before (the system prompt, the earlier steps) and once re-reading every prompt, alternating
which goes first; both get their own rates and seconds. --drafting compare does the same with and
without drafting (`alignkit.models.drafting`: tokens looked up in the prompt and in earlier replies).
Results go to --out as JSON, one entry per model (and mode), with every request.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.apps.agents.backends import LocalBackend
from alignkit.errors import AlignkitError
from alignkit.io import atomic_write_text

from .app import CustomerRequest, ShopServices, answer, choose_model, load_prompt, outcome, run_script
from .db import load_seed
from .make_traces import read_requests


def run_request(backend, request: CustomerRequest, services: ShopServices, seed: dict, prompt: dict) -> dict:
    """One request against the services: its outcome, turns and seconds."""
    before = len(services.mail.messages)
    started = time.perf_counter()
    result = answer(backend, services, request, prompt=prompt)
    seconds = time.perf_counter() - started
    judged = outcome(request, result, services.mail.messages[before:], seed)
    return {"request": request.question(), "success": judged.success, "why": judged.why,
            "status": result.status, "turns": len(result.steps),
            "parsed_turns": sum(s.error_kind != "format" for s in result.steps),
            "seconds": round(seconds, 2), "answer": result.answer,
            "prompt_tokens": sum(s.prompt_tokens or 0 for s in result.steps)}


def summary(runs: list[dict]) -> dict:
    turns = sum(r["turns"] for r in runs)
    return {"requests": len(runs),
            "format_following": round(sum(r["parsed_turns"] for r in runs) / max(turns, 1), 3),
            "task_success": round(sum(r["success"] for r in runs) / max(len(runs), 1), 3),
            "seconds_per_request": round(sum(r["seconds"] for r in runs) / max(len(runs), 1), 2),
            "runs": runs}


def evaluate_model(backend, requests: list[CustomerRequest], services: ShopServices, seed: dict,
                   desc: str = "eval") -> dict:
    """Rates over `requests`, and one record per request (outcome, turns, seconds)."""
    prompt = load_prompt()
    return summary([run_request(backend, r, services, seed, prompt) for r in tqdm(requests, desc=desc)])


def compare_modes(backend: LocalBackend, what: str, requests: list[CustomerRequest], services: ShopServices,
                  seed: dict, desc: str = "eval") -> dict[str, dict]:
    """what "prefix_reuse": {"reuse": ..., "no_reuse": ...}; what "drafting": {"drafting": ...,
    "no_drafting": ...}. Every request answered in both modes by the same weights, alternating which
    mode goes first, so that a change of machine load hits both alike."""
    prompt = load_prompt()
    on, off = ("reuse", "no_reuse") if what == "prefix_reuse" else ("drafting", "no_drafting")
    settings = {on: {}, off: {"prefix_reuse": False}} if what == "prefix_reuse" else {on: {"draft": 8}, off: {"draft": 0}}
    backends = {mode: LocalBackend.from_loaded(backend.model, backend.tokenizer, backend.name, **kw) if kw else backend
                for mode, kw in settings.items()}
    runs: dict[str, list[dict]] = {on: [], off: []}
    for i, request in enumerate(tqdm(requests, desc=desc)):
        for mode in ((on, off) if i % 2 == 0 else (off, on)):
            runs[mode].append(run_request(backends[mode], request, services, seed, prompt))
    return {mode: summary(r) for mode, r in runs.items()}


def line(name: str, r: dict) -> str:
    return (f"{name}: {r['requests']} requests | format-following {r['format_following']:.1%} | "
            f"task success {r['task_success']:.1%} | {r['seconds_per_request']:.1f} s/request (CPU)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="A model to evaluate: 'embedded', a model or adapter directory; repeat for several. "
                             "Default: runs/shopbot/final when it exists, else the adapter shipped with alignkit.")
    parser.add_argument("--requests", type=Path, default=Path("runs/shopbot-data/heldout_requests.jsonl"),
                        help="Held-out requests written by make_traces.py.")
    parser.add_argument("--limit", type=int, default=10, help="Evaluate only the first N requests (0: all).")
    parser.add_argument("--prefix-reuse", choices=["on", "off", "compare"], default="on",
                        help="on: reuse the key/value cache of the prompt prefix read before; off: re-read "
                             "every prompt; compare: both, request by request, in the same run.")
    parser.add_argument("--drafting", choices=["on", "off", "compare"], default="on",
                        help="on (default, as the demo runs): draft tokens looked up in the prompt and in earlier "
                             "replies; off: one token per forward pass; compare: both, request by request, in the "
                             "same run.")
    parser.add_argument("--out", type=Path, default=Path("runs/shopbot/eval.json"),
                        help="Where to write the results (JSON).")
    args = parser.parse_args(argv)
    if not args.requests.is_file():
        raise AlignkitError(f"{args.requests}: no such file; write the held-out requests with "
                            "`python -m examples.shopbot.make_traces --out runs/shopbot-data`")

    seed = load_seed()
    requests = read_requests(args.requests)[:args.limit or None]
    models = args.model or [choose_model()[0]]
    results = {}
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        for spec in models:
            backend = LocalBackend(spec, device="cpu", prefix_reuse=args.prefix_reuse != "off",
                                   draft=8 if args.drafting == "on" else 0)
            if "compare" in (args.prefix_reuse, args.drafting):
                if args.prefix_reuse == args.drafting:
                    raise AlignkitError("compare one thing at a time: --prefix-reuse compare or --drafting compare")
                what = "prefix_reuse" if args.prefix_reuse == "compare" else "drafting"
                for mode, r in compare_modes(backend, what, requests, services, seed, desc=spec).items():
                    results[f"{spec} ({mode})"] = r
                    print(line(f"{spec} ({mode.replace('_', ' ')})", r), flush=True)
            else:
                results[spec] = evaluate_model(backend, requests, services, seed, desc=spec)
                print(line(spec, results[spec]), flush=True)
    atomic_write_text(args.out, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    run_script(main)
