"""Direct preference optimisation on pairs files, the offline alternative to PPO.

    alignkit train dpo --config configs/dpo.yaml [key=value ...] [--resume RUN_DIR]

Setup -> reference log-probs -> train -> evaluate -> save. The reference is the policy as loaded,
before any update: with fresh LoRA adapters that is exactly the base model (B starts at zero, the
"LoRA-disabled base"), and when training continues an SFT adapter it is that SFT model, as DPO
intends. Its log-probs are computed once, up front, for the pairs the run's steps will draw, so no
second model sits in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.config import DPOConfig
from alignkit.data.batching import global_batch
from alignkit.data.prefs import encode_split, load_pairs
from alignkit.errors import AlignkitError
from alignkit.losses.dpo import dpo_loss
from alignkit.models import save_model
from alignkit.models.generation import left_pad
from alignkit.models.logprobs import sequence_logprob, shared_sequence_logprob
from alignkit.models.shared_prefix import split_shared_prefix
from alignkit.training import fit_pairwise, load_trainable, make_accelerator, make_optimizer, open_run_dir, resume_state


def encode(tokenizer, pairs: list[dict], max_length: int) -> list[dict]:
    out = []
    for p in pairs:
        (c_ids, c_prompt), (r_ids, r_prompt) = (encode_split(tokenizer, p["prompt"], p[k], max_length)
                                                for k in ("chosen", "rejected"))
        out.append({"chosen": c_ids, "chosen_prompt": c_prompt, "rejected": r_ids, "rejected_prompt": r_prompt})
    return out


def batch_logprobs(model, batch: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and rejected, each (B,), in one forward pass (the two
    replies of a pair share their prompt, which is read once: models.shared_prefix)."""
    seqs = [b["chosen"] for b in batch] + [b["rejected"] for b in batch]
    n_prompt = [b["chosen_prompt"] for b in batch] + [b["rejected_prompt"] for b in batch]
    split = split_shared_prefix(seqs, list(range(len(batch))) * 2, [n - 1 for n in n_prompt], pad_id, device)
    if split is not None:
        logp = shared_sequence_logprob(model, split, torch.tensor(n_prompt, device=device))
        return logp[:len(batch)], logp[len(batch):]
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
    world, main_proc = accelerator.num_processes, accelerator.is_main_process
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
    # Only for the pairs the run's steps will draw (a short run on a large file reads a fraction).
    used = sorted({i for step in range(total_steps)
                   for i in global_batch(step, len(train), global_size, steps_per_epoch, cfg.seed)})
    reference_logprobs(model, [train[i] for i in used] + evals, pad_id, cfg.micro_batch_size, accelerator.device)

    run_dir = open_run_dir(cfg, "dpo", resume, overwrite, accelerator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    if main_proc:
        print(f"dpo: model {cfg.model} (beta {cfg.beta}, {sum(p.numel() for p in params) / 1e6:.2f}M trainable) | "
              f"{len(train)} train / {len(evals)} eval pairs | global batch {global_size} ({world} process(es)) | "
              f"{total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)

    def terms(m, batch):
        return pair_terms(m, batch, pad_id, accelerator.device, cfg.beta)

    # ---- train and evaluate ------------------------------------------------------------------
    summary, seconds = fit_pairwise("dpo", cfg, model, train, evals, terms, accelerator, run_dir, params, optimizer,
                                    scheduler, start_step, total_steps)

    # ---- save ------------------------------------------------------------------------------------
    if main_proc:
        save_model(accelerator.unwrap_model(model), tokenizer, run_dir / "final")
        shown = " | ".join(f"{k} {v:.4f}" for k, v in summary.items()) or "no eval set"
        print(f"dpo: done in {seconds:.1f}s | {shown} | model saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
