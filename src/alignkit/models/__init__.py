"""Models: loading (embedded, HF directory, adapter directory, GGUF), LoRA, scalar heads, generation (the rollout engine)."""

from alignkit.models.generation import Generation, generate, render_prompt
from alignkit.models.heads import ScalarHeadModel
from alignkit.models.loading import load_model, resolve_device, resolve_dtype
from alignkit.models.lora import attach_lora, merge_lora, save_model
from alignkit.models.rollout import RolloutEngine

__all__ = [
    "Generation", "ScalarHeadModel", "attach_lora", "generate", "load_model", "merge_lora",
    "RolloutEngine", "render_prompt", "resolve_device", "resolve_dtype", "save_model",
]
