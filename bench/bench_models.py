"""Benchmark the model layer on the embedded model: load times, and generation throughput of our
helper against plain transformers `generate` measured in the same process.

    make bench        (or: python bench/bench_models.py [--repeats 3] [--threads 2])

Prints figures and ratios; it is not a test. Targets: cached load <= 3 s; helper >= 1.0x plain.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOAD_SNIPPET = """
import time, sys
t0 = time.perf_counter()
import torch, transformers
# transformers imports a model's code lazily, on first use: import it here, so that "load" below
# is the work of loading (config, weights, tokenizer), and "imports" all the code it runs.
import transformers.models.llama.modeling_llama, transformers.core_model_loading
from alignkit.models import load_model
t1 = time.perf_counter()
load_model("embedded", device="cpu")
t2 = time.perf_counter()
load_model("embedded", device="cpu")
t3 = time.perf_counter()
print(f"{t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}")
"""

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain step by step how to return a pair of shoes bought online.",
    "Describe the water cycle to a ten-year-old.",
    "List some tips for staying productive while working from home, with a sentence on each.",
    "Write a polite email asking a customer for their order number.",
    "Explain why the sky is blue.",
    "Describe a perfect weekend in the mountains.",
    "Give advice to someone starting to learn the guitar.",
]


def time_load(home: str) -> tuple[float, float, float]:
    """(imports, load_model in a fresh process, a second load_model in that process), seconds."""
    env = {**os.environ, "ALIGNKIT_HOME": home}
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET], env=env, capture_output=True, text=True, check=True)
    imports, load, again = map(float, out.stdout.split()[-3:])
    return imports, load, again


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU\n")

    print("## Embedded model load (SmolLM2-135M-Instruct)")
    with tempfile.TemporaryDirectory() as home:
        imp, first, _ = time_load(home)
        print(f"first load (GGUF -> safetensors cache): {first:6.2f} s  (+ {imp:.2f} s imports)")
        cached = [time_load(home) for _ in range(args.repeats)]
        med = statistics.median(c[1] for c in cached)
        again = statistics.median(c[2] for c in cached)
        print(f"cached load, fresh process (median of {args.repeats}): {med:6.2f} s  (+ {statistics.median(c[0] for c in cached):.2f} s imports)"
              f"  target <= 3 s: {'met' if med <= 3 else 'MISSED'}")
        print(f"a second load in the same process: {again:.2f} s; a fresh process is ready after imports + load")
        print(f"first / cached: {first / med:.1f}x\n")

    from transformers import GenerationConfig

    from alignkit.models import generate, load_model
    from alignkit.models.generation import render_prompt

    model, tok = load_model("embedded", device="cpu")
    print(f"## Generation, greedy, {args.new_tokens} new tokens max")
    print(f"{'batch':>5} | {'helper tok/s':>12} | {'plain tok/s':>11} | {'ratio':>5} | same tokens")
    for batch in (1, 8):
        prompts = PROMPTS[:batch]

        def helper():
            out = generate(model, tok, prompts, max_new_tokens=args.new_tokens)
            return sum(len(t) for t in out.tokens), [t for t in out.tokens]

        def plain():
            tok.padding_side = "left"
            texts = [render_prompt(tok, p) for p in prompts]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            with torch.no_grad():
                seqs = model.generate(**enc, generation_config=cfg)
            new = seqs[:, enc["input_ids"].shape[1]:].tolist()
            kept = [row[:row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in new]
            texts = tok.batch_decode(kept, skip_special_tokens=True)  # plain users decode too
            return sum(len(k) for k in kept), kept

        helper()  # warm-up both paths
        plain()
        h_times, p_times = [], []
        for _ in range(args.repeats):  # interleaved, so drift hits both alike
            t = time.perf_counter(); n_h, h_tokens = helper(); h_times.append(time.perf_counter() - t)
            t = time.perf_counter(); n_p, p_tokens = plain(); p_times.append(time.perf_counter() - t)
        h_rate = n_h / statistics.median(h_times)
        p_rate = n_p / statistics.median(p_times)
        print(f"{batch:>5} | {h_rate:>12.1f} | {p_rate:>11.1f} | {h_rate / p_rate:>4.2f}x | {h_tokens == p_tokens}")
    print("\ntarget: helper >= 1.0x plain generate")


if __name__ == "__main__":
    main()
