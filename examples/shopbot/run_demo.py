"""The ShopBot demo (`make shopbot-demo`): real services, a few customers who want to return something.

Starts the orders database, the shipping-label service and the SMTP server on 127.0.0.1, runs the
agent on each request, prints its trace and the e-mails the SMTP server received, and shuts the
services down. The model is, in this order: --model; a freshly trained adapter in
runs/shopbot/final (`make shopbot-train`); the adapter shipped with alignkit; the base model (which
does not follow the format). The demo says which it uses.

    python -m examples.shopbot.run_demo                                    # the four demo requests
    python -m examples.shopbot.run_demo --customer 33 "Can I return the umbrella?"   # your own request
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from alignkit.apps.agents.backends import LocalBackend
from alignkit.apps.agents.trace import read_trace, render_trace
from alignkit.errors import AlignkitError

from .app import CustomerRequest, ShopServices, answer, choose_model, outcome, run_script
from .db import load_seed

DEMO_REQUESTS = [
    CustomerRequest(33, "Could you help me send the umbrella back?", expected_order=1080),
    CustomerRequest(36, "The winter jacket is the wrong size, I want to return it.", expected_order=1087),
    CustomerRequest(None, "Good morning! I need to return the blender from my order."),
    CustomerRequest(150, "Could you help me send the toaster back?"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message", nargs="?", default=None,
                        help="Your own customer message instead of the four demo requests (with --customer).")
    parser.add_argument("--customer", type=int, default=None,
                        help="The signed-in customer's id for MESSAGE (1-40 exist in the seed data); "
                             "leave it out for a visitor without an id.")
    parser.add_argument("--model", default=None,
                        help="'embedded', a model or adapter directory; default: runs/shopbot/final when "
                             "it exists, else the adapter shipped with alignkit.")
    parser.add_argument("--trace", type=Path, default=Path("runs/shopbot/demo_trace.jsonl"),
                        help="JSONL trace of every run (read it again with `alignkit agent trace FILE`).")
    args = parser.parse_args(argv)
    if args.customer is not None and args.message is None:
        raise AlignkitError("--customer needs a MESSAGE, e.g. --customer 33 \"Can I return the umbrella?\"")
    requests = [CustomerRequest(args.customer, args.message)] if args.message else DEMO_REQUESTS

    model, why = choose_model(args.model)
    print(f"model: {model}: {why}", flush=True)
    backend = LocalBackend(model, device="cpu")
    seed = load_seed()
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    args.trace.unlink(missing_ok=True)
    successes, started = 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        print(f"services: orders database {services.db_path.name}, label service {services.labels.url}, "
              f"SMTP {services.mail.host}:{services.mail.port}\n", flush=True)
        for request in requests:
            before = len(services.mail.messages)
            result = answer(backend, services, request, trace_path=args.trace)
            mails = services.mail.messages[before:]
            records = read_trace(args.trace)
            sys.stdout.write(render_trace([r for r in records if r["run"] == records[-1]["run"]]))
            for mail in mails:
                print(f"  [mail received] To: {mail['To']} | Subject: {mail['Subject']}")
                print("    " + mail.get_content().strip().replace("\n", "\n    "))
            if args.message:  # nobody knows what your request should lead to: no verdict
                print(f"  => {result.message}; {len(mails)} mail(s) sent\n", flush=True)
                continue
            judged = outcome(request, result, mails, seed)
            successes += judged.success
            print(f"  => {'OK' if judged.success else 'FAILED'}: {judged.why}\n", flush=True)
    seconds = (time.perf_counter() - started) / len(requests)
    if not args.message:
        print(f"{successes}/{len(requests)} requests handled correctly", end="; ")
    print(f"{seconds:.1f} s per request; services stopped; trace in {args.trace}")


if __name__ == "__main__":
    run_script(main)
