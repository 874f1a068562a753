"""What the online RL recipes (PPO, GRPO) share: sampling a step's rows on the rollout engine, the
trainer's log-probs of them, scoring, a held-out probe, per-phase timings and the step's record.

Plain functions and two small classes the recipes call in order; each recipe keeps its own loop.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.config import MonitorSettings, ProbeSettings
from alignkit.evaluate import monitors
from alignkit.evaluate.monitors import distinct_n
from alignkit.evaluate.rewards import load_reward
from alignkit.io import batch_seed
from alignkit.models.generation import Generation, left_pad, tail_mask
from alignkit.runs import METRICS_FILE


def row_seeds(seed: int, step: int, rows: list[int]) -> list[int]:
    """The sampling seed of each global row of a step: a function of (seed, step, row) alone, so a
    row samples the same tokens whichever process generates it, and after a resume."""
    return [batch_seed(seed, step * 1_000_003 + r) for r in rows]


class PhaseTimer:
    """Seconds spent in each phase of one step, logged as time_<phase>_s."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def record(self) -> dict:
        return {f"time_{k}_s": round(v, 4) for k, v in self.seconds.items()}


@dataclass
class Rollout:
    """One process's sampled rows, laid out for the trainer: left-padded prompt + response, so every
    response ends in the last column and the last `keep` columns hold them all."""

    gen: Generation
    ids: torch.Tensor        # (B, P + keep)
    mask: torch.Tensor       # (B, P + keep)
    keep: int
    resp_mask: torch.Tensor  # (B, keep), 1 on response tokens
    lengths: torch.Tensor    # (B,)


def sample(engine, policy, prompts: list, seeds: list[int], *, max_new_tokens: int, temperature: float,
           top_p: float, tokenizer, device) -> Rollout:
    """Sync the engine to the policy's current weights and sample one completion per row."""
    engine.sync(policy)
    gen = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=seeds, return_logprobs=True)
    eos = tokenizer.eos_token_id
    responses = [toks if toks else [eos] for toks in gen.tokens]  # an empty response still gets a reward
    ids, mask = left_pad([p + r for p, r in zip(gen.prompt_ids, responses)], tokenizer.pad_token_id, device)
    keep = max(len(r) for r in responses)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    return Rollout(gen, ids, mask, keep, tail_mask(lengths, keep), lengths)


def tail_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, keep: int,
                  hidden: bool = False):
    """log p of the last `keep` tokens of each row at `temperature`, (B, keep); with hidden=True also
    the last layer's hidden states at the positions that predict them, (B, keep, H).

    The LM head and the softmax run on those positions only (logits_to_keep): the prompt's logits
    would be thrown away, and at a 49k vocabulary they dominate the memory."""
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=hidden,
                logits_to_keep=keep + 1)
    logits = out.logits[:, :-1].float() / temperature  # (B, keep, V): position t predicts token t + 1
    logp = (logits.gather(2, ids[:, -keep:, None]) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(2)
    return (logp, out.hidden_states[-1][:, -keep - 1:-1]) if hidden else logp


def sampler_gap(gen: Generation, trainer_logp: torch.Tensor) -> torch.Tensor:
    """[sum of |sampler log-p - trainer log-p| over the sampled tokens, their count], to be summed over
    processes: how far the engine's numerics are from the trainer's (it never enters the ratio)."""
    total, count = 0.0, 0
    for b, lp in enumerate(gen.logprobs):
        if len(lp):
            total += (lp.to(trainer_logp.device) - trainer_logp[b, -len(lp):].detach()).abs().sum().item()
            count += len(lp)
    return torch.tensor([total, float(count)], dtype=torch.float64, device=trainer_logp.device)


class Scorers:
    """The training reward (proxy) and, when monitors.judge is set, the independent judge (gold)."""

    def __init__(self, reward: Path, judge: Path | None, device):
        self.reward, self.reward_name = load_reward(reward, device)
        self.judge = None
        if judge is not None:
            from alignkit.evaluate.judges import load_judge

            self.judge = load_judge(judge).score


class Probe:
    """Greedy replies of the current policy to fixed held-out prompts, scored by the proxy and the gold
    judge: logged as probe_proxy / probe_gold before the first step, every `every` steps, and at the end."""

    def __init__(self, settings: ProbeSettings | None, max_new_tokens: int, rank: int, world: int):
        from alignkit.data.prompts import load_prompts

        self.settings = settings
        if settings is not None:
            self.prompts = load_prompts(settings.prompts)[:settings.n]
            self.mine = self.prompts[rank::world]  # greedy: a row's reply does not depend on the split
            self.max_new_tokens = settings.max_new_tokens or max_new_tokens

    def due(self, step: int, last: bool) -> bool:
        return self.settings is not None and (step % self.settings.every == 0 or last)

    def run(self, engine, policy, scorers: Scorers, accelerator) -> dict:
        engine.sync(policy)
        sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # proxy, gold, n
        if self.mine:
            gen = engine.generate(self.mine, max_new_tokens=self.max_new_tokens, temperature=0.0)
            sums[0] = sum(scorers.reward(self.mine, gen.texts))
            if scorers.judge is not None:
                sums[1] = sum(scorers.judge(self.mine, gen.texts))
            sums[2] = len(self.mine)
        sums = accelerator.reduce(sums, reduction="sum") if accelerator.num_processes > 1 else sums
        out = {"probe_proxy": round((sums[0] / sums[2]).item(), 6)}
        if scorers.judge is not None:
            out["probe_gold"] = round((sums[1] / sums[2]).item(), 6)
        return out


def load_history(run_dir: Path, start_step: int) -> list[dict]:
    """The step records logged before a resume (monitors compare against the whole run); probe-only
    records (step 0) are not steps."""
    if not start_step:
        return []
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [r for r in records if "score" in r]


def batch_stats(accelerator, rollout: Rollout, raw_scores: torch.Tensor, scores: torch.Tensor,
                kl_per_response: torch.Tensor, prompts: list, scorers: Scorers, gap: torch.Tensor) -> dict:
    """The step's batch figures over every process's rows: score (raw), reward (after penalties),
    KL per response, length, EOS rate, distinct-2, the judge's mean and the sampler-trainer gap."""
    from accelerate.utils import gather_object

    world = accelerator.num_processes
    gen, device = rollout.gen, raw_scores.device
    texts = gather_object(gen.texts) if world > 1 else gen.texts
    gap = accelerator.reduce(gap, reduction="sum") if world > 1 else gap
    record = {"score": round(accelerator.gather(raw_scores).mean().item(), 6),
              "reward": round(accelerator.gather(scores).mean().item(), 6),
              "kl": round(accelerator.gather(kl_per_response).mean().item(), 6),
              "response_length": accelerator.gather(rollout.lengths).float().mean().item(),
              "eos_rate": accelerator.gather(torch.tensor(gen.finished, dtype=torch.float32, device=device)).mean().item(),
              "distinct_2": round(distinct_n(texts), 4),
              "sampler_logprob_gap": round((gap[0] / gap[1].clamp(min=1)).item(), 6)}
    if scorers.judge is not None:
        judged = torch.tensor(scorers.judge(prompts, gen.texts), dtype=torch.float32, device=device)
        record["judge"] = round(accelerator.gather(judged).mean().item(), 6)
    return record


def watch(history: list[dict], record: dict, settings: MonitorSettings, name: str, write) -> list[str]:
    """Append the record to the history, run the reward-hacking monitors on it and note any warnings
    in the record and through `write` (e.g. tqdm.write on the main process)."""
    history.append(record)
    warnings = monitors.check(history, settings)
    if warnings:
        record["warnings"] = warnings
        for w in warnings:
            write(f"{name}: WARNING step {record['step']}: {w}")
    return warnings


def make_engine(model, tokenizer):
    """The rollout engine of `model` (alignkit.models.rollout), or, where it is not installed yet,
    the same interface on `alignkit.models.generate` (one row at a time when seeds are per row)."""
    try:
        from alignkit.models.rollout import RolloutEngine
    except ImportError:
        return _GenerateEngine(model, tokenizer)
    return RolloutEngine(model, tokenizer)


class _GenerateEngine:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync(self, policy):
        self.model = policy

    def generate(self, prompts, *, n=1, seed=None, **kw) -> Generation:
        from alignkit.models import generate

        if not isinstance(seed, list):
            return generate(self.model, self.tokenizer, prompts, seed=seed, **kw)
        parts = [generate(self.model, self.tokenizer, [p], seed=s, **kw) for p, s in zip(prompts, seed)]
        out = Generation([], [], [], [], [] if kw.get("return_logprobs") else None)
        for g in parts:
            for field in ("prompt_ids", "tokens", "texts", "finished", "logprobs"):
                if getattr(out, field) is not None:
                    getattr(out, field).extend(getattr(g, field))
        return out
