"""The typed config of `alignkit compress distill` (the recipe is distill.py); free of torch so --help is fast."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from alignkit.config import LoraSettings, Strict, TrainSettings


class DistillData(Strict):
    train: Path
    """Training text: .txt (one text per line, every token a target), SFT JSONL ({"prompt","completion"}
    or {"messages"}; completion tokens are targets), or prompts when teacher_completions is true."""
    eval: Path | None = None
    """Optional held-out file in the same format, for eval KL, CE and top-1 agreement."""
    max_length: int = Field(256, ge=8)
    """Tokens per example; longer examples are cut from the right."""
    teacher_completions: bool = False
    """Train on the teacher's greedy completions of the prompts in `train` (a prompts file: JSONL with
    "prompt", or one prompt per line) instead of the text itself."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens per teacher completion (with teacher_completions)."""


class StudentSettings(Strict):
    model: str | None = None
    """A separate student model ('embedded', a directory, a .gguf) sharing the teacher's tokenizer;
    null builds the student from the teacher (the keys below)."""
    layers: list[int] | None = None
    """Teacher decoder layers the built student keeps, in order; null keeps every other one (0, 2, 4, ...)."""
    intermediate_size: int | None = Field(None, ge=1)
    """MLP width of the built student; null keeps the teacher's. Narrower keeps the channels with the
    highest ||down_proj[:, j]|| * ||h_j|| on the training text."""


class DistillConfig(TrainSettings):
    model: str = "embedded"
    """The teacher: 'embedded', a Hugging Face model directory, an adapter directory or a .gguf file."""
    data: DistillData
    """Training and eval text."""
    student: StudentSettings = StudentSettings()
    """The student: a separate model, or one built from the teacher."""
    lora: LoraSettings = LoraSettings(enabled=False)
    """LoRA on the student; by default (enabled=false) every student weight trains."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the soft (KL) term; 1 - alpha weighs the hard-label cross-entropy."""
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature T of both teacher and student in the KL term (typically 2 to 10)."""
    hidden_weight: float = Field(0.0, ge=0)
    """Weight of hidden-state matching (MSE per token); 0 turns it off."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW)."""
