"""The classifier judge: a local Hugging Face sequence classifier's probability of one label."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import Field

from alignkit.errors import ConfigError, ModelLoadError
from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch
from alignkit.models import resolve_device


class ClassifierJudge:
    """Softmax probability of one named label of a Hugging Face sequence classifier.

    A classifier with a single output (a reward model in the Hugging Face format) gives its raw
    logit instead, and needs no label. With `with_prompt` the prompt and completion are fed as a
    text pair, as cross-encoder reward models expect; otherwise the completion is read alone.
    """

    def __init__(self, model, tokenizer, label: str | None, *, with_prompt: bool = False,
                 batch_size: int = 16, max_length: int = 512, source: str = "classifier"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.with_prompt, self.batch_size, self.max_length = with_prompt, batch_size, max_length
        id2label = {int(i): name for i, name in model.config.id2label.items()}
        if model.config.num_labels == 1:
            self.label_id = None
            self.name = label or id2label.get(0, "score")
        else:
            by_name = {name: i for i, name in id2label.items()}
            if label not in by_name:
                choices = ", ".join(repr(name) for name in by_name)
                given = "no label was given" if label is None else f"it has no label {label!r}"
                raise ConfigError(f"classifier '{source}': {given}; choose one of: {choices}")
            self.label_id = by_name[label]
            self.name = label

    @classmethod
    def load(cls, path: Path | str, label: str | None, *, device: str = "auto", with_prompt: bool = False,
             batch_size: int = 16, max_length: int = 512) -> ClassifierJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"classifier '{path}': no config.json, so not a Hugging Face model directory")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds of errors on a bad directory
            raise ModelLoadError(f"classifier '{path}': cannot load: {e}") from None
        model.to(resolve_device(device))
        return cls(model, tokenizer, label, with_prompt=with_prompt, batch_size=batch_size,
                   max_length=max_length, source=str(path))

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            texts = list(completions[start:start + self.batch_size])
            pair = (list(prompts[start:start + self.batch_size]), texts) if self.with_prompt else (texts,)
            enc = self.tokenizer(*pair, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()  # (B, num_labels)
            if self.label_id is None:
                scores.extend(logits[:, 0].cpu().tolist())
            else:
                scores.extend(torch.softmax(logits, dim=-1)[:, self.label_id].cpu().tolist())
        return scores


class ClassifierComponent(ComponentBase):
    judge: Literal["classifier"]
    """A Hugging Face sequence classifier's probability of one label."""
    path: Path
    """Classifier directory (AutoModelForSequenceClassification), relative to the working directory."""
    label: str | None = None
    """Label to score, by name from the model's id2label; not needed for a single-output model."""
    with_prompt: bool = False
    """Feed (prompt, completion) as a text pair instead of the completion alone."""
    batch_size: int = Field(16, ge=1)
    """Texts per forward pass."""
    max_length: int = Field(512, ge=8)
    """Tokens per text; longer texts are cut."""

    def build(self, device: str) -> Judge:
        return ClassifierJudge.load(self.path, self.label, device=device, with_prompt=self.with_prompt,
                                    batch_size=self.batch_size, max_length=self.max_length)
