"""LoRA adapters through peft, and saving a model as a base plus an optional adapter."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from alignkit.io import atomic_dir
from alignkit.models.loading import META_FILE


def attach_lora(model, *, r: int = 8, alpha: int = 16, dropout: float = 0.05,
                target_modules: list[str] | tuple[str, ...] = ("q_proj", "v_proj")):
    """Wrap a causal LM with fresh LoRA adapters; only the adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    base = getattr(model, "alignkit_base", None)
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=list(target_modules))
    peft_model = get_peft_model(model, config)
    peft_model.alignkit_base = base
    fused_lora_products(peft_model)
    return peft_model


def lora_linear_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward, base(x) + B A dropout(x) * scale, arranged for fewer passes over the
    output: the scale multiplies the rank-r product (r columns, not the layer's outputs), and B's product
    is accumulated into the base layer's output in place (addmm_, the gemm's beta = 1) instead of
    written, scaled and added as three more full-width tensors, forward and backward. The same numbers
    up to float rounding (exactly the same when the scale is a power of two); a test compares both.

    Anything but the plain case (the adapter disabled or merged, several active adapters, a variant such
    as DoRA, per-call adapter names, autocast, an input of another dtype than the adapter's) takes PEFT's
    own forward."""
    adapters = layer.active_adapters
    if (args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 or layer.lora_variant
            or adapters[0] not in layer.lora_A or torch.is_autocast_enabled(x.device.type)):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if x.dtype != a.dtype or b.dtype != a.dtype:
        return type(layer).forward(layer, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    out = layer.base_layer(flat)
    low_rank = F.linear(layer.lora_dropout[name](flat), a) * layer.scaling[name]
    if out.dtype == b.dtype and out.dim() == 2 and out._base is None:  # in place only on a fresh 2-D tensor
        out.addmm_(low_rank, b.t())
    else:  # a base layer that hands back a view or another dtype
        out = out + F.linear(low_rank, b).to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def fused_lora_products(model) -> int:
    """Every PEFT LoRA Linear layer of `model` computes through `lora_linear_forward` from now on (an
    instance attribute: saved adapters, merging and the rollout engine's generation copy, which
    replaces these layers, are unaffected). Returns how many layers it patched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    patched = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and "forward" not in m.__dict__:
            m.forward = partial(lora_linear_forward, m)
            patched += 1
    return patched


def merge_lora(model):
    """Fold every adapter into its base weights (W + (alpha/r) B A) and return the plain model."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    base = getattr(model, "alignkit_base", None)
    merged = model.merge_and_unload()
    merged.alignkit_base = base
    return merged


def save_model(model, tokenizer, out_dir: Path, *, extra_meta: dict | None = None) -> Path:
    """Save a model so that `load_model(out_dir)` restores it: the adapter alone when there is one.

    The directory appears complete or not at all.
    """
    with atomic_dir(Path(out_dir)) as tmp:
        write_model(model, tokenizer, tmp, extra_meta)
    return Path(out_dir)


def write_model(model, tokenizer, directory: Path, extra_meta: dict | None = None) -> None:
    """Write weights (or adapter), tokenizer and alignkit.json into an existing directory."""
    from peft import PeftModel

    is_adapter = isinstance(model, PeftModel)
    meta = {"kind": "adapter" if is_adapter else "full",
            "base_model": getattr(model, "alignkit_base", None) if is_adapter else None}
    meta.update(extra_meta or {})
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2))
