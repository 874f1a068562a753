"""Supervised fine-tuning (LoRA or full) on prompt/completion or chat data, with exact resume.

    alignkit train sft --config configs/sft.yaml [key=value ...] [--resume RUN_DIR]
    torchrun --nproc_per_node 2 -m alignkit.cli train sft ...      # two CPU processes (gloo)

Setup -> train -> evaluate -> save, top to bottom. The global batch of each optimizer step is fixed
by (seed, step) alone and split evenly over processes and accumulation micro-batches; the loss is
normalised by the labelled-token count of the whole global batch. So 1 process x 2 accumulation
steps and 2 processes x 1 step make the same update, and a resumed run repeats the lost steps
exactly.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import SFTConfig
from alignkit.data.batching import global_batch, my_micro_batches
from alignkit.data.sft import IGNORE, Example, build_examples, collate
from alignkit.errors import AlignkitError
from alignkit.io import JsonlLog
from alignkit.losses.sft import sft_loss_sum
from alignkit.models import save_model
from alignkit.runs import METRICS_FILE
from alignkit.training import (checkpoint, load_trainable, make_accelerator, make_optimizer, open_run_dir,
                               resume_state)

log = logging.getLogger(__name__)


def count_labels(examples: list[Example], indices: list[int]) -> int:
    # Labels are shifted by one in the loss, so the first token can never be a target.
    return sum(sum(l != IGNORE for l in examples[i].labels[1:]) for i in indices)


def evaluate(model, examples: list[Example], pad_id: int, micro: int, accelerator) -> float:
    """Mean completion-token loss over `examples`, split across processes."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    with torch.no_grad():
        for start in range(0, len(mine), micro):
            batch = {k: v.to(accelerator.device) for k, v in
                     collate([examples[i] for i in mine[start:start + micro]], pad_id).items()}
            with accelerator.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, c = sft_loss_sum(logits, batch["labels"])
            total += torch.stack([s.double(), c.double()])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


def main(cfg: SFTConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Run SFT; returns the run directory (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    # ---- setup ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_trainable(cfg, accelerator.device)

    train, notes = build_examples(tokenizer, cfg.data.train, cfg.data.max_length)
    evals = build_examples(tokenizer, cfg.data.eval, cfg.data.max_length)[0] if cfg.data.eval else []
    for note in notes if main_proc else []:
        log.warning(note)
    global_size = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train) // global_size
    if steps_per_epoch == 0:
        raise AlignkitError(f"{cfg.data.train}: {len(train)} examples, fewer than one global batch of "
                            f"{global_size} (micro_batch_size x grad_accum x processes)")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    # The run directory is made only once model and data are known good.
    run_dir = open_run_dir(cfg, "sft", resume, overwrite, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    pad_id = tokenizer.pad_token_id
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None

    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    if main_proc:
        mode = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full fine-tuning"
        print(f"sft: model {cfg.model} ({n_all / 1e6:.1f}M params, {mode}: {n_train / 1e6:.2f}M trainable) | "
              f"{len(train)} train / {len(evals)} eval examples | global batch {global_size} "
              f"({world} process(es)) | {total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)

    # ---- train ---------------------------------------------------------------------------------
    t0 = time.time()
    if evals and start_step == 0:
        eval_before = round(evaluate(model, evals, pad_id, cfg.micro_batch_size, accelerator), 6)
        if main_proc:
            metrics.write({"step": 0, "eval_loss": eval_before})
    bar = tqdm(total=total_steps, initial=start_step, desc="sft", disable=not main_proc, unit="step")
    for step in range(start_step, total_steps):
        indices = global_batch(step, len(train), global_size, steps_per_epoch, cfg.seed)
        n_tokens = count_labels(train, indices)
        loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        micro_batches = my_micro_batches(indices, cfg.micro_batch_size, cfg.grad_accum, rank)
        for j, micro in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate([train[i] for i in micro], pad_id).items()}
            # DDP averages gradients over processes; multiplying by `world` turns that into a sum,
            # and dividing by the global token count makes it the global-batch mean.
            sync = j == len(micro_batches) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s, _ = sft_loss_sum(logits, batch["labels"])
                accelerator.backward(s * world / max(n_tokens, 1))
            loss_sum += s.detach().double()
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = (accelerator.reduce(loss_sum, reduction="sum") / max(n_tokens, 1)).item()
        done = step + 1
        record = {"step": done, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                  "tokens": n_tokens, "elapsed_s": round(time.time() - t0, 3)}
        if evals and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            record["eval_loss"] = round(evaluate(model, evals, pad_id, cfg.micro_batch_size, accelerator), 6)
        if main_proc:
            metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if done % cfg.save_every == 0 or done == total_steps:
            checkpoint(run_dir, done, total_steps, model, optimizer, scheduler, accelerator,
                       cfg.keep_checkpoints)
    bar.close()

    # ---- evaluate and save -----------------------------------------------------------------------
    summary = {"steps": total_steps, "final_train_loss": loss if total_steps > start_step else None}
    if evals:
        summary["eval_loss"] = round(evaluate(model, evals, pad_id, cfg.micro_batch_size, accelerator), 6)
        if main_proc:
            metrics.write({"step": total_steps, "eval_loss": summary["eval_loss"]})
    if main_proc:
        save_model(accelerator.unwrap_model(model), tokenizer, run_dir / "final")
        metrics.close()
        print(f"sft: done in {time.time() - t0:.1f}s | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f" | model saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
