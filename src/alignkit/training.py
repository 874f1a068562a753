"""Pieces every training recipe shares: accelerator, trainable model, run directory, optimizer,
checkpoint save/restore. Plain functions a recipe calls in order; the loop stays in the recipe."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from functools import lru_cache
from pathlib import Path

import torch

from alignkit.checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from alignkit.config import TrainSettings, dump_config
from alignkit.errors import AlignkitError
from alignkit.io import truncate_jsonl_after
from alignkit.models import attach_lora, load_model, resolve_device
from alignkit.models.lora import fused_lora_products
from alignkit.runs import CONFIG_FILE, METRICS_FILE, new_run_dir


def make_accelerator(cfg: TrainSettings):
    """An Accelerator on the configured device; weights stay float32, bf16 autocast on CUDA. On a CPU,
    the process's allocator keeps freed memory for reuse from here on (`keep_freed_memory`)."""
    from accelerate import Accelerator

    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    use_bf16 = device.type == "cuda" and cfg.dtype in ("auto", "bfloat16")
    return Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if use_bf16 else "no")


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_OTHER_ALLOCATOR = ("jemalloc", "tcmalloc", "mimalloc")


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees, to serve the next step's tensors,
    instead of handing it back to the kernel and faulting it in again, zeroed, page by page.

    A forward pass with gradients keeps every layer's activations alive until the backward pass frees
    them. glibc serves each tensor over its mmap threshold (at most 32 MB; a 384 x 49152 logits
    tensor is 75 MB) with its own mmap and returns it with munmap when freed, and trims the top of its
    heap, so every step maps and zeroes the same memory anew: at the demo's PPO shape (8 rows x about
    90 tokens on the embedded model, on a 2-core CPU) about 95 thousand page faults, 0.35 s of kernel
    time, per update. With mmap off for allocations (M_MMAP_MAX 0) and trimming only past 2 GB
    (M_TRIM_THRESHOLD), the heap grows over the first steps and then serves them from memory already
    faulted in (0-18 thousand faults per update; a 64 MB tensor is reused from its fifth allocation
    on, the earlier freed blocks being a little short of the next aligned request): the update ran
    5-40% faster in three pairs of runs, and whole steps 1.21x faster in a benchmark run
    (bench/bench_ppo.py). The cost: the process keeps its peak heap (2-5% more resident memory at
    that shape). PyTorch's CPU launcher (torch.backends.xeon.run_cpu) does the same with jemalloc set
    never to return memory. The mallopt settings last for the whole process; memory already mapped is
    untouched. Nothing is changed where the allocator is not glibc's, where another allocator is
    preloaded, or where the environment already sets malloc's parameters (MALLOC_* or
    GLIBC_TUNABLES with glibc.malloc). Returns whether the settings were applied."""
    if any(k.startswith("MALLOC_") for k in os.environ) or \
            "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or \
            any(name in os.environ.get("LD_PRELOAD", "") for name in _OTHER_ALLOCATOR):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc's parameters only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def load_trainable(cfg: TrainSettings, device):
    """(model, tokenizer) with LoRA attached (or an adapter made trainable), or every weight trainable."""
    model, tokenizer = load_model(cfg.model, device=device, dtype="float32", trainable_adapter=cfg.lora.enabled)
    if cfg.lora.enabled and not hasattr(model, "peft_config"):
        model = attach_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                            target_modules=cfg.lora.target_modules)
    elif not cfg.lora.enabled:
        if hasattr(model, "peft_config"):
            raise AlignkitError(f"model '{cfg.model}' is an adapter; full fine-tuning needs a full model "
                                "(merge it first: alignkit models merge)")
        model.requires_grad_(True)
    fused_lora_products(model)  # a loaded adapter's layers too (attach_lora patches its own)
    if torch.device(device).type == "cpu" and cpu_train_precision(cfg.dtype) == "bfloat16":
        bf16_frozen_products(model, quiet=cfg.dtype == "auto")
    model.train()
    return model, tokenizer


def cpu_train_precision(dtype: str) -> str:
    """The precision of the frozen weights' products when training on a CPU: `dtype` itself, or for
    "auto" bfloat16 where the CPU multiplies bfloat16 on AMX tiles and float32 elsewhere (as the
    rollout engine's decode products do). The environment variable ALIGNKIT_TRAIN_PRECISION
    ("auto", "float32" or "bfloat16") overrides "auto" for a process and its children (the tests set
    float32, so that a test trains the same on every CPU)."""
    from alignkit.models import cpu_linear

    if dtype != "auto":
        return dtype
    try:
        return cpu_linear.precision_from_env("ALIGNKIT_TRAIN_PRECISION")
    except ValueError as e:
        raise AlignkitError(str(e)) from None


def bf16_frozen_products(model, quiet: bool = False) -> None:
    """Frozen-weight products in bfloat16 on a CPU (models.cpu_linear): the trainable weights,
    attention, norms and the loss stay float32. Worth it where the CPU multiplies bfloat16 on AMX
    tiles; elsewhere it is slower than float32, and said so (`quiet`: "auto" chose it, say nothing)."""
    from alignkit.models.cpu_linear import cpu_has_amx_bf16, frozen_products_in_bf16

    if frozen_products_in_bf16(model) == 0:
        if not quiet:
            print("dtype bfloat16: no frozen linear layer to multiply in bfloat16 (full fine-tuning trains in float32)")
    elif not cpu_has_amx_bf16():
        print("dtype bfloat16: this CPU has no AMX bfloat16 tiles, so its bfloat16 products run slower than "
              "float32 (dtype float32 or auto is faster here)")


def open_run_dir(cfg: TrainSettings, prefix: str, resume: Path | None, overwrite: bool, accelerator) -> Path:
    """The run directory every process agrees on (the main process picks it and saves the config)."""
    from accelerate.utils import broadcast_object_list

    picked = [None]
    if accelerator.is_main_process:
        picked[0] = str(resume) if resume else str(new_run_dir(cfg.output_dir, cfg.run_name, prefix, overwrite))
        if not resume:
            dump_config(cfg, Path(picked[0]) / CONFIG_FILE)
    return Path(broadcast_object_list(picked)[0])


def make_optimizer(params, cfg: TrainSettings, total_steps: int):
    """AdamW and the configured warm-up + decay schedule."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    return optimizer, scheduler


def resume_state(run_dir: Path, resume: Path | None, model, optimizer, scheduler, accelerator) -> int:
    """Restore the newest checkpoint when resuming; trim metrics logged after it. Returns the start step."""
    start = 0
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if resume and checkpoints:
        start = load_checkpoint(checkpoints[-1], model=accelerator.unwrap_model(model), optimizer=optimizer,
                                scheduler=scheduler, rank=accelerator.process_index)["step"]
    if accelerator.is_main_process:
        truncate_jsonl_after(run_dir / METRICS_FILE, start)
    return start


def checkpoint(run_dir: Path, step: int, total_steps: int, model, optimizer, scheduler, accelerator,
               keep: int, extra_state: dict | None = None) -> None:
    """Save step `step` (every process's RNG state included); all processes call this.
    `extra_state` (JSON-able, e.g. a KL controller) is stored in trainer_state.json."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])
    if accelerator.is_main_process:
        save_checkpoint(run_dir / "checkpoints" / f"step-{step:06d}", model=accelerator.unwrap_model(model),
                        optimizer=optimizer, scheduler=scheduler, rng_states=rngs,
                        state={"step": step, "total_steps": total_steps,
                               "world_size": accelerator.num_processes, **(extra_state or {})}, keep=keep)
    accelerator.wait_for_everyone()


def fit_pairwise(name: str, cfg: TrainSettings, model, train: list, evals: list, terms, accelerator, run_dir: Path,
                 params, optimizer, scheduler, start_step: int, total_steps: int) -> tuple[dict, float]:
    """The training loop of a pairwise objective (reward model, DPO): steps start_step..total_steps
    with eval before, every cfg.eval_every steps and after, metrics in run_dir, checkpoints.

    `terms(model, batch) -> (per-pair loss, per-pair margin)`. Returns (final eval summary, seconds).
    """
    import time

    from tqdm.auto import tqdm

    from alignkit.data.batching import global_batch, my_micro_batches
    from alignkit.io import JsonlLog

    main_proc = accelerator.is_main_process
    global_size = cfg.micro_batch_size * cfg.grad_accum * accelerator.num_processes
    steps_per_epoch = len(train) // global_size
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None

    def run_eval() -> dict:
        return evaluate_pairs(model, evals, cfg.micro_batch_size, terms, accelerator)

    t0 = time.time()
    if evals and start_step == 0:
        before = run_eval()
        if main_proc:
            metrics.write({"step": 0, **before})
    bar = tqdm(total=total_steps, initial=start_step, desc=name, disable=not main_proc, unit="step")
    for step in range(start_step, total_steps):
        indices = global_batch(step, len(train), global_size, steps_per_epoch, cfg.seed)
        micro_batches = [[train[i] for i in micro] for micro in
                         my_micro_batches(indices, cfg.micro_batch_size, cfg.grad_accum, accelerator.process_index)]
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
    summary = run_eval() if evals else {}
    if main_proc:
        if evals:
            metrics.write({"step": total_steps, **summary})
        metrics.close()
    return summary, time.time() - t0


def pairwise_backward(model, micro_batches: list[list], terms, accelerator, n_global: int) -> dict:
    """Backward pass of a pairwise objective over this process's micro-batches of one optimizer step.

    The gradient is that of the mean loss over the whole global batch of `n_global` pairs (DDP
    averages over processes, hence the factor `num_processes`); gradients are synchronised on the
    last micro-batch only. Returns the global batch's mean loss, accuracy and margin.
    """
    import contextlib

    world = accelerator.num_processes
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, margin
    for j, batch in enumerate(micro_batches):
        sync = j == len(micro_batches) - 1
        with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), accelerator.autocast():
            per_pair, margin = terms(model, batch)
            accelerator.backward(per_pair.sum() * world / n_global)
        sums += torch.stack([per_pair.detach().sum().double(), (margin > 0).sum().double(),
                             margin.detach().sum().double()])
    sums = accelerator.reduce(sums, reduction="sum") / n_global
    return {"loss": round(sums[0].item(), 6), "accuracy": round(sums[1].item(), 6),
            "margin": round(sums[2].item(), 6)}


def evaluate_pairs(model, pairs: list, micro: int, terms, accelerator) -> dict:
    """Held-out loss, accuracy and margin of a pairwise objective, split across processes.

    `terms(model, batch) -> (per-pair loss, per-pair margin)`, each (B,); a pair counts as right
    when its margin (chosen minus rejected) is positive.
    """
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, correct, margin, n
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    with torch.no_grad():
        for start in range(0, len(mine), micro):
            batch = [pairs[i] for i in mine[start:start + micro]]
            with accelerator.autocast():
                loss, margin = terms(model, batch)
            total += torch.stack([loss.sum().double(), (margin > 0).sum().double(), margin.sum().double(),
                                  torch.tensor(float(len(batch)), dtype=torch.float64, device=loss.device)])
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    n = total[3].clamp(min=1)
    return {"eval_loss": round((total[0] / n).item(), 6), "eval_accuracy": round((total[1] / n).item(), 6),
            "eval_margin": round((total[2] / n).item(), 6)}
