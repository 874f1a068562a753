"""The rubric judge: a reply scored against written criteria, each a pass or a fail, by rules.

A criterion passes when every condition it states holds:

  any     at least one of these regular expressions occurs in the reply
  none    none of these regular expressions occurs in the reply
  echo    a regular expression run on the prompt: the reply repeats one of its matches (an order
          number, an item); a prompt without a match passes, since there is nothing to repeat
  words   the reply's word count lies in [min, max]
  max_repetition
          at most this share of the reply's word 3-grams repeat an earlier one of the same reply
          (`evaluate.monitors.repetition`), so a reply that says the same sentence twice fails

The score is the weighted share of criteria passed, 0..1. Matching ignores case. Rules are
transparent and cheap, and they share nothing with a learned reward model, which is what a gold
labeler in a simulated-feedback experiment needs (Gao et al. 2022; AlpacaFarm's simulated
annotators): a fixed stand-in for the people whose preferences the reward model learns.
"""

from __future__ import annotations

import re
from typing import Literal, Sequence

from pydantic import Field, field_validator, model_validator

from alignkit.config import Strict
from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch, check_distinct
from alignkit.evaluate.monitors import repetition


class Criterion(Strict):
    name: str
    """Short name, shown in per-criterion pass rates."""
    weight: float = Field(1.0, gt=0)
    """This criterion's share of the score is weight / sum of weights."""
    any: list[str] = []
    """Regular expressions; the reply must match at least one."""
    none: list[str] = []
    """Regular expressions; the reply must match none."""
    echo: str | None = None
    """Regular expression run on the prompt; the reply must contain one of its matches."""
    words: tuple[int, int] | None = None
    """[min, max] words (whitespace-separated) in the reply."""
    max_repetition: float | None = Field(None, ge=0, le=1)
    """The most of the reply's word 3-grams (share, 0..1) that may repeat an earlier 3-gram."""

    @field_validator("any", "none")
    @classmethod
    def _compile_all(cls, patterns):
        for p in patterns:
            _compile(p)
        return patterns

    @field_validator("echo")
    @classmethod
    def _compile_echo(cls, pattern):
        if pattern is not None:
            _compile(pattern)
        return pattern

    @model_validator(mode="after")
    def _has_condition(self):
        if not (self.any or self.none or self.echo or self.words or self.max_repetition is not None):
            raise ValueError(f"criterion {self.name!r} states no condition "
                             "(any, none, echo, words or max_repetition)")
        if self.words is not None and not 0 <= self.words[0] <= self.words[1]:
            raise ValueError(f"criterion {self.name!r}: words must be [min, max] with 0 <= min <= max")
        return self


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None


class RubricJudge:
    """The weighted share (0..1) of a rubric's criteria that a reply passes."""

    def __init__(self, criteria: list[Criterion], name: str = "rubric"):
        if not criteria:
            raise ValueError("a rubric needs at least one criterion")
        self.criteria, self.name = criteria, name
        self._any = [[_compile(p) for p in c.any] for c in criteria]
        self._none = [[_compile(p) for p in c.none] for c in criteria]
        self._echo = [_compile(c.echo) if c.echo else None for c in criteria]
        self._total = sum(c.weight for c in criteria)

    def passes(self, prompt: str, reply: str) -> dict[str, bool]:
        """Each criterion's pass (True) or fail, by name."""
        n_words = len(reply.split())
        out = {}
        for c, any_, none_, echo in zip(self.criteria, self._any, self._none, self._echo):
            ok = not any_ or any(p.search(reply) for p in any_)
            ok = ok and not any(p.search(reply) for p in none_)
            if ok and echo is not None:
                wanted = {m.group(0).lower() for m in echo.finditer(prompt)}
                ok = not wanted or any(w in reply.lower() for w in wanted)
            if ok and c.words is not None:
                ok = c.words[0] <= n_words <= c.words[1]
            if ok and c.max_repetition is not None:
                ok = repetition(reply) <= c.max_repetition
            out[c.name] = ok
        return out

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        check_batch(prompts, completions)
        weights = {c.name: c.weight for c in self.criteria}
        return [sum(weights[k] for k, ok in self.passes(p, r).items() if ok) / self._total
                for p, r in zip(prompts, completions)]

    def pass_rates(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, float]:
        """Share of replies passing each criterion, by name (0.0 each for no replies)."""
        check_batch(prompts, completions)
        rows = [self.passes(p, r) for p, r in zip(prompts, completions)]
        return {c.name: sum(r[c.name] for r in rows) / len(rows) if rows else 0.0 for c in self.criteria}


class RubricComponent(ComponentBase):
    judge: Literal["rubric"]
    """Rule-based criteria, each passed or failed; the score is the weighted share passed, 0..1."""
    criteria: list[Criterion] = Field(min_length=1)
    """The criteria, each with a name, a weight and its conditions (any, none, echo, words,
    max_repetition)."""

    @field_validator("criteria")
    @classmethod
    def _unique_names(cls, criteria):
        check_distinct([c.name for c in criteria], "criterion")
        return criteria

    def build(self, device: str) -> Judge:
        return RubricJudge(self.criteria, self.name)
