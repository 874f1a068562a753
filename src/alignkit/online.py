"""What the online RL recipes (PPO, GRPO) share: sampling a step's rows on the rollout engine, the
trainer's log-probs of them, scoring, a held-out probe, per-phase timings and the step's record.

Plain functions and small classes the recipes call in order; each recipe keeps its own loop.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.config import ProbeSettings, SelectSettings
from alignkit.evaluate import monitors
from alignkit.evaluate.monitors import distinct_n, mean_repetition
from alignkit.evaluate.rewards import load_reward
from alignkit.io import batch_seed
from alignkit.models.generation import Generation, left_pad, tail_mask
from alignkit.models.shared_prefix import NO_LOGITS, PrefixSplit, forward_shared, split_shared_prefix
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
    split: PrefixSplit | None = None  # rows of one prompt read it once (see rollout_logprobs)


def sample(engine, policy, prompts: list[str], seeds: list[int], *, max_new_tokens: int, temperature: float,
           top_p: float, tokenizer, device) -> Rollout:
    """Sync the engine to the policy's current weights and sample one completion per row (row i of
    prompts[i], seeded by seeds[i]). When every distinct prompt has the same number of rows, they go
    to the engine as n completions per prompt (one shared prefill each); a row's tokens depend only
    on its seed either way."""
    engine.sync(policy)
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        rows_of.setdefault(p, []).append(i)
    sizes = {len(rows) for rows in rows_of.values()}
    n = sizes.pop() if len(sizes) == 1 else 1
    unique, order = (list(rows_of), [i for rows in rows_of.values() for i in rows]) if n > 1 \
        else (prompts, list(range(len(prompts))))
    gen = engine.generate(unique, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          seed=[seeds[i] for i in order], return_logprobs=True)
    if n > 1:  # back to the caller's row order
        at = {row: k for k, row in enumerate(order)}
        gen = Generation(**{f.name: [getattr(gen, f.name)[at[i]] for i in range(len(prompts))]
                            for f in fields(gen)})
    eos = tokenizer.eos_token_id
    responses = [toks if toks else [eos] for toks in gen.tokens]  # an empty response still gets a reward
    ids, mask = left_pad([p + r for p, r in zip(gen.prompt_ids, responses)], tokenizer.pad_token_id, device)
    keep = max(len(r) for r in responses)
    lengths = torch.tensor([len(r) for r in responses], device=device)
    # Several completions of a prompt: the trainer's passes read the prompt once per group. Distinct
    # prompts (PPO) still begin alike (the chat template's system turn, 24 tokens of the embedded
    # model's 35-70): all rows then form one group and read that once. None when too little is shared.
    # A prompt's last token stays in each row's tail (its logits predict the first response token), so
    # the tails, left-padded, are keep + 1 wide with the responses in the last `keep` columns, as in `ids`.
    groups = list(prompts) if n > 1 else [0] * len(prompts)
    split = split_shared_prefix([p + r for p, r in zip(gen.prompt_ids, responses)], groups,
                                [len(p) - 1 for p in gen.prompt_ids], tokenizer.pad_token_id, device)
    return Rollout(gen, ids, mask, keep, tail_mask(lengths, keep), lengths, split)


# The trainer's log-probs run the LM head themselves, on the positions that predict the tokens only,
# laid out contiguously, through a fused log-softmax (cross entropy); the model is asked for no logits.
# transformers' head runs on a strided slice of the hidden states, which torch multiplies as a batched
# product on an expanded weight: on the embedded model (8 x 33 x 576 -> 49152) that forward took twice
# as long, and forward + backward with the log-softmax about 1.3x. False: the model's own logits (a
# test compares both ways).
HEAD_ON_HIDDEN = True


def tail_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, keep: int,
                  hidden: bool = False):
    """log p of the last `keep` tokens of each row at `temperature`, (B, keep); with hidden=True also
    the last layer's hidden states at the positions that predict them, (B, keep, H).

    The LM head and the softmax run on those positions only: the prompt's logits would be thrown
    away, and at a 49k vocabulary they dominate the memory. Columns of left padding shared by every
    row (a minibatch of shorter rows cut from a longer batch) are dropped first."""
    width = max(int(mask.sum(dim=1).max()), keep + 1)
    if width < ids.shape[1]:
        ids, mask = ids[:, -width:], mask[:, -width:]
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **_tail_outputs(keep, hidden))
    return _tail_result(model, out, ids, temperature, keep, hidden)


def _tail_outputs(keep: int, hidden: bool) -> dict:
    if HEAD_ON_HIDDEN:  # the last layer's (normed) hidden states only; the other layers' are not kept
        return {"logits_to_keep": NO_LOGITS, "output_hidden_states": [-1]}
    return {"logits_to_keep": keep + 1, "output_hidden_states": hidden}


def _tail_result(model, out, ids: torch.Tensor, temperature: float, keep: int, hidden: bool):
    """(log p of the last `keep` tokens of `ids`[, the hidden states that predict them]) from a forward
    pass's output over `ids`; position t predicts token t + 1."""
    states = out.hidden_states[-1][:, -keep - 1:-1] if out.hidden_states is not None else None
    targets = ids[:, -keep:]
    if HEAD_ON_HIDDEN:
        head = getattr(model, "module", model).get_output_embeddings()  # under DDP, the wrapped model's
        # without a bias, head(h) / T = head(h / T): divide the states (H wide), not the logits (V wide)
        scale_states = temperature != 1.0 and getattr(head, "bias", None) is None
        logits = head(states / temperature if scale_states else states.contiguous()).float()
        if temperature != 1.0 and not scale_states:
            logits = logits / temperature
        logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    else:
        logits = out.logits[:, -keep - 1:-1].float()
        if temperature != 1.0:  # at 1, no (B, keep, V) copy to make and to differentiate through
            logits = logits / temperature
        logp = (logits.gather(2, targets[..., None]) - torch.logsumexp(logits, dim=-1, keepdim=True)).squeeze(2)
    return (logp, states) if hidden else logp


def rollout_logprobs(model, ro: Rollout, temperature: float, rows: torch.Tensor | None = None,
                     hidden: bool = False):
    """`tail_logprobs` of the rollout's rows (all, or the minibatch `rows`), (B, keep); with hidden=True
    also the last layer's hidden states that predict them, (B, keep, H). When rows share a prefix
    (ro.split), it is read once and its key/value cache serves its group's rows: the same numbers up to
    float rounding, gradients included, for about half the tokens on GRPO batches and 20-30% fewer on
    PPO's (the chat template's shared system turn)."""
    if ro.split is None:
        ids, mask = (ro.ids, ro.mask) if rows is None else (ro.ids[rows], ro.mask[rows])
        return tail_logprobs(model, ids, mask, temperature, ro.keep, hidden=hidden)
    split = ro.split if rows is None else ro.split.select(rows)
    out = forward_shared(model, split, **_tail_outputs(ro.keep, hidden))
    return _tail_result(model, out, split.tail_ids, temperature, ro.keep, hidden)


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
    """Greedy replies of the current policy to fixed prompts, scored by the proxy and the gold judge:
    logged as {key}_proxy / {key}_gold before the first step, every `every` steps, and at the end.
    key "probe": the held-out probe (plotted); "select": the validation slice of checkpoint selection."""

    def __init__(self, settings: ProbeSettings | SelectSettings | None, max_new_tokens: int, rank: int, world: int,
                 key: str = "probe"):
        from alignkit.data.prompts import load_prompts

        self.settings, self.key, self.guard = settings, key, None
        if settings is not None:
            self.prompts = load_prompts(settings.prompts)[:settings.n]
            self.mine = self.prompts[rank::world]  # greedy: a row's reply does not depend on the split
            self.max_new_tokens = settings.max_new_tokens or max_new_tokens
            if getattr(settings, "guard", None) is not None:
                from alignkit.evaluate.judges import load_judge

                self.guard = load_judge(settings.guard).score

    def due(self, step: int, last: bool) -> bool:
        return self.settings is not None and (step % self.settings.every == 0 or last)

    def run(self, engine, policy, scorers: Scorers, accelerator) -> dict:
        engine.sync(policy)
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # proxy, gold, n, guard
        if self.mine:
            gen = engine.generate(self.mine, max_new_tokens=self.max_new_tokens, temperature=0.0)
            sums[0] = sum(scorers.reward(self.mine, gen.texts))
            if scorers.judge is not None:
                sums[1] = sum(scorers.judge(self.mine, gen.texts))
            sums[2] = len(self.mine)
            if self.guard is not None:
                sums[3] = sum(self.guard(self.mine, gen.texts))
        sums = accelerator.reduce(sums, reduction="sum") if accelerator.num_processes > 1 else sums
        out = {f"{self.key}_proxy": round((sums[0] / sums[2]).item(), 6)}
        if scorers.judge is not None:
            out[f"{self.key}_gold"] = round((sums[1] / sums[2]).item(), 6)
        if self.guard is not None:
            out[f"{self.key}_guard"] = round((sums[3] / sums[2]).item(), 6)
        return out


class Selection:
    """Checkpoint selection on a validation slice: the policy is scored (greedy replies to cfg.select's
    prompts, judged by monitors.judge: select_gold) before the first step, every select.every steps and
    after the last; the best-scoring policy so far is saved to best/ (its step and score in its
    alignkit.json), and `save_final` makes final/ a copy of it. Ties keep the earlier step. A resumed
    run takes best/ back when its step is at or before the resume point (a kill between saving best/
    and writing the step's checkpoint leaves a best/ from a step the resumed run will redo: it is
    then dropped, and the selection restarts from the resume point). With select.guard, a step
    qualifies only when its select_guard is at least step 0's (read back from the metrics on resume);
    a step that scores best but fails the guard is logged with select_guard_held false."""

    def __init__(self, cfg, run_dir: Path, start_step: int, rank: int, world: int, main: bool):
        self.probe = Probe(cfg.select, cfg.max_new_tokens, rank, world, key="select")
        self.dir, self.main, self.best = run_dir / "best", main, None  # best: (select_gold, step)
        self.floor = None  # the starting policy's select_guard
        meta = self.dir / "alignkit.json"
        if start_step and meta.is_file():
            chosen = json.loads(meta.read_text()).get("select", {})
            if chosen.get("step", start_step + 1) <= start_step:
                self.best = (chosen["select_gold"], chosen["step"])
        if start_step and self.probe.guard is not None:
            records = (json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines())
            self.floor = next((r["select_guard"] for r in records if r.get("step") == 0 and "select_guard" in r), None)

    def due(self, step: int, last: bool) -> bool:
        return self.probe.due(step, last)

    def run(self, step: int, engine, policy, scorers: Scorers, accelerator, save_policy) -> dict:
        """Score the current policy; save it to best/ when it beats the best so far (and holds the
        guard). save_policy(directory, extra_meta) writes the policy (main process only)."""
        out = self.probe.run(engine, policy, scorers, accelerator)
        held = True
        if self.probe.guard is not None:
            if step == 0 or self.floor is None:
                self.floor = out["select_guard"]
            held = out["select_guard"] >= self.floor
            out["select_guard_held"] = held
        if held and (self.best is None or out["select_gold"] > self.best[0]):
            self.best = (out["select_gold"], step)
            if self.main:
                save_policy(self.dir, {"select": {"step": step, "select_gold": out["select_gold"]}})
        return out

    def save_final(self, final: Path, last_step: int, save_policy) -> Path:
        """final/ = best/ (the policy of the best step), or the current policy when that is the last."""
        from alignkit.io import atomic_dir

        if self.best is None or self.best[1] == last_step:
            return save_policy(final, None)
        with atomic_dir(final) as tmp:
            shutil.copytree(self.dir, tmp, dirs_exist_ok=True)
        print(f"final/ holds the policy of step {self.best[1]} (select_gold {self.best[0]:.4f}, the best on "
              f"the validation slice), not that of the last step {last_step}", flush=True)
        return final


def load_history(run_dir: Path, start_step: int) -> list[dict]:
    """The step records logged before a resume (monitors compare against the whole run); probe-only
    records (step 0) are not steps."""
    if not start_step:
        return []
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [r for r in records if "score" in r]


def kl_controller(cfg, run_dir: Path, start_step: int):
    """The KL coefficient's controller (adaptive when cfg.kl_target is set), restored from the
    checkpoint a resumed run starts from."""
    from alignkit.losses.kl import AdaptiveKLController, FixedKLController

    ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_target \
        else FixedKLController(cfg.kl_coef)
    if start_step:
        state = json.loads((run_dir / "checkpoints" / f"step-{start_step:06d}" / "trainer_state.json").read_text())
        ctl.load_state_dict(state["kl_controller"])
    return ctl


def batch_stats(accelerator, rollout: Rollout, raw_scores: torch.Tensor, scores: torch.Tensor,
                kl_per_response: torch.Tensor, prompts: list, scorers: Scorers, gap: torch.Tensor) -> dict:
    """The step's batch figures over every process's rows: score (raw), reward (after penalties),
    KL per response, length, EOS rate, distinct-2, per-reply repetition, the judge's mean and the
    sampler-trainer gap."""
    from accelerate.utils import gather_object

    world = accelerator.num_processes
    gen, device = rollout.gen, raw_scores.device
    finished = torch.tensor(gen.finished, dtype=torch.float32, device=device)
    texts = gather_object(gen.texts) if world > 1 else gen.texts
    gap = accelerator.reduce(gap, reduction="sum") if world > 1 else gap
    record = {"score": round(accelerator.gather(raw_scores).mean().item(), 6),
              "reward": round(accelerator.gather(scores).mean().item(), 6),
              "kl": round(accelerator.gather(kl_per_response).mean().item(), 6),
              "response_length": accelerator.gather(rollout.lengths).float().mean().item(),
              "eos_rate": accelerator.gather(finished).mean().item(),
              "distinct_2": round(distinct_n(texts), 4),
              "repetition": round(mean_repetition(texts), 4),
              "sampler_logprob_gap": float(f"{(gap[0] / gap[1].clamp(min=1)).item():.4g}")}  # often ~1e-7
    if scorers.judge is not None:
        judged = torch.tensor(scorers.judge(prompts, gen.texts), dtype=torch.float32, device=device)
        record["judge"] = round(accelerator.gather(judged).mean().item(), 6)
    return record


class StepLog:
    """How every online RL step ends: the monitors, the stop decisions (reward threshold, a monitor
    with stop_on_warning), the probe, the phase timings, the metrics line, the progress bar and the
    checkpoint. The checkpoint written after a step is timed and logged with the next step
    (time_checkpoint_s), as its record is already written: a kill between the two then loses nothing."""

    def __init__(self, name: str, cfg, run_dir: Path, start_step: int, total_steps: int, accelerator, probe: Probe,
                 scorers: Scorers, engine, policy, selection: Selection | None = None, save_policy=None):
        from tqdm.auto import tqdm

        from alignkit.io import JsonlLog

        self.name, self.cfg, self.accelerator, self.total_steps = name, cfg, accelerator, total_steps
        self.probe, self.scorers, self.engine, self.policy = probe, scorers, engine, policy
        self.main = accelerator.is_main_process
        self.metrics = JsonlLog(run_dir / METRICS_FILE) if self.main else None
        self.history = load_history(run_dir, start_step)  # monitors compare against the whole run
        self.selection, self.save_policy, self.last_step = selection, save_policy, start_step
        if start_step == 0:
            record = {"step": 0, **(self.run_probe() if probe.due(0, False) else {})}
            if selection is not None:
                record.update(self.run_selection(0))
            if len(record) > 1:
                self.write(record)
        self.write_warning = tqdm.write if self.main else (lambda _: None)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step", disable=not self.main)
        self.t0, self.checkpoint_s = time.time(), 0.0

    def run_probe(self) -> dict:
        self.policy.eval()
        return self.probe.run(self.engine, self.policy, self.scorers, self.accelerator)

    def run_selection(self, step: int) -> dict:
        self.policy.eval()
        return self.selection.run(step, self.engine, self.policy, self.scorers, self.accelerator, self.save_policy)

    def save_final(self, final: Path) -> Path:
        """final/: the last step's policy, or with checkpoint selection the best one (main process)."""
        if self.selection is None:
            return self.save_policy(final, None)
        return self.selection.save_final(final, self.last_step, self.save_policy)

    def write(self, record: dict) -> None:
        if self.main:
            self.metrics.write(record)

    def end_step(self, record: dict, timer: PhaseTimer, save) -> bool:
        """Finish the step's record and log it; `save(step)` writes a checkpoint. True: stop the run."""
        cfg, done = self.cfg, record["step"]
        self.history.append(record)
        warnings = monitors.check(self.history, cfg.monitors)
        if warnings:
            record["warnings"] = warnings
            for w in warnings:
                self.write_warning(f"{self.name}: WARNING step {done}: {w}")
        threshold_hit = cfg.reward_threshold is not None and record["score"] >= cfg.reward_threshold
        monitor_stop = bool(warnings) and cfg.monitors.stop_on_warning
        last = done == self.total_steps or threshold_hit or monitor_stop
        if self.probe.due(done, last):
            with timer("probe"):
                record.update(self.run_probe())
        if self.selection is not None and self.selection.due(done, last):
            with timer("select"):
                record.update(self.run_selection(done))
        self.last_step = done
        record.update({**timer.record(), "time_checkpoint_s": round(self.checkpoint_s, 4),
                       "elapsed_s": round(time.time() - self.t0, 3)})
        self.write(record)
        self.bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}")
        self.bar.update(1)
        self.checkpoint_s = 0.0
        if done % cfg.save_every == 0 or last:
            started = time.perf_counter()
            save(done)
            self.checkpoint_s = time.perf_counter() - started
        if (threshold_hit or monitor_stop) and self.main:
            why = (f"mean score {record['score']:.4f} reached reward_threshold {cfg.reward_threshold}"
                   if threshold_hit else "a monitor warned and monitors.stop_on_warning is set")
            print(f"{self.name}: {why} at step {done}; stopping", flush=True)
        self.stopped_early = threshold_hit or monitor_stop
        return self.stopped_early

    def close(self, saved_to: Path | None) -> None:
        self.bar.close()
        if self.main:
            self.metrics.close()
            print(f"{self.name}: done in {time.time() - self.t0:.1f}s"
                  f"{' (early stop)' if getattr(self, 'stopped_early', False) else ''} | policy saved to {saved_to}",
                  flush=True)

