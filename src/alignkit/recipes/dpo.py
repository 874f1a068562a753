"""Direct preference optimisation on pairs files, the offline alternative to PPO.

    alignkit train dpo --config configs/dpo.yaml [key=value ...] [--resume RUN_DIR]

Setup -> reference log-probs -> train -> evaluate -> save. The reference is the policy as loaded,
before any update: with fresh LoRA adapters that is exactly the base model (B starts at zero, the
"LoRA-disabled base"), and when training continues an SFT adapter it is that SFT model, as DPO
intends. Its log-probs are computed once, up front, so no second model sits in memory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import DPOConfig
from alignkit.data.batching import global_batch, my_micro_batches
from alignkit.data.prefs import encode_split, load_pairs
from alignkit.errors import AlignkitError
from alignkit.io import JsonlLog
from alignkit.losses.dpo import dpo_loss
from alignkit.models import save_model
from alignkit.models.generation import left_pad
from alignkit.models.logprobs import sequence_logprob
from alignkit.runs import METRICS_FILE
from alignkit.training import (checkpoint, evaluate_pairs, load_trainable, make_accelerator, make_optimizer,
                               open_run_dir, pairwise_backward, resume_state)


def encode(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    out = []
    for p in pairs:
        (c_ids, c_prompt), (r_ids, r_prompt) = (encode_split(tokenizer, p["prompt"], p[k], max_length)
                                                for k in ("chosen", "rejected"))
        out.append({"chosen": c_ids, "chosen_prompt": c_prompt, "rejected": r_ids, "rejected_prompt": r_prompt})
    return out


def batch_logprobs(model, batch: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, each (B,), in one forward pass."""
    seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    n_prompt = [b["chosen_prompt"] for b in batch] + [b["rejected_prompt"] for b in batch]
    ids, mask = left_pad(seqs, pad_id, device)
    width = ids.shape[1]
    # Completion tokens: after the (left padding +) prompt of each row.
    starts = torch.tensor([width - len(s) + n for s, n in zip(seqs, n_prompt)], device=device)
    target = (torch.arange(width, device=device)[None, :] >= starts[:, None]).long() * mask
    logp = sequence_logprob(model, ids, mask, target)
    return logp[:len(batch)], logp[len(batch):]


@torch.no_grad()
def reference_logprobs(model, data: list[dict], pad_id: int, micro: int, device) -> None:
    """Store the reference's summed log-probs in each example (model in eval mode: no dropout)."""
    model.eval()
    for start in tqdm(range(0, len(data), micro), desc="reference log-probs", unit="batch"):
        batch = data[start:start + micro]
        c, r = batch_logprobs(model, batch, pad_id, device)
        for b, ci, ri in zip(batch, c.tolist(), r.tolist()):
            b["ref_chosen"], b["ref_rejected"] = ci, ri
    model.train()


def pair_terms(model, batch: list[dict], pad_id: int, device, beta: float):
    """Per-pair DPO loss and implicit-reward margin, each (B,)."""
    c, r = batch_logprobs(model, batch, pad_id, device)
    ref_c = torch.tensor([b["ref_chosen"] for b in batch], device=device)
    ref_r = torch.tensor([b["ref_rejected"] for b in batch], device=device)
    return dpo_loss(c, r, ref_c, ref_r, beta)


def main(cfg: DPOConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Train with DPO; returns the run directory (final/ holds the policy adapter or weights)."""
    # ---- setup ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_trainable(cfg, accelerator.device)
    pad_id = tokenizer.pad_token_id

    train = encode(tokenizer, load_pairs(cfg.data.train), cfg.data.max_length)
    evals = encode(tokenizer, load_pairs(cfg.data.eval), cfg.data.max_length) if cfg.data.eval else []
    global_size = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train) // global_size
    if steps_per_epoch == 0:
        raise AlignkitError(f"{cfg.data.train}: {len(train)} pairs, fewer than one global batch of {global_size}")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    # ---- reference log-probs, from the policy before any update ---------------------------------
    reference_logprobs(model, train + evals, pad_id, cfg.micro_batch_size, accelerator.device)

    run_dir = open_run_dir(cfg, "dpo", resume, overwrite, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None
    if main_proc:
        print(f"dpo: model {cfg.model} (beta {cfg.beta}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable) | "
              f"{len(train)} train / {len(evals)} eval pairs | global batch {global_size} ({world} process(es)) | "
              f"{total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)

    def terms(m, batch):
        return pair_terms(m, batch, pad_id, accelerator.device, cfg.beta)

    def run_eval() -> dict:
        return evaluate_pairs(model, evals, cfg.micro_batch_size, terms, accelerator)

    # ---- train ---------------------------------------------------------------------------------
    t0 = time.time()
    if evals and start_step == 0:
        before = run_eval()
        if main_proc:
            metrics.write({"step": 0, **before})
    bar = tqdm(total=total_steps, initial=start_step, desc="dpo", disable=not main_proc, unit="step")
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
        save_model(accelerator.unwrap_model(model), tokenizer, run_dir / "final")
        metrics.close()
        shown = " | ".join(f"{k} {v:.4f}" for k, v in summary.items())
        print(f"dpo: done in {time.time() - t0:.1f}s | {shown} | model saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
