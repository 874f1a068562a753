"""The sentiment judge: VADER's compound polarity of a completion."""

from __future__ import annotations

from typing import Literal, Sequence

from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch


class SentimentJudge:
    """VADER's compound sentiment of the completion, in -1 (negative) .. +1 (positive).

    Kept on VADER's own scale; a weight in the composition rescales it where needed.
    """

    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        return [float(self.analyzer.polarity_scores(c)["compound"]) for c in completions]


class SentimentComponent(ComponentBase):
    judge: Literal["sentiment"]
    """VADER compound sentiment of the completion, -1..1."""

    def build(self, device: str) -> Judge:
        return SentimentJudge()
