"""What every judge shares: the Judge protocol, batch checks, padding, and the config base of a component."""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from pydantic import model_validator

from alignkit.config import Strict


class Judge(Protocol):
    """Anything that scores completions: one float per (prompt, completion), higher means more of
    whatever the judge measures (more toxic, more positive, more rewarded)."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


def check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists of strings")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding leaves every real token at its unpadded position, whatever the position encoding.
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def check_distinct(names: list[str], what: str, hint: str = "") -> None:
    """ValueError naming the repeated names, for config validators."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{what} names must be distinct; repeated: {', '.join(repeated)}{hint}")


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class ComponentBase(Strict):
    name: str | None = None
    """Component name in results and in the labeler string; default the judge's name."""
    weight: float = 1.0
    """Multiplies this component's score in the total; negative to penalise (e.g. -2.0 on toxicity)."""

    @model_validator(mode="after")
    def _default_name(self):
        if self.name is None:
            self.name = self.judge
        return self
