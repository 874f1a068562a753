"""Benchmark the reward model on the embedded model: training throughput (pairs/s) and scoring
throughput (completions/s), each beside a plain transformers peer measured in the same run
(LlamaForSequenceClassification from the same weights, same LoRA, same batches).

    python bench/bench_reward.py [--steps 4] [--threads 2]

Prints figures; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "src" / "alignkit" / "data" / "examples" / "shop_pairs.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from alignkit.config import RewardConfig, load_config
    from alignkit.data.batching import global_batch
    from alignkit.data.prefs import encode_response
    from alignkit.losses.reward import bradley_terry_loss
    from alignkit.models import ScalarHeadModel, load_model
    from alignkit.models.generation import left_pad
    from alignkit.models.loading import resolve_base
    from alignkit.recipes import reward

    torch.set_num_threads(args.threads)
    pairs = [json.loads(l) for l in PAIRS.read_text().splitlines()]
    batch = 8  # pairs per step, so 16 sequences per forward pass
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    print(f"torch {torch.__version__}, {args.threads} threads, CPU; batch {batch} pairs, LoRA r=8 on {targets}\n")

    # ---- ours: the recipe itself, throughput read from its own metrics (setup excluded) ----------
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "rm.yaml"
        cfg_path.write_text(json.dumps({
            "model": "embedded", "data": {"train": str(PAIRS), "max_length": 256}, "output_dir": tmp,
            "run_name": "bench", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets},
            "micro_batch_size": batch, "max_steps": args.steps + 1, "save_every": 1000, "device": "cpu"}))
        run_dir = reward.main(load_config(RewardConfig, cfg_path))
        recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        # step 1 includes warm-up; time steps 2.. from the elapsed clock
        ours_s = (recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]) / args.steps
    ours_train = batch / ours_s

    # ---- peer: plain transformers sequence classifier + peft + the same loss ---------------------
    base_dir = resolve_base("embedded")
    _, tok = load_model("embedded", device="cpu")
    peer = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1, dtype=torch.float32)
    peer.config.pad_token_id = tok.pad_token_id
    peer = get_peft_model(peer, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                           target_modules=targets))
    opt = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=5e-4)
    tok.padding_side = "right"

    def peer_step(chunk):
        texts = [encode_response(tok, p["prompt"], p[k], 256) for k in ("chosen", "rejected") for p in chunk]
        width = max(map(len, texts))
        ids = torch.tensor([t + [tok.pad_token_id] * (width - len(t)) for t in texts])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(t) for t in texts])[:, None]).long()
        scores = peer(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        loss = bradley_terry_loss(scores[:len(chunk)], scores[len(chunk):]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    # The recipe's own batches, so both sides see the same sequence lengths.
    steps_per_epoch = len(pairs) // batch
    same = [[pairs[i] for i in global_batch(s, len(pairs), batch, steps_per_epoch, 0)] for s in range(args.steps + 1)]
    peer.train()
    peer_step(same[0])  # warm-up, as the recipe's step 1 is left out of its timing
    t = time.perf_counter()
    for chunk in same[1:]:
        peer_step(chunk)
    peer_train = batch * args.steps / (time.perf_counter() - t)

    # ---- scoring ---------------------------------------------------------------------------------
    base, tok2 = load_model("embedded", device="cpu")
    rm = ScalarHeadModel(base)
    prompts = [p["prompt"] for p in pairs] * 2
    comps = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    rm.score_texts(tok2, prompts[:16], comps[:16])  # warm-up
    t = time.perf_counter()
    rm.score_texts(tok2, prompts, comps, batch_size=16)
    ours_score = len(comps) / (time.perf_counter() - t)
    peer.eval()
    with torch.no_grad():
        t = time.perf_counter()
        for start in range(0, len(comps), 16):
            texts = [encode_response(tok, p, c, 256) for p, c in zip(prompts[start:start + 16], comps[start:start + 16])]
            width = max(map(len, texts))
            ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in texts])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(x) for x in texts])[:, None]).long()
            peer(input_ids=ids, attention_mask=mask)
        peer_score = len(comps) / (time.perf_counter() - t)

    print(f"{'':<28} | {'alignkit':>9} | {'plain HF':>9} | ratio")
    print(f"{'training, pairs/s':<28} | {ours_train:>9.2f} | {peer_train:>9.2f} | {ours_train / peer_train:.2f}x")
    print(f"{'scoring, completions/s':<28} | {ours_score:>9.1f} | {peer_score:>9.1f} | {ours_score / peer_score:.2f}x")


if __name__ == "__main__":
    main()
