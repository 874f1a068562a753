"""Seconds per ShopBot request: today's decoding against the chat path the first measurement (85 s) used, same run.

    python -m examples.shopbot.bench_speed --limit 3

"now": `LocalBackend` as the demo runs it: the ReAct grammar, the key/value cache of the prompt
prefix already read reused across steps and requests, forced tokens read in one pass, the reply
ended when the grammar is complete. "before": the chat path the ShopBot had when 85 s per request
was measured: `alignkit.models.generate` over the whole prompt at every step (no reuse), all
`max_tokens` decoded, then cut at "Observation:" (text protocol, no grammar); it runs on today's
rollout engine, so it is if anything faster than it was then. Both use the same loaded weights
and answer the same held-out requests against the same services, alternating which goes first.
Prints seconds per request, the ratio, and task success of each; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.apps.agents.backends import LocalBackend, cut_at_stop
from alignkit.io import atomic_write_text

from .app import ShopServices, choose_model, load_prompt, run_script
from .db import load_seed
from .evaluate import line, run_request, summary
from .make_traces import read_requests


class WholePromptBackend:
    """The ShopBot's chat path when 85 s per request was measured (see the module docstring)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, stop=None) -> str:
        from alignkit.models import generate

        out = generate(self.model, self.tokenizer, [messages], max_new_tokens=max_tokens, temperature=temperature)
        return cut_at_stop(out.texts[0], stop).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Default: as the demo chooses (app.choose_model).")
    parser.add_argument("--requests", type=Path, default=Path("runs/shopbot-data/heldout_requests.jsonl"))
    parser.add_argument("--limit", type=int, default=3, help="The first N held-out requests.")
    parser.add_argument("--out", type=Path, default=Path("runs/shopbot/bench_speed.json"))
    args = parser.parse_args(argv)

    seed, prompt = load_seed(), load_prompt()
    requests = read_requests(args.requests)[:args.limit]
    spec = args.model or choose_model()[0]
    now = LocalBackend(spec, device="cpu")
    backends = {"now": now, "before": WholePromptBackend(now.model, now.tokenizer)}
    runs: dict[str, list[dict]] = {"now": [], "before": []}
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        for i, request in enumerate(tqdm(requests, desc="requests")):
            for mode in (("now", "before") if i % 2 == 0 else ("before", "now")):
                runs[mode].append(run_request(backends[mode], request, services, seed, prompt))
    results = {mode: summary(r) for mode, r in runs.items()}
    for mode, r in results.items():
        print(line(f"{spec} ({mode})", r))
    ratio = results["before"]["seconds_per_request"] / max(results["now"]["seconds_per_request"], 1e-9)
    print(f"before / now: {ratio:.2f}x the seconds per request (same run, same weights, same requests)")
    atomic_write_text(args.out, json.dumps({"model": spec, "ratio": round(ratio, 2), **results}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
