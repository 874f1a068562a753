"""int4 against int8 on the embedded model: file size, memory after load, perplexity, decoding speed.

    python bench/bench_int4.py [--groups 32,64] [--threads 1] [--out runs/bench]

Quantizes SmolLM2-135M (no calibration: it does not change the weights) to int8-weight with an int8
embedding and to int4-weight for each group size with an int8 or an int4 embedding, saves and loads
each through the product's own path (save_quantized / load_model), and measures:
  - bytes on disk of the weight files;
  - perplexity and top-1 agreement against float32 on the shipped held-out text (this process);
  - memory after load, in a fresh process per model: parameter and buffer bytes, and the growth of
    the resident set over loading and one forward pass (after malloc_trim; see compress/report.py);
  - greedy tokens/s at batch 1 and 8 of int8 against the int4 variants, in ONE process that loads
    them all and alternates rounds, so the speed ratios are same-run ratios on a shared machine.
Writes bench_int4.json to --out. Timings are from one busy CPU machine and are noisy; read ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

MEMORY_SNIPPET = r"""
import json, sys, torch
torch.set_num_threads(1)
from alignkit.compress.report import settled_rss, weight_bytes
from alignkit.models import load_model
import accelerate, torchao, transformers.models.llama.modeling_llama, alignkit.compress.quantize  # noqa
before = settled_rss()
model, tok = load_model(sys.argv[1], device="cpu")
with torch.no_grad():
    model(input_ids=torch.tensor([[tok.eos_token_id]]))  # touches every weight (memory-mapped ones too)
print("RESULT " + json.dumps({"weight_bytes": weight_bytes(model), "load_rss_growth": settled_rss() - before}))
"""

SPEED_SNIPPET = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
from alignkit.models import load_model
from alignkit.compress.report import SPEED_PROMPTS
models = {name: load_model(spec, device="cpu") for name, spec in args["specs"].items()}
times = {name: {b: 0.0 for b in args["batches"]} for name in models}
for rnd in range(args["rounds"] + 1):  # round 0 warms up and is not counted
    for name, (model, tok) in models.items():
        tok.padding_side = "left"
        for b in args["batches"]:
            enc = tok(SPEED_PROMPTS[:b], return_tensors="pt", padding=True)
            kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None,
                      max_new_tokens=args["new_tokens"], min_new_tokens=args["new_tokens"])
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**enc, **kw)
            if rnd:
                times[name][b] += time.perf_counter() - t0
out = {name: {f"tokens_per_s_batch{b}": round(args["rounds"] * b * args["new_tokens"] / t, 2) for b, t in ts.items()}
       for name, ts in times.items()}
print("RESULT " + json.dumps(out))
"""


def subprocess_result(code: str, arg: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code, arg], env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default="32,64", help="int4 group sizes (128 does not divide 576, "
                                                           "SmolLM2's hidden size).")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1).")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds per model (default 3).")
    parser.add_argument("--new-tokens", type=int, default=32, help="Tokens per generation when timing.")
    parser.add_argument("--model", default="embedded", help="The float model to quantize.")
    parser.add_argument("--no-speed", action="store_true", help="Skip the tokens/s run.")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from alignkit.compress.prune import EVAL_TEXT
    from alignkit.compress.quantize import load_calibration_texts, quantize_model, save_quantized
    from alignkit.compress.report import disk_bytes, model_dir, quality, reference_logprobs, token_rows
    from alignkit.models import load_model

    t0 = time.time()
    model, tok = load_model(args.model, device="cpu")
    rows = token_rows(tok, load_calibration_texts(EVAL_TEXT, 10_000), 256)
    reference = reference_logprobs(model, rows)
    variants = [("int8-weight", None, "int8")]
    variants += [("int4-weight", int(g), emb) for g in args.groups.split(",") for emb in ("int8", "int4")]
    results = {"float32": {"disk_bytes": disk_bytes(model_dir(args.model)), **quality(model, rows, reference)}}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"float32": args.model}
        for method, group, embedding in variants:
            name = f"{method}" + (f" g{group}" if group else "") + f", {embedding} embedding"
            q = quantize_model(model, method, group or 32, embedding=embedding)
            out = save_quantized(q, tok, Path(tmp) / name.replace(" ", "_").replace(",", ""),
                                 {"method": method, "group_size": group, "embedding": embedding})
            del q
            loaded, _ = load_model(str(out), device="cpu")
            results[name] = {"disk_bytes": disk_bytes(out), **quality(loaded, rows, reference)}
            del loaded
            specs[name] = str(out)
            print(f"[{time.time() - t0:5.0f}s] {name}: {json.dumps(results[name])}", flush=True)
        for name, spec in specs.items():
            results[name].update(subprocess_result(MEMORY_SNIPPET, spec, args.threads))
            print(f"[{time.time() - t0:5.0f}s] memory {name}: {json.dumps(results[name])}", flush=True)
        timed = {n: s for n, s in specs.items() if n != "float32"}
        speed = {} if args.no_speed else subprocess_result(SPEED_SNIPPET, json.dumps({"specs": timed, "threads": args.threads,
                                                             "batches": [1, 8], "rounds": args.rounds,
                                                             "new_tokens": args.new_tokens}), args.threads)
    base_ppl = results["float32"]["perplexity"]
    int8 = "int8-weight, int8 embedding"
    for name, r in results.items():
        r["perplexity_ratio"] = round(r["perplexity"] / base_ppl, 4)
        r["disk_vs_int8"] = round(r["disk_bytes"] / results[int8]["disk_bytes"], 3)
        r["memory_vs_int8"] = round(r["weight_bytes"] / results[int8]["weight_bytes"], 3)
        if name in speed:
            r.update(speed[name])
            for b in (1, 8):
                r[f"speed_vs_int8_batch{b}"] = round(speed[name][f"tokens_per_s_batch{b}"]
                                                     / speed[int8][f"tokens_per_s_batch{b}"], 3)
    print(f"\n{'variant':<36} {'disk MB':>8} {'vs int8':>7} {'mem MB':>7} {'RSS+ MB':>7} {'ppl':>7} "
          f"{'ratio':>6} {'top1':>5} {'tok/s b1':>8} {'tok/s b8':>8}")
    for name, r in results.items():
        print(f"{name:<36} {r['disk_bytes'] / 1e6:8.1f} {r['disk_vs_int8']:7.3f} {r['weight_bytes'] / 1e6:7.1f} "
              f"{r['load_rss_growth'] / 1e6:7.0f} {r['perplexity']:7.2f} {r['perplexity_ratio']:6.3f} "
              f"{r['top1_agreement']:5.3f} {r.get('tokens_per_s_batch1', float('nan')):8.1f} "
              f"{r.get('tokens_per_s_batch8', float('nan')):8.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_int4{'_' + Path(args.model).name if args.model != 'embedded' else ''}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out} (timings noisy: a shared machine; compare the ratios)")


if __name__ == "__main__":
    main()
