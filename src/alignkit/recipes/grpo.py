"""Critic-free online RL: GRPO, Dr. GRPO and RLOO. Several completions per prompt, each one's baseline
is its group; a clipped token-level policy loss; KL to the reference. No value head.

    alignkit train grpo --config configs/grpo.yaml [key=value ...] [--resume RUN_DIR]

Each step, top to bottom:
  1. sample: rollout_batch prompts x group_size completions on the rollout engine (synced to the
     policy), each row seeded by (seed, step, row), so a row's tokens never depend on which process
     drew it or on a resume;
  2. score them; the reference's log-probs (the adapter disabled, or a frozen copy of the model in full
     fine-tuning); group advantages (advantage: grpo, dr_grpo or rloo); groups with all-equal
     rewards carry no signal and are counted (flat_group_share);
  3. update: num_iterations passes over the batch in minibatches (reshuffled between passes) of the
     clipped token loss, plus kl_coef * k3 per token when kl_in is "loss" (kl_in "reward" subtracts
     the sequence KL from the score instead, as RLOO and PPO do).
The old log-probs are the trainer's own (one batched forward pass), never the sampler's; their gap is
logged as sampler_logprob_gap. Every record holds the seconds of each phase (time_*_s).
final/ holds the last step's policy; with `select` set, the policy of the step that scored best on a
validation slice (early stopping on the labeler: online.Selection).

Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) each process samples its share
of every minibatch's rows; rewards are gathered for the group advantages, losses are normalised over
the whole minibatch and DDP averages the gradients, so N processes equal one with the same batch.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from alignkit.config import GRPOConfig
from alignkit.data.batching import global_batch
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.losses.grpo import aggregate, clipped_token_loss, group_advantages
from alignkit.losses.kl import kl_k1, kl_k3
from alignkit.models import save_model
from alignkit.models.rollout import RolloutEngine
from alignkit.online import (PhaseTimer, Probe, Scorers, Selection, StepLog, batch_stats, kl_controller, row_seeds,
                             rollout_logprobs, sample, sampler_gap)
from alignkit.training import (checkpoint, load_trainable, make_accelerator, make_optimizer, open_run_dir,
                               resume_state)


def my_rows(step: int, cfg: GRPOConfig, minibatch: int, rank: int, world: int) -> list[int]:
    """The global rows (prompt-major: row r is a completion of the step's prompt r // group_size) this
    process samples and trains on, minibatch by minibatch. A seeded permutation of the step's rows is
    cut into minibatches, each shared equally by the processes: the minibatches are the same for any
    number of processes."""
    n_rows = cfg.rollout_batch * cfg.group_size
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)).tolist()
    share = minibatch // world
    return [order[m + rank * share + j] for m in range(0, n_rows, minibatch) for j in range(share)]


def minibatch_order(step: int, iteration: int, cfg: GRPOConfig, minibatch: int, rank: int,
                    world: int) -> list[list[int]]:
    """For each minibatch of this iteration, the local indices (into this process's `my_rows`) of its
    rows. Iteration 0 takes the minibatches as cut; each later one reshuffles them: every position
    j of a minibatch (a column, whose rows always belong to the same process) sends its rows to the
    minibatches in a seeded permutation of its own. Each row is used once per iteration, a minibatch
    mixes rows of different cuts, and as the permutations depend on neither rank nor world, N
    processes still train on the same minibatches as one."""
    n_mb, share = cfg.rollout_batch * cfg.group_size // minibatch, minibatch // world
    if iteration == 0 or n_mb == 1:
        return [[m * share + j for j in range(share)] for m in range(n_mb)]
    g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_009 + iteration)
    moves = [torch.randperm(n_mb, generator=g).tolist() for _ in range(minibatch)]  # one per column, global
    return [[moves[rank * share + j][m] * share + j for j in range(share)] for m in range(n_mb)]


def main(cfg: GRPOConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Run GRPO (or RLOO, Dr. GRPO); returns the run directory (final/ holds the policy)."""
    # ---- setup ---------------------------------------------------------------------------------
    n_rows = cfg.rollout_batch * cfg.group_size
    minibatch = cfg.minibatch_size or n_rows
    if n_rows % minibatch:
        raise AlignkitError(f"minibatch_size {minibatch} must divide rollout_batch x group_size = {n_rows}")
    accelerator = make_accelerator(cfg)
    device, main_proc = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if minibatch % world:
        raise AlignkitError(f"minibatch_size {minibatch} must be a multiple of the {world} processes: "
                            "each process takes an equal share of every minibatch")
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_trainable(cfg, device)
    # The reference: LoRA's base with the adapter disabled (no second model), else a frozen copy.
    reference = None
    if not cfg.lora.enabled and cfg.kl_coef > 0:
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
    prompts = load_prompts(cfg.data.prompts)
    if len(prompts) < cfg.rollout_batch:
        raise AlignkitError(f"{cfg.data.prompts}: {len(prompts)} prompts, fewer than rollout_batch {cfg.rollout_batch}")
    scorers = Scorers(cfg.reward, cfg.monitors.judge, device)
    probe = Probe(cfg.probe, cfg.max_new_tokens, rank, world)
    engine = RolloutEngine(policy, tokenizer)  # its own copy of the weights, synced every step
    total_steps = cfg.max_steps or 100
    steps_per_epoch = len(prompts) // cfg.rollout_batch

    run_dir = open_run_dir(cfg, "grpo", resume, overwrite, accelerator)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(policy, optimizer)  # DDP-wrapped when world > 1
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    kl_ctl = kl_controller(cfg, run_dir, start_step)
    if main_proc:
        tuned = f"LoRA r={cfg.lora.r}" if cfg.lora.enabled else "full fine-tuning"
        print(f"grpo: policy {cfg.model} ({tuned}) | advantage {cfg.advantage} | reward: {scorers.reward_name} | "
              f"{len(prompts)} prompts, {cfg.rollout_batch} x {cfg.group_size} completions per step "
              f"({world} process(es)) | {total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)
    kl_fn = kl_k1 if cfg.kl_estimator == "k1" else kl_k3
    clip_high = cfg.clip_high or cfg.clip
    selection = Selection(cfg, run_dir, start_step, rank, world, main_proc) if cfg.select else None
    log = StepLog("grpo", cfg, run_dir, start_step, total_steps, accelerator, probe, scorers, engine, policy,
                  selection, lambda directory, meta: save_model(policy, tokenizer, directory, extra_meta=meta))

    def save(step: int) -> None:
        checkpoint(run_dir, step, total_steps, model, optimizer, scheduler, accelerator, cfg.keep_checkpoints,
                   extra_state={"kl_controller": kl_ctl.state_dict()})

    for step in range(start_step, total_steps):
        timer = PhaseTimer()
        # ---- 1. sample ---------------------------------------------------------------------------
        step_prompts = [prompts[i] for i in global_batch(step, len(prompts), cfg.rollout_batch, steps_per_epoch, cfg.seed)]
        rows = my_rows(step, cfg, minibatch, rank, world)
        row_prompts = [step_prompts[r // cfg.group_size] for r in rows]
        policy.eval()
        with timer("generate"):
            ro = sample(engine, policy, row_prompts, row_seeds(cfg.seed, step, rows), max_new_tokens=cfg.max_new_tokens,
                        temperature=cfg.temperature, top_p=cfg.top_p, tokenizer=tokenizer, device=device)

        # ---- 2. score, reference, advantages -----------------------------------------------------
        with timer("score"):
            raw_scores = torch.tensor(scorers.reward(row_prompts, ro.gen.texts), dtype=torch.float32, device=device)
        scores = raw_scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores -= cfg.missing_eos_penalty * torch.tensor([not f for f in ro.gen.finished], device=device).float()
        # One iteration over one minibatch: the update's forward pass is the old log-probs' (ratio 1).
        fused = cfg.num_iterations == 1 and minibatch == n_rows
        if fused:
            model.train()
            with timer("update"), accelerator.autocast():
                live_logp = rollout_logprobs(model, ro, cfg.temperature)
            old_logp = live_logp.detach()
        else:
            with timer("old_logprobs"), torch.no_grad():  # the unwrapped module: no DDP bookkeeping
                old_logp = rollout_logprobs(policy, ro, cfg.temperature)
        ref_logp = None
        if cfg.kl_coef > 0:
            ref_model, off = ((policy, policy.disable_adapter()) if reference is None
                              else (reference, contextlib.nullcontext()))
            with timer("reference"), torch.no_grad(), off:
                ref_logp = rollout_logprobs(ref_model, ro, cfg.temperature)
        kl = (kl_fn(old_logp, ref_logp) * ro.resp_mask).sum(dim=1) if ref_logp is not None else torch.zeros_like(scores)
        if cfg.kl_in == "reward":
            scores = scores - kl_ctl.coef * kl
        everyone = torch.zeros(n_rows, device=device)
        everyone[rows] = scores  # each process fills in its rows; the sum over processes has them all
        if world > 1:
            everyone = accelerator.reduce(everyone, reduction="sum")
        advantages, flat_groups = group_advantages(everyone.view(cfg.rollout_batch, cfg.group_size), cfg.advantage)
        advantages = advantages.reshape(-1)[rows]

        # ---- 3. update ---------------------------------------------------------------------------
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, clipped tokens, tokens, ratio
        with timer("update"):
            for iteration in range(cfg.num_iterations):
                for local in minibatch_order(step, iteration, cfg, minibatch, rank, world):
                    mb = slice(0, None) if fused else torch.tensor(local, device=device)
                    resp_mask = ro.resp_mask[mb]
                    with accelerator.autocast():
                        logp = live_logp if fused else rollout_logprobs(model, ro, cfg.temperature, mb)
                        per_token = clipped_token_loss(logp, old_logp[mb], advantages[mb], cfg.clip, clip_high)
                        if cfg.kl_in == "loss" and ref_logp is not None:
                            per_token = per_token + kl_ctl.coef * kl_k3(logp, ref_logp[mb])
                        n_tokens = resp_mask.sum()
                        if world > 1:
                            n_tokens = accelerator.reduce(n_tokens.clone(), reduction="sum")
                        # normalised over the whole minibatch; DDP averages, hence the factor world
                        loss = aggregate(per_token, resp_mask, cfg.loss_aggregation, n_tokens=n_tokens.item(),
                                         n_seqs=minibatch, max_tokens=cfg.max_new_tokens)
                        accelerator.backward(loss * world)
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        ratio = torch.exp(logp - old_logp[mb])
                        clipped = ((ratio < 1 - cfg.clip) & (advantages[mb, None] < 0)) | \
                                  ((ratio > 1 + clip_high) & (advantages[mb, None] > 0))
                        sums += torch.stack([loss.detach().double(), (clipped * resp_mask).sum().double(),
                                             resp_mask.sum().double(), (ratio * resp_mask).sum().double()])
            scheduler.step()
        if world > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        n_updates = cfg.num_iterations * (n_rows // minibatch)

        # ---- log, probe, checkpoint --------------------------------------------------------------
        done = step + 1
        record = {"step": done, **batch_stats(accelerator, ro, raw_scores, scores, kl, row_prompts, scorers,
                                              sampler_gap(ro.gen, old_logp)),
                  "kl_coef": round(kl_ctl.coef, 6), "loss": round(sums[0].item() / n_updates, 6),
                  "clipfrac": round((sums[1] / sums[2]).item(), 6), "ratio": round((sums[3] / sums[2]).item(), 6),
                  "flat_group_share": round(flat_groups / cfg.rollout_batch, 6),
                  "advantage_abs_mean": round(accelerator.gather(advantages.abs()).mean().item(), 6)}
        kl_ctl.update(record["kl"], n_rows)
        if log.end_step(record, timer, save):
            break

    # ---- save ------------------------------------------------------------------------------------
    log.close(log.save_final(run_dir / "final") if main_proc else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
