"""Benchmark the shared-prefix forward pass (models/shared_prefix.py) against the plain pass over whole rows,
on the embedded model with the demo's shapes, both measured in the same process, alternating.

    python bench/bench_shared_prefix.py [--rounds 3] [--threads 2]

Work, as in `make demo`:
  grpo reference   8 shipped training prompts x 4 sampled replies of up to 48 tokens, log-probs of the
                   replies, no gradient (GRPO's reference pass)
  grpo update      the same rows with the LoRA adapter (r 16, all linear layers) and gradient: forward
                   + backward of the summed reply log-probs (GRPO's fused update pass)
  pairs update     8 chosen/rejected pairs (16 rows) of a reward model's training step: the scalar at
                   each row's last token, forward + backward (the pair shares its prompt)
Each case prints seconds per pass for both sides (median over rounds), the ratio, the tokens each pass
reads, and the largest difference of the outputs (they must agree up to float rounding). Prints
figures; it is not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from alignkit.data.prompts import load_prompts
    from alignkit.models import load_model
    from alignkit.models.generation import left_pad
    from alignkit.models.heads import ScalarHeadModel
    from alignkit.models.lora import attach_lora
    from alignkit.models.shared_prefix import forward_shared, split_shared_prefix
    from alignkit.models.rollout import RolloutEngine
    from alignkit.online import tail_logprobs

    root = Path(__file__).resolve().parents[1]
    prompts = load_prompts(root / "src/alignkit/data/examples/service_train.txt")[:8]
    model, tok = load_model("embedded", device="cpu", dtype="float32")
    gen = RolloutEngine(model, tok).generate(prompts, n=4, max_new_tokens=48,
                                             temperature=0.7, seed=0)
    rows = [p + (t or [tok.eos_token_id]) for p, t in zip(gen.prompt_ids, gen.tokens)]
    groups = [i // 4 for i in range(len(rows))]
    keep = max(len(r) - len(p) for r, p in zip(rows, gen.prompt_ids))
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    split = split_shared_prefix(rows, groups, [len(p) - 1 for p in gen.prompt_ids], tok.pad_token_id, "cpu")
    tail_tokens = int(split.tail_mask.sum()) + int(split.prefix_mask.sum())
    policy = attach_lora(model, r=16, alpha=32, dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def shared_logp():
        out = forward_shared(policy, split, logits_to_keep=keep + 1)
        logits = out.logits[:, -keep - 1:-1].float()
        return (logits.gather(2, split.tail_ids[:, -keep:, None]) - logits.logsumexp(-1, keepdim=True)).squeeze(2)

    def plain_logp():
        return tail_logprobs(policy, ids, mask, 1.0, keep)

    resp = torch.tensor([[1 if c >= keep - (len(r) - len(p)) else 0 for c in range(keep)]
                         for r, p in zip(rows, gen.prompt_ids)])

    def ref(fn):
        def run():
            with torch.no_grad(), policy.disable_adapter():
                return fn()
        return run

    def update(fn):
        def run():
            out = fn()
            (out * resp).sum().backward()
            policy.zero_grad(set_to_none=True)
            return out.detach()
        return run

    # reward-model pairs: (chosen, rejected) = two replies of the same prompt
    head = ScalarHeadModel(policy)
    pair_rows = [rows[4 * i + j] for i in range(8) for j in (0, 1)]
    pids, pmask = left_pad(pair_rows, tok.pad_token_id, "cpu")
    psplit = split_shared_prefix(pair_rows, [i // 2 for i in range(16)], [len(r) - 1 for r in pair_rows],
                                 tok.pad_token_id, "cpu")

    def pair_update(shared):
        def run():
            out = head(None, None, per_token=False, split=psplit) if shared else head(pids, pmask, per_token=False)
            out.sum().backward()
            head.zero_grad(set_to_none=True)
            return out.detach()
        return run

    cases = [("grpo reference", ref(plain_logp), ref(shared_logp), int(mask.sum()), tail_tokens, resp),
             ("grpo update", update(plain_logp), update(shared_logp), int(mask.sum()), tail_tokens, resp),
             ("pairs update", pair_update(False), pair_update(True), int(pmask.sum()),
              int(psplit.tail_mask.sum()) + int(psplit.prefix_mask.sum()), None)]
    print(f"embedded model, {args.threads} thread(s), {args.rounds} round(s); 8 prompts x 4 replies, "
          f"replies up to {keep} tokens")
    print(f"{'case':<16}{'plain s':>10}{'shared s':>10}{'speed-up':>10}{'tokens plain':>14}{'shared':>8}"
          f"{'max |diff|':>12}")
    for name, plain, shared, n_plain, n_shared, valid in cases:
        times = {"plain": [], "shared": []}
        outs = {}
        plain(), shared()  # warm-up
        for _ in range(args.rounds):
            for side, fn in (("plain", plain), ("shared", shared)):
                t = time.perf_counter()
                outs[side] = fn()
                times[side].append(time.perf_counter() - t)
        diff = outs["plain"] - outs["shared"]
        if valid is not None:
            diff = diff * valid
        p, s = statistics.median(times["plain"]), statistics.median(times["shared"])
        print(f"{name:<16}{p:>10.2f}{s:>10.2f}{p / s:>9.2f}x{n_plain:>14}{n_shared:>8}{diff.abs().max().item():>12.2e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
