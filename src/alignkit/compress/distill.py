"""Knowledge distillation of a causal LM into a smaller student, with exact resume.

    alignkit compress distill --config configs/distill.yaml [key=value ...] [--resume RUN_DIR]

The student is either another causal LM sharing the teacher's tokenizer (`student.model`), or built
from the teacher: a subset of its decoder layers (default every other one), copied with their
weights, and optionally a narrower MLP keeping the channels that matter most on the training text
(the structured-pruning score of prune.py). Embeddings are copied too, and they are a large share
of a small model (SmolLM2-135M: 49152 x 576 = 28.3M of 134.5M parameters), so halving the
parameters takes fewer layers and a narrower MLP.

Loss per labelled token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (losses/distill.py),
plus, when hidden_weight > 0, hidden_weight * MSE between student hidden states (projected to the
teacher's width when the widths differ) and the teacher's at matching depths.

Setup -> train -> evaluate -> save, as in recipes/sft.py; batches are fixed by (seed, step) alone,
so a resumed run repeats the lost steps exactly.
"""

from __future__ import annotations

import copy
import contextlib
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

# The config lives in a torch-free module so that `alignkit --help` stays fast; it is part of this recipe.
from alignkit.compress.distill_config import DistillConfig
from alignkit.data.batching import global_batch, my_micro_batches
from alignkit.data.sft import Example, build_examples, collate, tokenize_conversation
from alignkit.errors import AlignkitError
from alignkit.io import JsonlLog, read_jsonl, write_jsonl
from alignkit.losses.distill import distill_loss, distill_sums, hidden_mse_sum
from alignkit.runs import METRICS_FILE

COMPLETIONS_FILE = "teacher_completions.jsonl"


# ---------------------------------------------------------------------------------------------
# The student


def build_student(teacher: nn.Module, layers: list[int], intermediate_size: int | None = None,
                  channel_scores: list[torch.Tensor] | None = None) -> nn.Module:
    """A copy of `teacher` with only decoder `layers` (weights copied) and optionally a narrower MLP.

    channel_scores (one tensor per teacher layer) choose which MLP channels stay; the highest win.
    """
    from alignkit.compress.prune import decoder_layers, keep_mlp_channels

    n = len(decoder_layers(teacher))
    if not layers or any(not 0 <= i < n for i in layers) or len(set(layers)) != len(layers):
        raise AlignkitError(f"student.layers must be distinct teacher layer indices in 0..{n - 1}, got {layers}")
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList([student.model.layers[i] for i in layers])
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    student.model.layers = kept
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    width = student.config.intermediate_size
    if intermediate_size is not None and intermediate_size != width:
        if intermediate_size > width:
            raise AlignkitError(f"student.intermediate_size {intermediate_size} is wider than the teacher's {width}")
        if channel_scores is None:
            raise AlignkitError("a narrower student MLP needs channel scores (from calibration text)")
        keep_mlp_channels(student, [channel_scores[i].topk(intermediate_size).indices for i in layers])
    return student


def hidden_pairs(n_student: int, n_teacher: int, layers: list[int] | None) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices to match; index 0 is the embeddings, i the output of block i.

    A built student matches each kept block to the teacher block it came from; otherwise student
    block i matches teacher block round(i * n_teacher / n_student).
    """
    if layers is not None:
        return [(i + 1, t + 1) for i, t in enumerate(layers)]
    return [(i, round(i * n_teacher / n_student)) for i in range(1, n_student + 1)]


class Student(nn.Module):
    """The student LM plus, for hidden-state matching across widths, a trainable projection to the teacher's width."""

    def __init__(self, lm: nn.Module, teacher_width: int, project: bool):
        super().__init__()
        self.lm = lm
        width = lm.config.hidden_size
        self.proj = nn.Linear(width, teacher_width, bias=False) if project and width != teacher_width else None

    def forward(self, input_ids, attention_mask, with_hidden: bool = False):
        """(logits, hidden states projected to the teacher's width, or None). The projection runs
        inside forward so that DDP synchronises its gradients like every other weight's."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=with_hidden)
        if not with_hidden:
            return out.logits, None
        return out.logits, [self.proj(h) if self.proj is not None else h for h in out.hidden_states]


def make_student(cfg: DistillConfig, teacher, tokenizer, texts: list[str], device) -> tuple[nn.Module, list[int] | None]:
    """(student LM, teacher layers it was built from or None for a separate model)."""
    from alignkit.compress.prune import decoder_layers, mlp_channel_scores
    from alignkit.models import attach_lora, load_model

    if cfg.student.model is not None:
        lm, student_tok = load_model(cfg.student.model, device=device, dtype="float32")
        if student_tok.get_vocab() != tokenizer.get_vocab():
            raise AlignkitError(f"student.model {cfg.student.model}: its tokenizer differs from the teacher's "
                                "(distillation compares their token distributions, so they must share one)")
        layers = None
    else:
        n = len(decoder_layers(teacher))
        layers = cfg.student.layers if cfg.student.layers is not None else list(range(0, n, 2))
        scores = None
        if cfg.student.intermediate_size is not None:
            scores = mlp_channel_scores(teacher, tokenizer, texts[:32], cfg.data.max_length)
        lm = build_student(teacher, layers, cfg.student.intermediate_size, scores)
    if cfg.lora.enabled:
        lm.requires_grad_(False)
        lm = attach_lora(lm, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                         target_modules=cfg.lora.target_modules)
    else:
        lm.requires_grad_(True)
    return lm, layers


# ---------------------------------------------------------------------------------------------
# Data


def load_examples(tokenizer, path: Path, max_length: int) -> list[Example]:
    """.txt: one text per line, every token a target; JSONL: SFT records via data.sft."""
    from alignkit.data.prompts import load_prompts

    if Path(path).suffix == ".jsonl":
        return build_examples(tokenizer, path, max_length)[0]
    examples = []
    for text in load_prompts(path):
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) > 1:
            examples.append(Example(ids, list(ids)))
    if not examples:
        raise AlignkitError(f"{path}: no text of two tokens or more")
    return examples


def teacher_examples(teacher, tokenizer, cfg: DistillConfig, run_dir: Path, main_proc: bool) -> list[Example]:
    """Examples made of the teacher's greedy completions, generated once and kept in the run directory."""
    from alignkit.data.prompts import load_prompts
    from alignkit.models import generate

    cached = run_dir / COMPLETIONS_FILE
    if cached.is_file():
        records = [rec for _, rec in read_jsonl(cached)]
    else:
        prompts = load_prompts(cfg.data.train)
        gen = generate(teacher, tokenizer, prompts, max_new_tokens=cfg.data.max_new_tokens, batch_size=8)
        records = [{"prompt": p, "completion": c} for p, c in zip(prompts, gen.texts)]
        if main_proc:
            write_jsonl(cached, records)
    return [tokenize_conversation(tokenizer, [{"role": "user", "content": r["prompt"]},
                                              {"role": "assistant", "content": r["completion"]}],
                                  cfg.data.max_length) for r in records]


# ---------------------------------------------------------------------------------------------
# Loss and evaluation


def batch_terms(student: Student, teacher, batch: dict, cfg: DistillConfig, pairs) -> tuple[torch.Tensor, dict]:
    """(loss sum over the batch's labelled tokens, sums of its parts) for one micro-batch."""
    want_hidden = cfg.hidden_weight > 0
    with torch.no_grad():
        t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=want_hidden)
    s_logits, s_hidden = student(batch["input_ids"], batch["attention_mask"], with_hidden=want_hidden)
    kl, ce, count = distill_sums(s_logits, t_out.logits, batch["labels"], cfg.temperature)
    loss = distill_loss(kl, ce, cfg.alpha, cfg.temperature)
    parts = {"kl": kl.detach(), "ce": ce.detach(), "tokens": count}
    if want_hidden:
        mask = batch["attention_mask"]
        hidden = sum(hidden_mse_sum(s_hidden[i], t_out.hidden_states[j], mask) for i, j in pairs) / len(pairs)
        # Token-normalised like the other terms: scale by labelled tokens per attended token.
        hidden = hidden * count / mask.sum().clamp(min=1)
        loss = loss + cfg.hidden_weight * hidden
        parts["hidden"] = hidden.detach()
    return loss, parts


@torch.no_grad()
def evaluate(student, teacher, examples: list[Example], pad_id: int, cfg: DistillConfig, accelerator) -> dict:
    """Held-out mean KL at temperature T, CE, and top-1 agreement with the teacher per labelled token."""
    student.eval()
    total = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # kl, ce, agree, tokens
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    for start in range(0, len(mine), cfg.micro_batch_size):
        batch = {k: v.to(accelerator.device) for k, v in
                 collate([examples[i] for i in mine[start:start + cfg.micro_batch_size]], pad_id).items()}
        s = student(batch["input_ids"], batch["attention_mask"])[0]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl, ce, count = distill_sums(s, t, batch["labels"], cfg.temperature)
        mask = batch["labels"][:, 1:] != -100
        agree = ((s[:, :-1].argmax(-1) == t[:, :-1].argmax(-1)) & mask).sum()
        total += torch.stack([kl.double(), ce.double(), agree.double(), count.double()])
    total = accelerator.reduce(total, reduction="sum")
    student.train()
    n = total[3].clamp(min=1)
    return {"eval_kl": round((total[0] / n).item(), 6), "eval_ce": round((total[1] / n).item(), 6),
            "eval_agreement": round((total[2] / n).item(), 6)}


# ---------------------------------------------------------------------------------------------
# The recipe


def main(cfg: DistillConfig, *, resume: Path | None = None, overwrite: bool = False) -> Path:
    """Distil; returns the run directory (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    from alignkit.models import load_model, merge_lora, save_model
    from alignkit.training import checkpoint, make_accelerator, make_optimizer, open_run_dir, resume_state

    # ---- setup ---------------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    rank, world, main_proc = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    teacher, tokenizer = load_model(cfg.model, device=accelerator.device, dtype="float32")
    teacher = merge_lora(teacher).eval().requires_grad_(False)
    run_dir = None
    if cfg.data.teacher_completions:
        # The completions are cached in the run directory, so it is opened before the data is built.
        run_dir = open_run_dir(cfg, "distill", resume, overwrite, accelerator)
        train = teacher_examples(teacher, tokenizer, cfg, run_dir, main_proc)
    else:
        train = load_examples(tokenizer, cfg.data.train, cfg.data.max_length)
    evals = load_examples(tokenizer, cfg.data.eval, cfg.data.max_length) if cfg.data.eval else []
    global_size = cfg.micro_batch_size * cfg.grad_accum * world
    steps_per_epoch = len(train) // global_size
    if steps_per_epoch == 0:
        raise AlignkitError(f"{cfg.data.train}: {len(train)} examples, fewer than one global batch of "
                            f"{global_size} (micro_batch_size x grad_accum x processes)")
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)

    texts = [tokenizer.decode(e.input_ids, skip_special_tokens=True) for e in train]
    lm, layers = make_student(cfg, teacher, tokenizer, texts, accelerator.device)
    n_teacher, n_student = teacher.config.num_hidden_layers, lm.config.num_hidden_layers
    student = Student(lm, teacher.config.hidden_size, project=cfg.hidden_weight > 0).to(accelerator.device)
    pairs = hidden_pairs(n_student, n_teacher, layers)
    if run_dir is None:
        run_dir = open_run_dir(cfg, "distill", resume, overwrite, accelerator)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(params, cfg, total_steps)
    student, optimizer = accelerator.prepare(student, optimizer)
    pad_id = tokenizer.pad_token_id
    start_step = resume_state(run_dir, resume, student, optimizer, scheduler, accelerator)
    metrics = JsonlLog(run_dir / METRICS_FILE) if main_proc else None
    student.train()

    n_student_params = sum(p.numel() for p in lm.parameters())
    n_teacher_params = sum(p.numel() for p in teacher.parameters())
    if main_proc:
        built = f"layers {layers}" if layers is not None else f"model {cfg.student.model}"
        print(f"distill: teacher {cfg.model} ({n_teacher_params / 1e6:.1f}M params) -> student {built}, "
              f"MLP {lm.config.intermediate_size} ({n_student_params / 1e6:.1f}M params, "
              f"{n_student_params / n_teacher_params:.0%}) | {len(train)} train / {len(evals)} eval examples | "
              f"{total_steps} steps | run dir {run_dir}"
              + (f" | resuming at step {start_step}" if start_step else ""), flush=True)

    # ---- train ---------------------------------------------------------------------------------
    t0 = time.time()
    if evals and start_step == 0:
        before = evaluate(student, teacher, evals, pad_id, cfg, accelerator)
        if main_proc:
            metrics.write({"step": 0, **before})
    bar = tqdm(total=total_steps, initial=start_step, desc="distill", disable=not main_proc, unit="step")
    record: dict = {}
    for step in range(start_step, total_steps):
        indices = global_batch(step, len(train), global_size, steps_per_epoch, cfg.seed)
        n_tokens = sum(sum(l != -100 for l in train[i].labels[1:]) for i in indices)
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "hidden": 0.0}
        micro_batches = my_micro_batches(indices, cfg.micro_batch_size, cfg.grad_accum, rank)
        for j, micro in enumerate(micro_batches):
            batch = {k: v.to(accelerator.device) for k, v in collate([train[i] for i in micro], pad_id).items()}
            sync = j == len(micro_batches) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(student)), accelerator.autocast():
                loss, parts = batch_terms(student, teacher, batch, cfg, pairs)
                # As in SFT: x world undoes DDP's average; / global tokens gives the global-batch mean.
                accelerator.backward(loss * world / max(n_tokens, 1))
            sums["loss"] += loss.item()
            for k in ("kl", "ce", "hidden"):
                sums[k] += float(parts.get(k, 0.0))
        total = accelerator.reduce(torch.tensor(list(sums.values()), dtype=torch.float64,
                                                device=accelerator.device), reduction="sum") / max(n_tokens, 1)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, **{k: round(v, 6) for k, v in zip(sums, total.tolist())}, "lr": lr,
                  "grad_norm": round(float(grad_norm), 6), "tokens": n_tokens,
                  "elapsed_s": round(time.time() - t0, 3)}
        if cfg.hidden_weight == 0:
            record.pop("hidden")
        if evals and cfg.eval_every and done % cfg.eval_every == 0 and done < total_steps:
            record.update(evaluate(student, teacher, evals, pad_id, cfg, accelerator))
        if main_proc:
            metrics.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}")
        bar.update(1)
        if done % cfg.save_every == 0 or done == total_steps:
            checkpoint(run_dir, done, total_steps, student, optimizer, scheduler, accelerator, cfg.keep_checkpoints)
    bar.close()

    # ---- evaluate and save -----------------------------------------------------------------------
    summary = {"steps": total_steps, "student_parameters": n_student_params,
               "parameter_ratio": round(n_student_params / n_teacher_params, 4)}
    if evals:
        summary.update(evaluate(student, teacher, evals, pad_id, cfg, accelerator))
        if main_proc:
            metrics.write({"step": total_steps, **{k: v for k, v in summary.items() if k.startswith("eval_")}})
    if main_proc:
        final = merge_lora(accelerator.unwrap_model(student).lm)
        save_model(final, tokenizer, run_dir / "final",
                   extra_meta={"distilled_from": cfg.model, "teacher_layers": layers})
        metrics.close()
        print(f"distill: done in {time.time() - t0:.1f}s | " + " | ".join(
            f"{k} {v}" for k, v in summary.items()) + f" | student saved to {run_dir / 'final'}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir
