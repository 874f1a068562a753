"""Benchmark compression on the embedded model (SmolLM2-135M): every variant against the original on
the shipped held-out eval text.

    make bench        (or: python bench/bench_compress.py [--quick] [--threads 2] [--parts int8,prune,recovery,distill])

Targets (issue 8):
  int8: file size <= 30% of fp32, perplexity ratio <= 1.05
  50% Wanda + LoRA recovery: perplexity ratio <= 1.3 (magnitude pruning alone reported beside it)
  distilled student at <= 50% of the parameters: perplexity, top-1 agreement and speed reported

Prints a table and writes bench_compress.json to --out; figures are what was measured, target met
or not. Timings are from one shared CPU machine and are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer recovery and distillation steps, no speed runs.")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for everything (default 2).")
    parser.add_argument("--recovery-steps", type=int, default=None, help="LoRA recovery steps (default 10, quick 4).")
    parser.add_argument("--recovery-lr", type=float, default=1e-3, help="LoRA recovery learning rate (default 1e-3).")
    parser.add_argument("--distill-steps", type=int, default=None, help="Distillation steps (default 60, quick 10).")
    parser.add_argument("--parts", default="int8,prune,recovery,distill",
                        help="Comma-separated parts to run: int8, prune (magnitude, wanda, structured), "
                             "recovery (wanda, then LoRA recovery), distill (default: all four).")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench", help="Where bench_compress.json goes.")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"int8", "prune", "recovery", "distill"}:
        parser.error(f"--parts takes int8, prune, recovery and distill, got {args.parts!r}")
    recovery_steps = args.recovery_steps or (4 if args.quick else 10)
    distill_steps = args.distill_steps or (10 if args.quick else 60)

    import torch

    torch.set_num_threads(args.threads)
    from alignkit.compress.distill import main as distill
    from alignkit.compress.distill_config import DistillConfig
    from alignkit.compress.prune import CALIB_TEXT, EVAL_TEXT, prune_model, recover
    from alignkit.compress.quantize import load_calibration_texts, quantize_model, save_quantized
    from alignkit.compress.report import disk_bytes, measure_speed, model_dir, quality, reference_logprobs, token_rows
    from alignkit.config import load_config
    from alignkit.models import load_model

    t_start = time.time()
    model, tok = load_model("embedded", device="cpu")
    rows = token_rows(tok, load_calibration_texts(EVAL_TEXT, 10_000), 256)
    reference = reference_logprobs(model, rows)
    calib = load_calibration_texts(CALIB_TEXT, 10_000)
    results = {}

    def row(name, m, **extra):
        total = sum(p.numel() for p in m.parameters())
        results[name] = {"parameters": total, **quality(m, rows, reference), **extra}
        base = results.get("fp32 baseline", results[name])
        results[name]["perplexity_ratio"] = round(results[name]["perplexity"] / base["perplexity"], 4)
        print(f"[{time.time() - t_start:6.0f}s] {name}: " + json.dumps(results[name]), flush=True)

    base_bytes = disk_bytes(model_dir("embedded"))
    row("fp32 baseline", model, disk_bytes=base_bytes, size_ratio=1.0)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- int8 ------------------------------------------------------------------------------
        for embedding in ("float", "int8") if "int8" in parts else ():
            q = quantize_model(model, "int8-weight", embedding=embedding)
            out = save_quantized(q, tok, tmp / f"int8-{embedding}", {"method": "int8-weight", "embedding": embedding})
            size = disk_bytes(out)
            row(f"int8 weights, {embedding} embedding", q, disk_bytes=size, size_ratio=round(size / base_bytes, 4))
            del q

        # ---- pruning ---------------------------------------------------------------------------
        methods = (["magnitude"] if "prune" in parts else []) + (["wanda"] if parts & {"prune", "recovery"} else [])
        for method in methods:
            pruned, masks, _ = prune_model(model, tok, method, 0.5, texts=calib)
            row(f"{method} 50%", pruned, sparsity=0.5)
            if method == "wanda" and "recovery" in parts:
                t0 = time.time()
                recovered, losses = recover(pruned, tok, masks, calib, mode="lora", steps=recovery_steps,
                                            learning_rate=args.recovery_lr, batch_size=4, lora_r=8)
                row(f"wanda 50% + LoRA recovery ({recovery_steps} steps)", recovered, sparsity=0.5,
                    recovery_loss_first=losses[0], recovery_loss_last=losses[-1],
                    recovery_seconds=round(time.time() - t0, 1))
                del recovered
            del pruned, masks
        if "prune" in parts:
            structured, _, info = prune_model(model, tok, "structured", 0.5, texts=calib)
            row("structured 50% of MLP channels", structured, **info)
            del structured

        # ---- distillation ----------------------------------------------------------------------
        if "distill" in parts:
            cfg = load_config(DistillConfig, REPO / "configs" / "distill.yaml",
                              [f"output_dir={tmp / 'runs'}", "run_name=student", f"max_steps={distill_steps}",
                               f"save_every={distill_steps}", f"data.train={CALIB_TEXT}", f"data.eval={EVAL_TEXT}"])
            t0 = time.time()
            run = distill(cfg)
            student, _ = load_model(str(run / "final"), device="cpu")
            extra = {"distill_steps": distill_steps, "distill_seconds": round(time.time() - t0, 1),
                     "parameter_ratio": round(sum(p.numel() for p in student.parameters()) /
                                              results["fp32 baseline"]["parameters"], 4),
                     "disk_bytes": disk_bytes(run / "final")}
            if not args.quick:
                extra["speed"] = measure_speed(str(run / "final"), args.threads)
                results["fp32 baseline"]["speed"] = measure_speed("embedded", args.threads)
            row("distilled student (15 layers, MLP 768)", student, **extra)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_compress.json").write_text(json.dumps(results, indent=2))
    print("\n| variant | params (M) | size ratio | perplexity | ppl ratio | top-1 agree | KL |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        size = f"{r['size_ratio']:.3f}" if "size_ratio" in r else "-"
        print(f"| {name} | {r['parameters'] / 1e6:.1f} | {size} | {r['perplexity']:.3f} | {r['perplexity_ratio']:.3f} "
              f"| {r['top1_agreement']:.3f} | {r['kl_vs_baseline']:.4g} |")
    if "speed" in results["fp32 baseline"]:
        for name in ("fp32 baseline", "distilled student (15 layers, MLP 768)"):
            s = results[name]["speed"]
            print(f"{name}: {s['tokens_per_s_batch1']} tok/s at batch 1, {s['tokens_per_s_batch8']} at batch 8, "
                  f"peak RSS {s['peak_rss'] / 1e6:.0f} MB ({args.threads} threads)")
    print(f"total {time.time() - t_start:.0f}s; written to {args.out / 'bench_compress.json'}")


if __name__ == "__main__":
    sys.exit(main())
