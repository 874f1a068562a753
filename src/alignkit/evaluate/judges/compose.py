"""Judges composed into one score: total = sum of weight * score over named components, optionally
mapped to named categories by thresholds."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from pydantic import Field, model_validator

from alignkit.config import Strict
from alignkit.errors import ConfigError
from alignkit.evaluate.judges.base import Judge, check_batch
from alignkit.evaluate.judges.llm import LLMPairwiseJudge, win_rates


class Categories(Strict):
    labels: list[str] = Field(min_length=2)
    """Category names from the lowest total to the highest, e.g. [safe, borderline, toxic]."""
    thresholds: list[float]
    """Strictly increasing boundaries, one fewer than labels; a total equal to a threshold goes up."""

    @model_validator(mode="after")
    def _check(self):
        if len(self.thresholds) != len(self.labels) - 1:
            raise ValueError(f"{len(self.labels)} labels need {len(self.labels) - 1} thresholds, "
                             f"got {len(self.thresholds)}")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds must be strictly increasing, got {self.thresholds}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self

    def label(self, score: float) -> str:
        return self.labels[bisect.bisect_right(self.thresholds, score)]


@dataclass
class Component:
    """One named, weighted judge of a composition."""

    name: str
    judge: Judge | LLMPairwiseJudge
    weight: float = 1.0


@dataclass
class Scored:
    """A completion's composed score."""

    total: float
    """sum of weight * component score."""
    components: dict[str, float]
    """Each component's own score, before weighting, by component name."""
    category: str | None = None
    """The category of `total` when the composition has categories."""


class ComposedJudge:
    """Judges combined into one score: total = sum of weight * score, optionally categorised.

    A pairwise LLM component scores a completion by its win rate against the other completions of
    the same prompt, so it needs groups (`score_groups`); the other judges score completions alone.
    """

    def __init__(self, components: list[Component], categories: Categories | None = None):
        if not components:
            raise ValueError("a composed judge needs at least one component")
        self.components, self.categories = components, categories
        self.name = "+".join(f"{c.name}*{c.weight}" for c in components)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [s.total for s in self.score_detailed(prompts, completions)]

    def score_detailed(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Scored]:
        check_batch(prompts, completions)
        pairwise = [c.name for c in self.components if isinstance(c.judge, LLMPairwiseJudge)]
        if pairwise:
            raise ConfigError(f"component(s) {', '.join(pairwise)} compare completions with each other: "
                              "score groups of completions per prompt (score_groups) instead")
        raw = {c.name: c.judge.score(prompts, completions) for c in self.components}
        return [self._combine({name: scores[k] for name, scores in raw.items()}) for k in range(len(completions))]

    def score_groups(self, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[Scored]]:
        """Scores for every completion of every prompt, grouped as given."""
        if len(prompts) != len(groups):
            raise ValueError(f"{len(prompts)} prompts but {len(groups)} groups of completions")
        flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
        flat = [c for group in groups for c in group]
        raw = {}
        for c in self.components:
            if isinstance(c.judge, LLMPairwiseJudge):
                raw[c.name] = [w for row in win_rates(c.judge, prompts, groups) for w in row]
            else:
                raw[c.name] = c.judge.score(flat_prompts, flat)
        scored = [self._combine({name: scores[k] for name, scores in raw.items()}) for k in range(len(flat))]
        out, start = [], 0
        for group in groups:
            out.append(scored[start:start + len(group)])
            start += len(group)
        return out

    def _combine(self, components: dict[str, float]) -> Scored:
        total = sum(c.weight * components[c.name] for c in self.components)
        category = self.categories.label(total) if self.categories is not None else None
        return Scored(total, components, category)
