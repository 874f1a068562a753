"""The judge YAML: components with weights (and optional categories), loaded, validated and built."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from alignkit.config import Strict, load_config
from alignkit.evaluate.judges.base import check_distinct
from alignkit.evaluate.judges.classifier import ClassifierComponent
from alignkit.evaluate.judges.compose import Categories, Component, ComposedJudge
from alignkit.evaluate.judges.llm import LLMComponent
from alignkit.evaluate.judges.relevance import RelevanceComponent
from alignkit.evaluate.judges.repetition import RepetitionComponent
from alignkit.evaluate.judges.reward import RewardComponent
from alignkit.evaluate.judges.rubric import RubricComponent
from alignkit.evaluate.judges.sentiment import SentimentComponent
from alignkit.evaluate.judges.toxicity import ToxicityComponent

ComponentConfig = Annotated[
    ToxicityComponent | SentimentComponent | RewardComponent | ClassifierComponent | LLMComponent
    | RubricComponent | RelevanceComponent | RepetitionComponent,
    Field(discriminator="judge"),
]


class JudgeConfig(Strict):
    components: list[ComponentConfig] = Field(min_length=1)
    """Named, weighted judges; the total is sum of weight * score."""
    categories: Categories | None = None
    """Optional mapping of the total to named categories by thresholds."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for model-based judges; 'auto' uses CUDA when present."""

    @field_validator("components")
    @classmethod
    def _unique_names(cls, components):
        check_distinct([c.name for c in components], "component", " (give each component a name)")
        return components


def build_judge(config: JudgeConfig) -> ComposedJudge:
    """Load every component's judge (models included) and compose them."""
    components = [Component(c.name, c.build(config.device), c.weight) for c in config.components]
    return ComposedJudge(components, config.categories)


def load_judge(path: Path | None = None, overrides: list[str] | None = None,
               base: dict | None = None) -> ComposedJudge:
    """A composed judge from a YAML file (or a dict) plus key=value overrides; ConfigError names the field."""
    return build_judge(load_config(JudgeConfig, path, overrides, base))
