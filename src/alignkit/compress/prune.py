"""Pruning of a causal LM's linear layers: magnitude, Wanda and structured, then masked recovery.

    magnitude    zero the smallest |W|, per layer or over all layers at once (global)
    wanda        zero the smallest |W_ij| * ||X_j||_2 within each output row, X the layer's input on
                 calibration text (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", eq. 1)
    structured   drop whole MLP channels (a row of gate_proj and up_proj, a column of down_proj), scored
                 by ||down_proj[:, j]||_2 * ||h_j||_2 on calibration text; the result has real, smaller
                 matrices and an updated config, so it is faster and saves as a normal model

Unstructured masks hit the requested sparsity exactly: round(sparsity * n) weights per layer
(magnitude, per layer), per model (magnitude, global) or per output row (wanda). The output
embedding is never pruned: in tied models it is the input embedding too.

Recovery fine-tuning keeps the mask. Full fine-tuning multiplies each masked weight's gradient by
its mask and re-applies the mask after every step. LoRA's update B A is dense, so after merging
W + (alpha / r) B A the mask is applied again; merging without it would undo the pruning.

A saved directory is a normal Hugging Face model directory (what `load_model` reads) plus
`prune.json` with the method, sparsity and recovery losses.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from alignkit.compress.quantize import load_calibration_texts, quantizable_linears
from alignkit.errors import AlignkitError
from alignkit.io import atomic_dir
from alignkit.losses.sft import IGNORE, sft_loss_sum

METHODS = ("magnitude", "wanda", "structured")
SCOPES = ("layer", "global")
RECOVERY = ("none", "lora", "full")
PRUNE_FILE = "prune.json"
HELDOUT_DIR = Path(__file__).resolve().parents[1] / "data" / "heldout"
CALIB_TEXT = HELDOUT_DIR / "calib.txt"
EVAL_TEXT = HELDOUT_DIR / "eval.txt"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PruneError(AlignkitError):
    """A pruning option does not fit the model or is unknown."""


def check_options(method: str, sparsity: float, scope: str = "layer", recovery: str = "none") -> None:
    if method not in METHODS:
        raise PruneError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if not 0 <= sparsity < 1:
        raise PruneError(f"--sparsity must be in [0, 1), got {sparsity}")
    if scope not in SCOPES:
        raise PruneError(f"unknown scope {scope!r}: choose one of {', '.join(SCOPES)}")
    if recovery not in RECOVERY:
        raise PruneError(f"unknown recovery {recovery!r}: choose one of {', '.join(RECOVERY)}")


# ---------------------------------------------------------------------------------------------
# Masks


def lowest_mask(scores: torch.Tensor, n_prune: int, dim: int | None = None) -> torch.Tensor:
    """A float 0/1 mask shaped like `scores` with exactly `n_prune` zeros at the lowest scores.

    dim=None ranks all entries together; dim=1 ranks each row on its own (n_prune zeros per row).
    Ties go to the lower index (a stable sort), so the count is exact even among equal scores.
    """
    if dim is None:
        flat = torch.ones(scores.numel())
        flat[torch.argsort(scores.flatten(), stable=True)[:n_prune]] = 0
        return flat.view_as(scores)
    order = torch.argsort(scores, dim=dim, stable=True)
    mask = torch.ones_like(scores, dtype=torch.float32)
    return mask.scatter(dim, order.narrow(dim, 0, n_prune), 0.0)


def magnitude_masks(linears: dict[str, nn.Linear], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """Masks zeroing the smallest |W|: round(sparsity * numel) per layer, or over all layers (global)."""
    weights = {name: m.weight.detach().abs().float().cpu() for name, m in linears.items()}
    if scope == "layer":
        return {name: lowest_mask(w, round(sparsity * w.numel())) for name, w in weights.items()}
    flat = torch.cat([w.flatten() for w in weights.values()])
    mask = lowest_mask(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = mask[start:start + w.numel()].view_as(w)
        start += w.numel()
    return out


@torch.no_grad()
def input_norms(model: nn.Module, tokenizer, texts: list[str], linears: dict[str, nn.Linear],
                max_length: int = 256) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input column j of every layer in `linears`, over all calibration tokens.

    Texts go one at a time, so no padding enters the norms.
    """
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])  # (tokens, in)
            sums[name] += x.pow(2).sum(0).cpu()
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    device = next(model.parameters()).device
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


def wanda_masks(linears: dict[str, nn.Linear], norms: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Masks zeroing, in each output row, the round(sparsity * in_features) lowest |W_ij| * ||X_j||."""
    masks = {}
    for name, m in linears.items():
        score = m.weight.detach().abs().float().cpu() * norms[name][None, :]  # (out, in)
        masks[name] = lowest_mask(score, round(sparsity * m.in_features), dim=1)
    return masks


@torch.no_grad()
def apply_masks(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        w = linears[name].weight
        w.mul_(mask.to(w.device, w.dtype))


def sparsity_of(linears: dict[str, nn.Linear]) -> float:
    """Fraction of exactly-zero weights over the given layers."""
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    return zeros / max(sum(m.weight.numel() for m in linears.values()), 1)


# ---------------------------------------------------------------------------------------------
# Structured: MLP channels


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style model (model.model.layers), each with mlp.gate/up/down_proj."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(l, "mlp") and hasattr(l.mlp, "down_proj") for l in layers):
        raise PruneError(f"{type(model).__name__}: structured pruning needs a Llama-style model "
                         "(model.layers[i].mlp with gate_proj, up_proj and down_proj)")
    return layers


def mlp_channel_scores(model: nn.Module, tokenizer, texts: list[str], max_length: int = 256) -> list[torch.Tensor]:
    """Per decoder layer, a score per MLP channel j: ||down_proj[:, j]||_2 * ||h_j||_2, h = down_proj's input.

    A channel's contribution to the layer's output is h_j * down_proj[:, j], so this is the norm of
    what removing it takes away, summed over the calibration tokens (Wanda's score for a column).
    """
    downs = {str(i): l.mlp.down_proj for i, l in enumerate(decoder_layers(model))}
    norms = input_norms(model, tokenizer, texts, downs, max_length)
    return [downs[i].weight.detach().float().norm(dim=0).cpu() * norms[i] for i in downs]


def keep_rows(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear holding only output rows (dim 0) or input columns (dim 1) `index` of `linear`."""
    w = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    out_f, in_f = w.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            new.bias.copy_(linear.bias if dim == 1 else linear.bias.index_select(0, index.to(w.device)))
    return new


def keep_mlp_channels(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Shrink every layer's MLP, in place, to the channels in keep[i] (the same count in every layer)."""
    layers = decoder_layers(model)
    sizes = {len(k) for k in keep}
    if len(keep) != len(layers) or len(sizes) != 1:
        raise PruneError("keep_mlp_channels needs one index list per layer, all of the same length")
    for layer, index in zip(layers, keep):
        index = index.sort().values  # keep the channels' order, so outputs match channel for channel
        mlp = layer.mlp
        mlp.gate_proj, mlp.up_proj = keep_rows(mlp.gate_proj, index, 0), keep_rows(mlp.up_proj, index, 0)
        mlp.down_proj = keep_rows(mlp.down_proj, index, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(index)
    model.config.intermediate_size = sizes.pop()
    return model


def structured_prune(model: nn.Module, tokenizer, texts: list[str], sparsity: float) -> dict:
    """Drop round(sparsity * intermediate_size) MLP channels per layer, the lowest-scoring ones."""
    scores = mlp_channel_scores(model, tokenizer, texts)
    width = scores[0].numel()
    kept = width - round(sparsity * width)
    if kept < 1:
        raise PruneError(f"--sparsity {sparsity} leaves no MLP channel of {width}")
    keep_mlp_channels(model, [s.topk(kept).indices for s in scores])
    return {"intermediate_size_before": width, "intermediate_size_after": kept}


# ---------------------------------------------------------------------------------------------
# Recovery fine-tuning that keeps the mask


def text_batches(tokenizer, texts: list[str], max_length: int) -> list[dict]:
    """One tokenised example per text, every token a target (plain language-model loss)."""
    return [{"input_ids": ids, "labels": ids} for ids in
            (tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts) if len(ids) > 1]


def collate_texts(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def recover(model: nn.Module, tokenizer, masks: dict[str, torch.Tensor], texts: list[str], *, mode: str = "lora",
            steps: int = 20, learning_rate: float = 2e-4, batch_size: int = 4, max_length: int = 256,
            lora_r: int = 8, seed: int = 0, progress: bool = True) -> tuple[nn.Module, list[float]]:
    """Fine-tune a pruned model on `texts` for `steps` steps; weights zeroed by `masks` stay zero.

    Returns the (merged, plain) model and the per-step training losses.
    """
    from tqdm.auto import tqdm

    from alignkit.models import attach_lora, merge_lora

    if mode not in ("lora", "full"):
        raise PruneError(f"unknown recovery {mode!r}: choose lora or full")
    rows = text_batches(tokenizer, texts, max_length)
    if not rows:
        raise PruneError("recovery needs at least one calibration text of two tokens or more")
    torch.manual_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    linears = quantizable_linears(model)
    handles = []
    if mode == "lora":
        model.requires_grad_(False)
        model = attach_lora(model, r=lora_r, alpha=2 * lora_r, dropout=0.0, target_modules=ALL_LINEAR)
    else:
        model.requires_grad_(True)
        for name, mask in masks.items():
            w = linears[name].weight
            m = mask.to(w.device, w.dtype)
            handles.append(w.register_hook(lambda g, m=m: g * m))  # masked weights get no gradient
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    order: list[int] = []
    for _ in tqdm(range(steps), desc=f"recovery ({mode})", unit="step", disable=not progress):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=generator).tolist()
        batch = collate_texts([rows[i] for i in order[:batch_size]], pad_id)
        order = order[batch_size:]
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total, count = sft_loss_sum(logits, batch["labels"])
        loss = total / count.clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if mode == "full":
            apply_masks(linears, masks)  # AdamW leaves masked weights at zero already; this makes it certain
        losses.append(round(loss.item(), 6))
    for h in handles:
        h.remove()
    if mode == "lora":
        model = merge_lora(model)  # W + (alpha/r) B A is dense ...
        apply_masks(quantizable_linears(model), masks)  # ... so mask again
    model.requires_grad_(False)
    return model.eval(), losses


# ---------------------------------------------------------------------------------------------
# Prune, save, load


def prune_model(model: nn.Module, tokenizer, method: str, sparsity: float, *, scope: str = "layer",
                texts: list[str] | None = None) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """Prune a copy of `model`: returns (pruned model, masks by layer name (empty for structured), info)."""
    check_options(method, sparsity, scope)
    if method in ("wanda", "structured") and not texts:
        raise PruneError(f"{method} pruning needs calibration text")
    pruned = copy.deepcopy(model).eval()
    info: dict = {"method": method, "sparsity": sparsity}
    if method == "structured":
        info.update(structured_prune(pruned, tokenizer, texts, sparsity))
        return pruned, {}, info
    linears = quantizable_linears(pruned)
    if method == "magnitude":
        masks = magnitude_masks(linears, sparsity, scope)
        info["scope"] = scope
    else:
        masks = wanda_masks(linears, input_norms(pruned, tokenizer, texts, linears), sparsity)
    apply_masks(linears, masks)
    return pruned, masks, info


def save_pruned(model: nn.Module, tokenizer, out_dir: Path, info: dict) -> Path:
    """A Hugging Face model directory plus prune.json; it appears whole or not at all."""
    from alignkit.models.lora import write_model

    linears = quantizable_linears(model)
    info = {**info, "parameters": sum(p.numel() for p in model.parameters()),
            "measured_sparsity": round(sparsity_of(linears), 6)}
    with atomic_dir(Path(out_dir)) as tmp:
        write_model(model, tokenizer, tmp, {"pruning": info["method"]})
        (tmp / PRUNE_FILE).write_text(json.dumps(info, indent=2))
    return Path(out_dir)


def prune(model_spec: str, out_dir: Path, *, method: str, sparsity: float, scope: str = "layer",
          calib: Path | None = None, calib_samples: int = 64, recovery: str = "none", recovery_steps: int = 20,
          learning_rate: float = 2e-4, batch_size: int = 4, lora_r: int = 8, seed: int = 0,
          device: str = "cpu") -> dict:
    """Load, prune, optionally recover, save; returns the info written to prune.json."""
    from alignkit.models import load_model, merge_lora

    check_options(method, sparsity, scope, recovery)
    if recovery != "none" and recovery_steps < 1:
        raise PruneError(f"--recovery-steps must be at least 1 with --recovery {recovery}, got {recovery_steps}")
    texts = load_calibration_texts(calib or CALIB_TEXT, calib_samples)
    model, tokenizer = load_model(model_spec, device=device, dtype="float32")
    model = merge_lora(model)  # an adapter directory: prune base plus adapter
    start = time.perf_counter()
    pruned, masks, info = prune_model(model, tokenizer, method, sparsity, scope=scope, texts=texts)
    del model
    info.update({"base_model": model_spec, "calibration": {"file": str(calib or "shipped heldout/calib.txt"),
                                                           "texts": len(texts)}, "recovery": recovery})
    if recovery != "none":
        pruned, losses = recover(pruned, tokenizer, masks, texts, mode=recovery, steps=recovery_steps,
                                 learning_rate=learning_rate, batch_size=batch_size, lora_r=lora_r, seed=seed)
        info.update({"recovery_steps": recovery_steps, "recovery_losses": losses})
    info["seconds"] = round(time.perf_counter() - start, 2)
    save_pruned(pruned, tokenizer, out_dir, info)
    return json.loads((Path(out_dir) / PRUNE_FILE).read_text())
