"""RLHF with PPO: sample, score, penalise KL to the frozen reference, update policy and value head.

    alignkit train ppo --config configs/ppo.yaml [key=value ...] [--resume RUN_DIR]

Each step, top to bottom:
  1. rollout: sample responses for a batch of prompts; score them (reward model or judge); take
     log-probs under the policy and under the reference (the same weights with the LoRA adapter
     disabled, so no second model is in memory) and values from the value head;
  2. rewards: per-token -kl_coef * KL plus the score on the last token; GAE advantages and returns;
  3. update: ppo_epochs passes of clipped policy loss + vf_coef * clipped value loss over minibatches.
The value head shares the policy's backbone and adapter. Everything random is seeded by (seed, step),
so a run resumed from a checkpoint (adapter, value head, optimizer, KL controller, RNG, step)
repeats the uninterrupted one.

Rollouts come from the rollout engine, synced to the policy before each step's sampling, each row
seeded by (seed, step, row); the old log-probs are the trainer's own (the sampler's gap to them is
logged as sampler_logprob_gap). Every record holds the seconds of each phase (time_*_s), and an
optional held-out probe (probe_proxy, probe_gold) every probe.every steps.

Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) each process samples
rollout_batch / N of the step's prompts; scores are normalised and advantages whitened over all
processes together, gradients are averaged by DDP, and the logged metrics cover the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import torch

from alignkit.config import PPOConfig
from alignkit.data.batching import global_batch
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.losses.kl import kl_k1, kl_k3
from alignkit.losses.ppo import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from alignkit.models import save_model
from alignkit.models.heads import scalar_head
from alignkit.models.rollout import RolloutEngine
from alignkit.online import (PhaseTimer, Probe, Rollout, Scorers, StepLog, batch_stats, kl_controller,
                             rollout_logprobs, row_seeds, sample, sampler_gap)
from alignkit.training import (checkpoint, load_trainable, make_accelerator, make_optimizer, open_run_dir,
                               resume_state)


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module, so one DDP wrapper syncs both gradients."""

    def __init__(self, policy, value_head):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, ro: Rollout, temperature: float, rows: torch.Tensor | None = None):
        """Log-probs (at the sampling temperature) and values of the rollout's responses (all rows, or
        the minibatch `rows`), each (B, keep); a prefix every row shares is read once (rollout_logprobs)."""
        logp, hidden = rollout_logprobs(self.policy, ro, temperature, rows, hidden=True)
        return logp, self.value_head(hidden.float()).squeeze(-1)


# With ppo_epochs 1 and one minibatch per step, reuse the rollout's forward pass for the update.
# It computes exactly what a second pass would (a test compares both ways), one pass cheaper.
REUSE_ROLLOUT_FORWARD = True


def main(cfg: PPOConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Run PPO; returns the run directory (final/ holds the policy adapter and the value head)."""
    # ---- setup ---------------------------------------------------------------------------------
    if not cfg.lora.enabled:
        raise AlignkitError("PPO needs lora.enabled=true: the reference is the base model with the adapter disabled")
    if cfg.minibatch_size > cfg.rollout_batch:
        raise AlignkitError(f"minibatch_size {cfg.minibatch_size} is larger than rollout_batch {cfg.rollout_batch}")
    accelerator = make_accelerator(cfg)
    device, main_proc = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.rollout_batch % world or cfg.minibatch_size % world:
        raise AlignkitError(f"rollout_batch {cfg.rollout_batch} and minibatch_size {cfg.minibatch_size} must both "
                            f"be multiples of the {world} processes: each process takes an equal share")
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_trainable(cfg, device)
    value_head = scalar_head(policy.config.hidden_size).to(device)  # on the policy's own hidden states
    prompts = load_prompts(cfg.data.prompts)
    if len(prompts) < cfg.rollout_batch:
        raise AlignkitError(f"{cfg.data.prompts}: {len(prompts)} prompts, fewer than rollout_batch {cfg.rollout_batch}")
    scorers = Scorers(cfg.reward, cfg.monitors.judge, device)
    probe = Probe(cfg.probe, cfg.max_new_tokens, rank, world)
    engine = RolloutEngine(policy, tokenizer)  # its own copy of the weights, synced every step
    total_steps = cfg.max_steps or 100
    steps_per_epoch = len(prompts) // cfg.rollout_batch

    run_dir = open_run_dir(cfg, "ppo", resume, overwrite, accelerator)
    modules = PolicyWithValue(policy, value_head)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(modules, optimizer)  # DDP-wrapped when world > 1
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    kl_ctl = kl_controller(cfg, run_dir, start_step)
    if main_proc:
        print(f"ppo: policy {cfg.model} (LoRA r={cfg.lora.r}) | reward: {scorers.reward_name} | {len(prompts)} prompts, "
              f"{cfg.rollout_batch} per step ({world} process(es)) | {total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)
    all_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
    kl_fn = kl_k1 if cfg.kl_estimator == "k1" else kl_k3
    log = StepLog("ppo", cfg, run_dir, start_step, total_steps, accelerator, probe, scorers, engine, policy)

    def save(step: int) -> None:
        checkpoint(run_dir, step, total_steps, model, optimizer, scheduler, accelerator, cfg.keep_checkpoints,
                   extra_state={"kl_controller": kl_ctl.state_dict()})

    for step in range(start_step, total_steps):
        timer = PhaseTimer()
        # ---- 1. rollout ------------------------------------------------------------------------
        step_prompts = [prompts[i] for i in global_batch(step, len(prompts), cfg.rollout_batch, steps_per_epoch, cfg.seed)]
        rows = list(range(rank, cfg.rollout_batch, world))  # this process's share
        batch_prompts = [step_prompts[r] for r in rows]
        policy.eval()
        with timer("generate"):
            ro = sample(engine, policy, batch_prompts, row_seeds(cfg.seed, step, rows),
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        tokenizer=tokenizer, device=device)
        gen, resp_mask = ro.gen, ro.resp_mask
        fused = REUSE_ROLLOUT_FORWARD and cfg.ppo_epochs == 1 and cfg.minibatch_size == cfg.rollout_batch
        if fused:
            # One update on the whole batch: the update's forward pass is the rollout's (ratio exactly 1),
            # so one backbone pass fewer per step.
            model.train()
            with timer("update"), accelerator.autocast():
                live_logp, live_values = model(ro, cfg.temperature)
            old_logp, old_values = live_logp.detach(), live_values.detach()
        else:
            # the unwrapped module: no DDP bookkeeping for passes without gradients
            with timer("old_logprobs"), torch.no_grad():
                old_logp, old_values = modules(ro, cfg.temperature)
        with timer("reference"), torch.no_grad(), policy.disable_adapter():
            ref_logp, _ = modules(ro, cfg.temperature)
        with timer("score"):
            scores = torch.tensor(scorers.reward(batch_prompts, gen.texts), dtype=torch.float32, device=device)
        raw_scores = scores.clone()
        if cfg.missing_eos_penalty is not None:
            scores -= cfg.missing_eos_penalty * torch.tensor([not f for f in gen.finished], device=device).float()
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        if cfg.normalize_reward and cfg.rollout_batch > 1:
            everyone = accelerator.gather(scores)  # the statistics of the whole step's batch
            scores = (scores - everyone.mean()) / (everyone.std() + 1e-8)

        # ---- 2. rewards and advantages ---------------------------------------------------------
        kl = kl_fn(old_logp, ref_logp) * resp_mask  # (B, keep)
        rewards = token_rewards(scores, kl, kl_ctl.coef, resp_mask)
        advantages, returns = gae(rewards, old_values, resp_mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, resp_mask, all_sum=all_sum)

        # ---- 3. update -------------------------------------------------------------------------
        model.train()
        stats = {"pg_loss": 0.0, "vf_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "vf_clipfrac": 0.0}
        n_updates = 0
        order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        local_minibatch = cfg.minibatch_size // world
        with timer("update"):
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(len(rows), generator=order_gen).tolist()
                for start in range(0, len(order), local_minibatch):
                    mb = order[start:start + local_minibatch]
                    with accelerator.autocast():
                        logp, values = ((live_logp[mb], live_values[mb]) if fused
                                        else model(ro, cfg.temperature, torch.tensor(mb, device=device)))
                        pg, pg_stats = policy_loss(logp, old_logp[mb], advantages[mb], resp_mask[mb], cfg.clip)
                        vf, vf_stats = value_loss(values, old_values[mb], returns[mb], resp_mask[mb], cfg.vf_clip)
                        accelerator.backward(pg + cfg.vf_coef * vf)
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    for k, v in {"pg_loss": pg.item(), "vf_loss": vf.item(), **pg_stats, **vf_stats}.items():
                        if k in stats:
                            stats[k] += v
                    n_updates += 1
            scheduler.step()

        # ---- log, probe, checkpoint -------------------------------------------------------------
        # every process builds the same record from the whole step's batch, so stop decisions agree
        done = step + 1
        update_stats = torch.tensor([v / n_updates for v in stats.values()], device=device)
        update_stats = (accelerator.reduce(update_stats, reduction="sum") / world).tolist()
        record = {"step": done, **batch_stats(accelerator, ro, raw_scores, scores, kl.sum(dim=1), batch_prompts,
                                              scorers, sampler_gap(gen, old_logp)),
                  "kl_coef": round(kl_ctl.coef, 6), **{k: round(v, 6) for k, v in zip(stats, update_stats)},
                  "advantage_mean": round(masked_mean(advantages, resp_mask).item(), 6)}
        kl_ctl.update(record["kl"], cfg.rollout_batch)
        if log.end_step(record, timer, save):
            break

    # ---- save ------------------------------------------------------------------------------------
    if main_proc:
        from safetensors.torch import save_file

        final = save_model(policy, tokenizer, run_dir / "final")
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  final / "value_head.safetensors")
    log.close(final if main_proc else None)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
