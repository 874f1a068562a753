"""The reward judge: a trained reward model's scalar on prompt + completion."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from alignkit.errors import ModelLoadError
from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch
from alignkit.models import ScalarHeadModel
from alignkit.models.heads import HEAD_FILE, is_reward_model, load_reward_model
from alignkit.models.pooled_head import POOLED_HEAD_FILE, PooledHeadModel


class RewardModelJudge:
    """The scalar of a trained reward model on prompt + completion: a ScalarHeadModel (the scalar at the
    last token) or a frozen backbone's PooledHeadModel (a head on the reply's pooled features).

    Sequences are encoded as in reward-model training (data.prefs.encode_response: chat-rendered
    prompt, completion, EOS), which is also how a policy's rollouts look.
    """

    name = "reward"

    def __init__(self, model: ScalarHeadModel | PooledHeadModel, tokenizer, batch_size: int = 8, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def load(cls, path: Path | str, *, device: str = "auto", batch_size: int = 8,
             max_length: int = 512) -> RewardModelJudge:
        path = Path(path)
        if not is_reward_model(path):
            raise ModelLoadError(f"reward model '{path}': no {HEAD_FILE} or {POOLED_HEAD_FILE} there, so it is not "
                                 "a reward model saved by alignkit")
        model, tokenizer = load_reward_model(path, device=device)
        return cls(model, tokenizer, batch_size, max_length)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        return self.model.score_texts(self.tokenizer, list(prompts), list(completions),
                                      batch_size=self.batch_size, max_length=self.max_length)


class RewardComponent(ComponentBase):
    judge: Literal["reward"]
    """A trained reward model's scalar on prompt + completion."""
    path: Path
    """Reward model directory saved by `train reward` (either kind), relative to the working directory."""
    batch_size: int = Field(8, ge=1)
    """Sequences per forward pass."""
    max_length: int = Field(512, ge=8)
    """Tokens per sequence, as in reward-model training; longer ones lose tokens from the left."""

    def build(self, device: str) -> Judge:
        return RewardModelJudge.load(self.path, device=device, batch_size=self.batch_size,
                                     max_length=self.max_length)
