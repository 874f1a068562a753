"""The repetition judge: the share of a completion's word n-grams that repeat an earlier one of it."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import Field

from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch
from alignkit.evaluate.monitors import repetition


class RepetitionJudge:
    """Per-reply repetition, 0 (every word n-gram new) .. 1: the degeneracy monitor's measure
    (`evaluate.monitors.repetition`), as a score.

    With a negative weight beside a reward model it is a repetition penalty on the RL reward, the
    rule-based guard that R1-style GRPO recipes put beside their learned or verifiable rewards
    (e.g. open-r1's repetition-penalty reward): a learned proxy seldom saw looping replies among
    its training pairs, so it cannot be trusted to score them low.
    """

    name = "repetition"

    def __init__(self, n: int = 3):
        self.n = n

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        return [repetition(c, self.n) for c in completions]


class RepetitionComponent(ComponentBase):
    judge: Literal["repetition"]
    """Share of the completion's word n-grams that repeat an earlier n-gram of it, 0..1 (give it a
    negative weight to penalise repetition)."""
    n: int = Field(3, ge=1)
    """Words per n-gram."""

    def build(self, device: str) -> Judge:
        return RepetitionJudge(self.n)
