"""Reward model: a causal-LM backbone (LoRA or full) with a scalar head, trained on preference pairs.

    alignkit train reward --config configs/reward.yaml [key=value ...] [--resume RUN_DIR]

Setup -> train -> evaluate -> save, top to bottom, like the SFT recipe: the global batch of each
step is fixed by (seed, step), the loss is a mean over the pairs of the whole global batch, and a
checkpoint (trainable weights including the head, optimizer, scheduler, RNG, step) resumes exactly.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import torch

from alignkit.config import RewardConfig
from alignkit.data.prefs import encode_response, load_pairs
from alignkit.errors import AlignkitError
from alignkit.losses.reward import bradley_terry_loss, reward_centering, soft_bradley_terry_loss
from alignkit.models import ScalarHeadModel
from alignkit.models.generation import left_pad
from alignkit.models.shared_prefix import split_shared_prefix
from alignkit.training import fit_pairwise, load_trainable, make_accelerator, make_optimizer, open_run_dir, resume_state

log = logging.getLogger(__name__)


def encode_pairs(tokenizer, pairs: list[dict], max_length: int, use_margin: bool) -> list[dict]:
    return [{"chosen": encode_response(tokenizer, p["prompt"], p["chosen"], max_length),
             "rejected": encode_response(tokenizer, p["prompt"], p["rejected"], max_length),
             "margin": float(p.get("margin") or 0.0) if use_margin else 0.0,
             "p_chosen": float(p.get("p_chosen", 1.0))} for p in pairs]


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded `fraction` of the distinct prompts, at least one, goes to the held-out
    side with all its pairs, so held-out accuracy is measured on prompts the model never trained on."""
    prompts = sorted({p["prompt"] for p in pairs})
    if len(prompts) < 2:
        raise AlignkitError(f"eval_fraction needs pairs from at least 2 prompts, got {len(prompts)}")
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(fraction * len(prompts)))])
    return [p for p in pairs if p["prompt"] not in held], [p for p in pairs if p["prompt"] in held]


def pair_scores(model, batch: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, each (B,), from one forward pass over all 2B sequences."""
    rows = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    # The two replies of a pair share their prompt: it is read once (models.shared_prefix), same scores.
    split = split_shared_prefix(rows, list(range(len(batch))) * 2, [len(r) - 1 for r in rows], pad_id, device)
    scores = model(None, None, per_token=False, split=split) if split is not None \
        else model(*left_pad(rows, pad_id, device), per_token=False)
    return scores[:len(batch)], scores[len(batch):]


def pair_terms(model, batch: list[dict], pad_id: int, device, center_coef: float, soft_labels: bool = False):
    """Per-pair loss (Bradley-Terry with margin, or with soft labels; plus centering) and reward margin, each (B,)."""
    rc, rr = pair_scores(model, batch, pad_id, device)
    if soft_labels:
        p = torch.tensor([b["p_chosen"] for b in batch], device=rc.device)
        loss = soft_bradley_terry_loss(rc, rr, p)
    else:
        loss = bradley_terry_loss(rc, rr, torch.tensor([b["margin"] for b in batch], device=rc.device))
    return loss + center_coef * reward_centering(rc, rr), rc - rr


def main(cfg: RewardConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Train a reward model; returns the run directory (final/ loads with ScalarHeadModel.from_pretrained,
    or with PooledHeadModel.from_pretrained when `frozen` is set: recipes/reward_frozen.py)."""
    if cfg.frozen is not None:
        from alignkit.recipes import reward_frozen

        return reward_frozen.main(cfg, resume=resume, overwrite=overwrite)
    # ---- setup ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    world, main_proc = accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    backbone, tokenizer = load_trainable(cfg, accelerator.device)
    model = ScalarHeadModel(backbone)  # the head is always trained
    model.train()

    train_pairs, eval_pairs = load_pairs(cfg.data.train), load_pairs(cfg.data.eval) if cfg.data.eval else []
    if not cfg.data.eval and cfg.data.eval_fraction > 0:
        train_pairs, eval_pairs = split_by_prompt(train_pairs, cfg.data.eval_fraction, cfg.seed)
    train = encode_pairs(tokenizer, train_pairs, cfg.data.max_length, cfg.use_margin)
    evals = encode_pairs(tokenizer, eval_pairs, cfg.data.max_length, cfg.use_margin)
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

    def terms(m, batch):
        return pair_terms(m, batch, pad_id, accelerator.device, cfg.center_coef, cfg.soft_labels)

    # ---- train and evaluate ------------------------------------------------------------------
    summary, seconds = fit_pairwise("reward", cfg, model, train, evals, terms, accelerator, run_dir, params, optimizer,
                                    scheduler, start_step, total_steps)

    # ---- save ------------------------------------------------------------------------------------
    if main_proc:
        accelerator.unwrap_model(model).save_pretrained(run_dir / "final", tokenizer)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in summary.items()) or "no eval set"
        if evals:
            print(f"reward: held-out pair accuracy {summary['eval_accuracy']:.3f} on {len(evals)} pairs "
                  f"(the share of held-out pairs where the chosen reply scores higher)", flush=True)
        print(f"reward: done in {seconds:.1f}s | {shown} | model saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
