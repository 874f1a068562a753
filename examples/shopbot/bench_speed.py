"""Seconds per ShopBot request: today's decoding against the chat path the first measurement (85 s) used, same run.

    python -m examples.shopbot.bench_speed --limit 3

"now": `LocalBackend` as the demo runs it: the ReAct grammar, the key/value cache of the prompt
prefix already read reused across steps and requests, forced tokens read in one pass, tokens drafted
by lookup in the prompt and in earlier replies (--draft), the reply ended when the grammar is complete.
"before": the chat path the ShopBot had when 85 s per request
was measured: `alignkit.models.generate` over the whole prompt at every step (no reuse), all
`max_tokens` decoded, then cut at "Observation:" (text protocol, no grammar); it runs on today's
rollout engine. "original": the same, decoded as it was then: transformers' `generate` on the
peft model (LoRA layers not merged), greedy, stopped at EOS. All use the same loaded weights and
answer the same held-out requests against the same services, in an order that rotates from one
request to the next, after every mode has answered --warmup other held-out requests untimed (the
first request of a process also pays one-time costs, 2-4 s here). Prints seconds per request, the
ratios, and task success of each; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from alignkit.apps.agents.backends import DRAFT, LocalBackend, cut_at_stop
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


class OriginalBackend(WholePromptBackend):
    """As `WholePromptBackend`, decoded by transformers' generate on the unmerged peft model (the code of then)."""

    def chat(self, messages: list[dict], *, max_tokens: int, temperature: float, stop=None) -> str:
        import torch
        from transformers import GenerationConfig

        from alignkit.models.generation import eos_ids, render_prompt

        ids = self.tokenizer(render_prompt(self.tokenizer, messages), add_special_tokens=False,
                             return_tensors="pt")["input_ids"]
        eos = eos_ids(self.tokenizer, self.model)
        config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return cut_at_stop(text, stop).strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Default: as the demo chooses (app.choose_model).")
    parser.add_argument("--requests", type=Path, default=Path("runs/shopbot-data/heldout_requests.jsonl"))
    parser.add_argument("--limit", type=int, default=3, help="The first N held-out requests.")
    parser.add_argument("--out", type=Path, default=Path("runs/shopbot/bench_speed.json"))
    parser.add_argument("--warmup", type=int, default=1,
                        help="Held-out requests from the end of the file that every mode answers first, untimed "
                             "(a process's first request also pays one-time costs: engine copy, grammar set-up).")
    parser.add_argument("--draft", type=int, default=DRAFT,
                        help=f"'now': tokens drafted per pass (default {DRAFT}, as the demo; 0: none)")
    args = parser.parse_args(argv)

    seed, prompt = load_seed(), load_prompt()
    held_out = read_requests(args.requests)
    requests = held_out[:args.limit]
    warmup = held_out[len(requests):][-args.warmup:] if args.warmup > 0 else []
    spec = args.model or choose_model()[0]
    now = LocalBackend(spec, device="cpu", draft=args.draft)
    backends = {"now": now, "before": WholePromptBackend(now.model, now.tokenizer),
                "original": OriginalBackend(now.model, now.tokenizer)}
    modes = list(backends)
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as workdir, ShopServices.start(Path(workdir), seed) as services:
        for request in warmup:  # untimed
            for mode in modes:
                run_request(backends[mode], request, services, seed, prompt)
        for i, request in enumerate(tqdm(requests, desc="requests")):
            for mode in modes[i % 3:] + modes[:i % 3]:
                runs[mode].append(run_request(backends[mode], request, services, seed, prompt))
    results = {mode: summary(r) for mode, r in runs.items()}
    for mode, r in results.items():
        print(line(f"{spec} ({mode})", r))
    now_s = max(results["now"]["seconds_per_request"], 1e-9)
    ratios = {mode: round(results[mode]["seconds_per_request"] / now_s, 2) for mode in modes[1:]}
    print("seconds per request against now (same run, same weights, same requests): "
          + ", ".join(f"{mode} {ratio:.2f}x" for mode, ratio in ratios.items()))
    atomic_write_text(args.out, json.dumps({"model": spec, "ratios": ratios, **results}, indent=1) + "\n")


if __name__ == "__main__":
    run_script(main)
