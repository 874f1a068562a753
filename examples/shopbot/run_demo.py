"""The ShopBot demo (`make shopbot-demo`): real services, a few customers who want to return something.

Starts the orders database, the shipping-label service and the SMTP server on 127.0.0.1, runs the
agent on each request, prints its trace and the e-mails the SMTP server received, and shuts the
services down. The model is the fine-tuned adapter in runs/shopbot/final when it exists; otherwise
the base embedded model, which does not follow the format and mostly fails: the demo says so,
and how to train the adapter (about half an hour on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from alignkit.apps.agents.backends import LocalBackend
from alignkit.apps.agents.trace import read_trace, render_trace

from .app import CustomerRequest, ShopServices, answer, outcome
from .db import load_seed

ADAPTER = Path("runs/shopbot/final")
DEMO_REQUESTS = [
    CustomerRequest(33, "Could you help me send the umbrella back?", expected_order=1080),
    CustomerRequest(36, "The winter jacket is the wrong size, I want to return it.", expected_order=1087),
    CustomerRequest(None, "Good morning! I need to return the blender from my order."),
    CustomerRequest(150, "Could you help me send the toaster back?"),
]
TRAIN_HINT = ("python -m examples.shopbot.make_traces --out runs/shopbot-data && "
              "alignkit train sft --config configs/shopbot_sft.yaml")


def choose_model(requested: str | None) -> str:
    if requested:
        return requested
    if ADAPTER.is_dir():
        return str(ADAPTER)
    print(f"note: no fine-tuned adapter at {ADAPTER}; using the base embedded model, which does not "
          f"follow the ReAct format, so expect failed runs. Train the adapter with:\n  {TRAIN_HINT}\n",
          flush=True)
    return "embedded"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help=f"'embedded', a model or adapter directory; default {ADAPTER} when it exists.")
    parser.add_argument("--trace", type=Path, default=Path("runs/shopbot/demo_trace.jsonl"),
                        help="JSONL trace of every run (read it again with `alignkit agent trace FILE`).")
    args = parser.parse_args(argv)

    model = choose_model(args.model)
    backend = LocalBackend(model, device="cpu")
    seed = load_seed()
    args.trace.parent.mkdir(parents=True, exist_ok=True)
    args.trace.unlink(missing_ok=True)
    successes = 0
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        print(f"services: orders database {services.db_path.name}, label service {services.labels.url}, "
              f"SMTP {services.mail.host}:{services.mail.port} | model {model}\n", flush=True)
        for request in DEMO_REQUESTS:
            before = len(services.mail.messages)
            result = answer(backend, services, request, trace_path=args.trace)
            mails = services.mail.messages[before:]
            judged = outcome(request, result, mails, seed)
            successes += judged.success
            records = read_trace(args.trace)
            sys.stdout.write(render_trace([r for r in records if r["run"] == records[-1]["run"]]))
            for mail in mails:
                print(f"  [mail received] To: {mail['To']} | Subject: {mail['Subject']}")
                print("    " + mail.get_content().strip().replace("\n", "\n    "))
            print(f"  => {'OK' if judged.success else 'FAILED'}: {judged.why}\n", flush=True)
    print(f"{successes}/{len(DEMO_REQUESTS)} requests handled correctly; services stopped; trace in {args.trace}")


if __name__ == "__main__":
    main()
