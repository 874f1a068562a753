"""LoRA adapters through peft, and saving a model as a base plus an optional adapter."""

from __future__ import annotations

import json
from pathlib import Path

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
    return peft_model


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
