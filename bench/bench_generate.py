"""Benchmark generation on the embedded model: the rollout engine against transformers `generate`,
and both against the machine's limits, all measured in the same run.

    make bench        (or: python bench/bench_generate.py [--quick] [--threads 2] [--new-tokens 32])

Sampled at temperature 1 (no top-k/top-p), a fixed number of new tokens (EOS banned through each
path's own `min_new_tokens`, no logits processor), the same prompts for every path, at each batch size:
  (a) `model.generate` on the PEFT-wrapped model (a LoRA adapter, r 8 on q/v): the path before the engine
  (b) `model.generate` on the merged weights (a plain model)
  (c) `RolloutEngine(policy).generate` (LoRA merged into its generation copy), its products in the
      precision `models/cpu_linear.py` picks for this CPU (bfloat16 from 4 rows on CPUs with AMX)
  (p) on a CPU where (c) multiplies in bfloat16: the same engine with every product in float32
  (t) with --lean: the same engine with its decode steps through transformers' forward rather than
      the written-out Llama step (`models/llama_decode.py`)
  (s) with --static-loop: the peer of (c), a bare loop of forward passes over transformers' StaticCache
      with logits_to_keep=1 and `torch.multinomial` (no hooks, no per-row seeds, no compaction)
  (d) with --continuous-batching: transformers' `generate_batch` (paged cache) on the merged weights
  (f) with --linear: the engine with plain `F.linear` everywhere (`models/cpu_linear.py` off), and
      before the table each projection shape of the model at 1..256 rows: `F.linear`, rows-first
      ((W x^T)^T, what the engine uses) and oneDNN on a pre-packed weight (measured, not used: README)
  (q) with --int8: the engine on the merged weights quantized int8 weight-only by torchao (for
      `generate`/`serve`, not for RL sampling, where the sampler must be the policy itself)
Machine limits, measured here: memory copy GB/s -> weight-read tokens/s (batch x bandwidth / weight
bytes, the bound while decoding is memory-bound) and matmul GFLOP/s -> compute tokens/s (GFLOP/s /
2 x parameters); each figure is also printed as a share of min(weight-read, compute).
Prints figures, not a test. Targets: (c) >= 2x (a) at batch 32 and 64; (c) at batch 1 >= 60% of
the weight-read limit. Other work on the machine moves the absolute figures; compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_models import PROMPTS  # the same prompts as the model benchmark (bench/ is on the path)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def machine_limits(repeats: int) -> tuple[float, float]:
    """(memory copy GB/s: bytes copied per second of a 256 MB copy, matmul GFLOP/s: 2048^3 fp32)."""
    import torch

    src, dst = torch.ones(64 * 2**20), torch.empty(64 * 2**20)
    copy_s = best_time(lambda: dst.copy_(src), repeats + 2)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    mm_s = best_time(lambda: a @ b, repeats + 2)
    return src.numel() * 4 / copy_s / 1e9, 2 * 2048**3 / mm_s / 1e9


def plain_linears(run):
    """`run` with the engine's rows-first linears switched off (every projection through F.linear)."""
    from alignkit.models import cpu_linear

    def wrapped():
        cpu_linear.ENABLED = False
        try:
            run()
        finally:
            cpu_linear.ENABLED = True
    return wrapped


def transformers_steps(engine, run):
    """`run` with the engine's decode steps through transformers' forward (models.llama_decode off)."""
    def wrapped():
        engine.lean_decode = False
        try:
            run()
        finally:
            engine.lean_decode = True
    return wrapped


def float32_products(run):
    """`run` with the engine's decode products in float32 whatever the CPU (cpu_linear's setting)."""
    def wrapped():
        before = os.environ.get("ALIGNKIT_DECODE_PRECISION")
        os.environ["ALIGNKIT_DECODE_PRECISION"] = "float32"
        try:
            run()
        finally:
            if before is None:
                del os.environ["ALIGNKIT_DECODE_PRECISION"]
            else:
                os.environ["ALIGNKIT_DECODE_PRECISION"] = before
    return wrapped


def linear_shapes(model, repeats: int) -> None:
    """Milliseconds per product for each distinct (in, out) projection of `model`: x W^T by F.linear,
    as (W x^T)^T, and by oneDNN on the packed weight, at several row counts (a decode step has one
    row per sequence)."""
    import torch
    import torch.nn.functional as F

    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = [1, 4, 8, 16, 32, 64, 128, 256]
    print("## One projection, ms per product: F.linear / rows-first / oneDNN packed (F.linear over oneDNN)")
    print(f"{'out x in':>14} " + " ".join(f"{r:>28}" for r in rows))
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        cells = []
        for r in rows:
            x = torch.randn(r, in_f)
            n = max(3, int(2e8 / (out_f * in_f * max(r, 8))))
            a = best_time(lambda: [F.linear(x, w) for _ in range(n)], repeats + 1) / n * 1e3
            b = best_time(lambda: [torch.mm(w, x.t()).t() for _ in range(n)], repeats + 1) / n * 1e3
            c = best_time(lambda: [torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                                   for _ in range(n)], repeats + 1) / n * 1e3
            cells.append(f"{a:6.3f}/{b:6.3f}/{c:6.3f} ({a / c:4.2f})")
        print(f"{out_f:>6} x {in_f:<5} " + " ".join(f"{c:>28}" for c in cells), flush=True)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--repeats", type=int, default=1, help="runs per figure; the fastest is kept")
    ap.add_argument("--quick", action="store_true", help="batches 1 and 32, 16 new tokens")
    ap.add_argument("--continuous-batching", action="store_true", help="also time transformers' generate_batch")
    ap.add_argument("--static-loop", action="store_true", help="also time a bare static-cache forward loop")
    ap.add_argument("--lean", action="store_true",
                    help="also time the engine with its decode steps through transformers' forward")
    ap.add_argument("--int8", action="store_true", help="also time the engine on int8 weight-only weights")
    ap.add_argument("--linear", action="store_true",
                    help="also time the engine without rows-first linears, and each projection shape alone")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.new_tokens = "1,32", 16

    import torch
    from transformers import GenerationConfig

    from alignkit.models import attach_lora, load_model, merge_lora
    from alignkit.models.cpu_linear import decode_precision
    from alignkit.models.generation import left_pad
    from alignkit.models.rollout import RolloutEngine, encode_prompts

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    precision = decode_precision()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU, load average {load:.1f} at start; "
          f"the engine's decode products in {precision}\n")

    bandwidth, gflops = machine_limits(args.repeats)
    base, tok = load_model("embedded", device="cpu")
    params = sum(p.numel() for p in base.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    flop_per_token = 2 * params
    print("## Machine limits (this run)")
    print(f"memory copy {bandwidth:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of weights read per decode step"
          f" -> {bandwidth * 1e9 / weight_bytes:.1f} tokens/s per row of the batch")
    print(f"matmul {gflops:.0f} GFLOP/s; {flop_per_token / 1e9:.2f} GFLOP per token -> "
          f"{gflops * 1e9 / flop_per_token:.0f} tokens/s\n")

    if args.linear:
        linear_shapes(base, args.repeats)
    policy = attach_lora(base, r=8, alpha=16, dropout=0.0).eval()  # as the PPO recipe's policy
    merged, _ = load_model("embedded", device="cpu")
    merged = merge_lora(attach_lora(merged, r=8, alpha=16, dropout=0.0)).eval()
    engine = RolloutEngine(policy, tok)
    n, eos = args.new_tokens, tok.eos_token_id
    if args.int8:
        import copy

        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        int8 = copy.deepcopy(merged)
        quantize_(int8, Int8WeightOnlyConfig())
        int8_engine = RolloutEngine(int8, tok, copy_weights=False)

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)

    def hf(model, ids, mask):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, generation_config=config)

    def eng(prompts, which=engine):
        def run():
            out = which.generate(prompts, max_new_tokens=n, min_new_tokens=n, temperature=1.0, seed=0)
            assert all(len(t) == n for t in out.tokens)
        return run

    @torch.inference_mode()
    def static_loop(ids, mask):
        from transformers import StaticCache

        model, P = engine.model, ids.shape[1]

        def run():
            cache = StaticCache(config=model.config, max_cache_len=P + n)
            attn = torch.cat([mask, torch.ones(len(ids), n, dtype=mask.dtype)], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           past_key_values=cache, logits_to_keep=1).logits[:, -1]
            for step in range(n):
                logits[:, eos] = float("-inf")
                token = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1)
                if step == n - 1:
                    break
                logits = model(input_ids=token, attention_mask=attn[:, :P + step + 1],
                               position_ids=mask.sum(1, keepdim=True) + step, past_key_values=cache,
                               logits_to_keep=1).logits[:, -1]
        return run

    def cb(prompt_ids):
        cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                               top_p=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        from transformers import ContinuousBatchingConfig

        # Sized here: left to itself the paged cache claims a share of the free memory (10 GB and an
        # out-of-memory kill on a 24 GB machine). One page of 256 tokens per row is enough.
        paged = ContinuousBatchingConfig(num_blocks=len(prompt_ids) + 2, max_batch_tokens=512,
                                         max_requests_per_batch=len(prompt_ids), use_cuda_graph=False)
        return lambda: merged.generate_batch(prompt_ids, generation_config=cfg, continuous_batching_config=paged,
                                             warmup=False)

    print(f"## Tokens/s, sampled at T=1, {n} new tokens per row (share of the limit at that batch)")
    names = {"a": "(a) peft", "b": "(b) merged", "c": "(c) engine"}
    if precision != "float32":
        names["p"] = "(p) engine f32"
    if args.lean:
        names["t"] = "(t) hf steps"
    if args.static_loop:
        names["s"] = "(s) static loop"
    if args.continuous_batching:
        names["d"] = "(d) gen_batch"
    if args.linear:
        names["f"] = "(f) F.linear"
    if args.int8:
        names["q"] = "(q) engine int8"
    header = f"{'batch':>5} {'limit':>7} " + " ".join(f"{v:>16}" for v in names.values())
    print(header + f" {'c/a':>6} {'c/b':>6}" + (f" {'c/s':>6}" if args.static_loop else ""))
    engine.generate(PROMPTS[:2], max_new_tokens=2)  # warm-up
    if args.int8:
        int8_engine.generate(PROMPTS[:2], max_new_tokens=2)
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
        prompt_ids = encode_prompts(tok, prompts, chat=True)
        ids, mask = left_pad(prompt_ids, tok.pad_token_id, "cpu")
        limit = min(batch * bandwidth * 1e9 / weight_bytes, gflops * 1e9 / flop_per_token)
        runs = {"a": hf(policy, ids, mask), "b": hf(merged, ids, mask), "c": eng(prompts)}
        if "p" in names:
            runs["p"] = float32_products(eng(prompts))
        if args.lean:
            runs["t"] = transformers_steps(engine, eng(prompts))
        if args.static_loop:
            runs["s"] = static_loop(ids, mask)
        if args.continuous_batching:
            runs["d"] = cb(prompt_ids)
        if args.linear:
            runs["f"] = plain_linears(eng(prompts))
        if args.int8:
            runs["q"] = eng(prompts, int8_engine)
        rate = {k: batch * n / best_time(fn, args.repeats) for k, fn in runs.items()}
        cells = " ".join(f"{rate[k]:8.1f} ({rate[k] / limit:4.0%})" for k in runs)
        ratios = f" {rate['c'] / rate['a']:5.2f}x {rate['c'] / rate['b']:5.2f}x"
        if args.static_loop:
            ratios += f" {rate['c'] / rate['s']:5.2f}x"
        print(f"{batch:5d} {limit:7.0f} {cells}{ratios}", flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; limits and paths were measured in this run.")
    print("targets: c/a >= 2x at batch 32 and 64; (c) at batch 1 >= 60% of its limit")


if __name__ == "__main__":
    main()
