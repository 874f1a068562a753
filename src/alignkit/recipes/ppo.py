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

Under `accelerate launch --multi_gpu --num_processes N` (or torchrun) each process samples
rollout_batch / N of the step's prompts; scores are normalised and advantages whitened over all
processes together, gradients are averaged by DDP, and the logged metrics cover the whole batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from accelerate.utils import gather_object

from alignkit.config import PPOConfig
from alignkit.data.batching import global_batch
from alignkit.data.prompts import load_prompts
from alignkit.errors import AlignkitError
from alignkit.evaluate import monitors
from alignkit.evaluate.rewards import load_reward
from alignkit.evaluate.monitors import distinct_n
from alignkit.io import JsonlLog
from alignkit.losses.kl import AdaptiveKLController, FixedKLController, kl_k1, kl_k3
from alignkit.losses.ppo import gae, masked_mean, masked_whiten, policy_loss, token_rewards, value_loss
from alignkit.models import generate, save_model
from alignkit.models.generation import left_pad, tail_mask
from alignkit.models.heads import scalar_head
from alignkit.runs import METRICS_FILE
from alignkit.training import (checkpoint, load_trainable, make_accelerator, make_optimizer, open_run_dir,
                               resume_state)


class PolicyWithValue(torch.nn.Module):
    """The policy and its value head as one module, so one DDP wrapper syncs both gradients."""

    def __init__(self, policy, value_head):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, ids, mask, temperature: float, keep: int):
        """Log-probs (at the sampling temperature) and values for the last `keep` tokens, each (B, keep).

        Sequences are left-padded, so every response ends in the last column and the last `keep`
        columns hold them all: the LM head and the softmax run on those positions only (the prompt's
        logits would be thrown away, and at a 49k vocabulary they dominate the memory)."""
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.policy(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True,
                          logits_to_keep=keep + 1)
        logits = out.logits[:, :-1].float() / temperature  # (B, keep, V): position t predicts token t + 1
        targets = ids[:, -keep:, None]
        logp = (logits.gather(2, targets) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(2)
        values = self.value_head(out.hidden_states[-1][:, -keep - 1:-1].float()).squeeze(-1)
        return logp, values


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
    score_fn, reward_name = load_reward(cfg.reward, device)
    judge = None
    if cfg.monitors.judge is not None:
        from alignkit.evaluate.judges import load_judge

        judge = load_judge(cfg.monitors.judge)
    total_steps = cfg.max_steps or 100
    steps_per_epoch = len(prompts) // cfg.rollout_batch

    run_dir = open_run_dir(cfg, "ppo", resume, overwrite, accelerator)
    modules = PolicyWithValue(policy, value_head)
    params = [p for p in modules.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    model, optimizer = accelerator.prepare(modules, optimizer)  # DDP-wrapped when world > 1
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target
              else FixedKLController(cfg.kl_coef))
    start_step = resume_state(run_dir, resume, model, optimizer, scheduler, accelerator)
    if start_step:
        state = json.loads((run_dir / "checkpoints" / f"step-{start_step:06d}" / "trainer_state.json").read_text())
        kl_ctl.load_state_dict(state["kl_controller"])
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None
    if main_proc:
        print(f"ppo: policy {cfg.model} (LoRA r={cfg.lora.r}) | reward: {reward_name} | {len(prompts)} prompts, "
              f"{cfg.rollout_batch} per step ({world} process(es)) | {total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)
    all_sum = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
    kl_fn = kl_k1 if cfg.kl_estimator == "k1" else kl_k3
    eos = tokenizer.eos_token_id

    t0 = time.time()
    bar = tqdm(total=total_steps, initial=start_step, desc="ppo", unit="step", disable=not main_proc)
    stopped_early = False
    # Monitors compare against the whole run, including steps logged before a resume.
    history = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()] if start_step else []
    for step in range(start_step, total_steps):
        # ---- 1. rollout ------------------------------------------------------------------------
        step_prompts = [prompts[i] for i in global_batch(step, len(prompts), cfg.rollout_batch, steps_per_epoch, cfg.seed)]
        batch_prompts = step_prompts[rank::world]  # this process's share
        policy.eval()
        gen = generate(policy, tokenizer, batch_prompts, max_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step + 7919 * rank)
        responses = [toks if toks else [eos] for toks in gen.tokens]  # an empty response still gets a reward
        seqs = [p + r for p, r in zip(gen.prompt_ids, responses)]
        ids, mask = left_pad(seqs, tokenizer.pad_token_id, device)
        keep = max(len(r) for r in responses)  # the last `keep` columns hold every response
        resp_lengths = torch.tensor([len(r) for r in responses], device=device)
        resp_mask = tail_mask(resp_lengths, keep)  # (B, keep)
        fused = REUSE_ROLLOUT_FORWARD and cfg.ppo_epochs == 1 and cfg.minibatch_size == cfg.rollout_batch
        if fused:
            # One update on the whole batch: the update's forward pass is the rollout's (ratio exactly 1),
            # so one backbone pass fewer per step.
            model.train()
            with accelerator.autocast():
                live_logp, live_values = model(ids, mask, cfg.temperature, keep)
            old_logp, old_values = live_logp.detach(), live_values.detach()
        else:
            with torch.no_grad():  # the unwrapped module: no DDP bookkeeping for passes without gradients
                old_logp, old_values = modules(ids, mask, cfg.temperature, keep)
        with torch.no_grad(), policy.disable_adapter():
            ref_logp, _ = modules(ids, mask, cfg.temperature, keep)
        scores = torch.tensor(score_fn(batch_prompts, gen.texts), dtype=torch.float32, device=device)
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
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(seqs), generator=order_gen).tolist()
            for start in range(0, len(order), local_minibatch):
                mb = order[start:start + local_minibatch]
                with accelerator.autocast():
                    logp, values = ((live_logp[mb], live_values[mb]) if fused
                                    else model(ids[mb], mask[mb], cfg.temperature, keep))
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
        # every process builds the same record from the whole step's batch, so stop decisions agree
        mean_kl = accelerator.gather(kl.sum(dim=1)).mean().item()  # per response
        kl_ctl.update(mean_kl, cfg.rollout_batch)

        # ---- log and checkpoint ----------------------------------------------------------------
        done = step + 1
        lengths = accelerator.gather(resp_lengths).float()
        finished = accelerator.gather(torch.tensor(gen.finished, dtype=torch.float32, device=device))
        texts = gather_object(gen.texts) if world > 1 else gen.texts
        update_stats = torch.tensor([v / n_updates for v in stats.values()], device=device)
        update_stats = (accelerator.reduce(update_stats, reduction="sum") / world).tolist()
        record = {"step": done, "score": round(accelerator.gather(raw_scores).mean().item(), 6),
                  "reward": round(accelerator.gather(scores).mean().item(), 6), "kl": round(mean_kl, 6),
                  "kl_coef": round(kl_ctl.coef, 6), "response_length": lengths.mean().item(),
                  "eos_rate": finished.mean().item(), "distinct_2": round(distinct_n(texts), 4),
                  **{k: round(v, 6) for k, v in zip(stats, update_stats)},
                  "advantage_mean": round(masked_mean(advantages, resp_mask).item(), 6),
                  "elapsed_s": round(time.time() - t0, 3)}
        if judge is not None:
            judged = torch.tensor(judge.score(batch_prompts, gen.texts), dtype=torch.float32, device=device)
            record["judge"] = round(accelerator.gather(judged).mean().item(), 6)
        history.append(record)
        warnings = monitors.check(history, cfg.monitors)
        if warnings:
            record["warnings"] = warnings
            for w in warnings:
                if main_proc:
                    tqdm.write(f"ppo: WARNING step {done}: {w}")
        if main_proc:
            metrics.write(record)
        bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{mean_kl:.3f}")
        bar.update(1)
        threshold_hit = cfg.reward_threshold is not None and record["score"] >= cfg.reward_threshold
        monitor_stop = bool(warnings) and cfg.monitors.stop_on_warning
        if done % cfg.save_every == 0 or done == total_steps or threshold_hit or monitor_stop:
            checkpoint(run_dir, done, total_steps, model, optimizer, scheduler, accelerator, cfg.keep_checkpoints,
                       extra_state={"kl_controller": kl_ctl.state_dict()})
        if threshold_hit or monitor_stop:
            why = (f"mean score {record['score']:.4f} reached reward_threshold {cfg.reward_threshold}"
                   if threshold_hit else "a monitor warned and monitors.stop_on_warning is set")
            if main_proc:
                print(f"ppo: {why} at step {done}; stopping", flush=True)
            stopped_early = True
            break
    bar.close()

    # ---- save ------------------------------------------------------------------------------------
    if main_proc:
        from safetensors.torch import save_file

        final = save_model(policy, tokenizer, run_dir / "final")
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                  final / "value_head.safetensors")
        metrics.close()
        print(f"ppo: done in {time.time() - t0:.1f}s{' (early stop)' if stopped_early else ''} | "
              f"policy saved to {final}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
