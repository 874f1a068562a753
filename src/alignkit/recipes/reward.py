"""Reward model: a causal-LM backbone (LoRA or full) with a scalar head, trained on preference pairs.

    alignkit train reward --config configs/reward.yaml [key=value ...] [--resume RUN_DIR]

Setup -> train -> evaluate -> save, top to bottom, like the SFT recipe: the global batch of each
step is fixed by (seed, step), the loss is a mean over the pairs of the whole global batch, and a
checkpoint (trainable weights including the head, optimizer, scheduler, RNG, step) resumes exactly.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import RewardConfig
from alignkit.data.batching import global_batch, my_micro_batches
from alignkit.data.prefs import encode_response, load_pairs
from alignkit.errors import AlignkitError
from alignkit.io import JsonlLog
from alignkit.losses.reward import bradley_terry_loss, reward_centering
from alignkit.models import ScalarHeadModel
from alignkit.models.generation import left_pad
from alignkit.runs import METRICS_FILE
from alignkit.training import (checkpoint, evaluate_pairs, load_trainable, make_accelerator, make_optimizer,
                               open_run_dir, pairwise_backward, resume_state)

log = logging.getLogger(__name__)


def encode_pairs(tokenizer, pairs: list[dict], max_length: int, use_margin: bool) -> list[dict]:
    return [{"chosen": encode_response(tokenizer, p["prompt"], p["chosen"], max_length),
             "rejected": encode_response(tokenizer, p["prompt"], p["rejected"], max_length),
             "margin": float(p.get("margin") or 0.0) if use_margin else 0.0} for p in pairs]


def pair_scores(model, batch: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, each (B,), from one forward pass over all 2B sequences."""
    ids, mask = left_pad([b["chosen"] for b in batch] + [b["rejected"] for b in batch], pad_id, device)
    scores = model(ids, mask, per_token=False)
    return scores[:len(batch)], scores[len(batch):]


def pair_terms(model, batch: list[dict], pad_id: int, device, center_coef: float):
    """Per-pair loss (Bradley-Terry with margin, plus centering) and reward margin, each (B,)."""
    rc, rr = pair_scores(model, batch, pad_id, device)
    margin = torch.tensor([b["margin"] for b in batch], device=rc.device)
    return bradley_terry_loss(rc, rr, margin) + center_coef * reward_centering(rc, rr), rc - rr


def main(cfg: RewardConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Train a reward model; returns the run directory (final/ loads with ScalarHeadModel.from_pretrained)."""
    # ---- setup ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_trainable(cfg, accelerator.device)
    model = ScalarHeadModel(backbone)  # the head is always trained
    model.train()

    train = encode_pairs(tokenizer, load_pairs(cfg.data.train), cfg.data.max_length, cfg.use_margin)
    evals = (encode_pairs(tokenizer, load_pairs(cfg.data.eval), cfg.data.max_length, cfg.use_margin)
             if cfg.data.eval else [])
    global_size = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train) // global_size
    if steps_per_epoch == 0:
        raise AlignkitError(f"{cfg.data.train}: {len(train)} pairs, fewer than one global batch of {global_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    run_dir = open_run_dir(cfg, "reward", resume, overwrite, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    if main_proc:
        n_train = sum(p.numel() for p in params)
        mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full fine-tuning"
        print(f"reward: model {cfg.model} ({mode} + scalar head: {n_train / 1e6:.2f}M trainable) | "
              f"{len(train)} train / {len(evals)} eval pairs | global batch {global_size} ({world} process(es)) | "
              f"{total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None

    def terms(m, batch):
        return pair_terms(m, batch, pad_id, accelerator.device, cfg.center_coef)

    def run_eval() -> dict:
        return evaluate_pairs(model, evals, cfg.micro_batch_size, terms, accelerator)

    # ---- train ---------------------------------------------------------------------------------
    t0 = time.time()
    if evals and start_step == 0:
        before = run_eval()
        if main_proc:
            metrics.write({"step": 0, **before})
    bar = tqdm(total=total_steps, initial=start_step, desc="reward", disable=not main_proc, unit="step")
    for step in range(start_step, total_steps):
        indices = global_batch(step, len(train), global_size, steps_per_epoch, cfg.seed)
        micro_batches = [[train[i] for i in micro]
                         for micro in my_micro_batches(indices, cfg.micro_batch_size, cfg.grad_accum, rank)]
        stats = pairwise_backward(model, micro_batches, terms, accelerator, len(indices))
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, **stats, "lr": lr, "grad_norm": round(float(grad_norm), 6),
                  "elapsed_s": round(time.time() - t0, 3)}
        if evals and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            record.update(run_eval())
        if main_proc:
            metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.2f}")
        bar.update(1)
        if done % cfg.save_every == 0 or done == total_steps:
            checkpoint(run_dir, done, total_steps, model, optimizer, scheduler, accelerator, cfg.keep_checkpoints)
    bar.close()

    # ---- evaluate and save -----------------------------------------------------------------------
    summary = run_eval() if evals else {}
    if main_proc:
        if evals:
            metrics.write({"step": total_steps, **summary})
        accelerator.unwrap_model(model).save_pretrained(run_dir / "final", tokenizer)
        metrics.close()
        shown = " | ".join(f"{k} {v:.4f}" for k, v in summary.items())
        print(f"reward: done in {time.time() - t0:.1f}s | {shown} | model saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
