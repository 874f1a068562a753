"""Expectations on an evaluation's figures, for `alignkit eval --expect`: a run that misses one exits
non-zero, so a script, a CI job or `make demo` cannot mistake a failed comparison for a success.

    grpo.win_rate_vs_before >= 0.70          a model's metric against a number
    grpo.toxicity_mean <= before.toxicity_mean   or against another model's metric

Operators: >=, <=, >, <. A metric that was not measured (None, or a name the report lacks) misses.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from alignkit.errors import AlignkitError

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
_REF = r"[A-Za-z0-9_\-]+\.[A-Za-z0-9_.\-]+?"
_PATTERN = re.compile(rf"^\s*({_REF})\s*(>=|<=|>|<)\s*({_REF}|[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Expectation:
    text: str
    left: tuple[str, str]            # (model, metric)
    op: str
    right: tuple[str, str] | float   # (model, metric) or a number


def parse(text: str) -> Expectation:
    """One expectation, `MODEL.METRIC OP (NUMBER | MODEL.METRIC)`; a clear error otherwise."""
    m = _PATTERN.match(text)
    if not m:
        raise AlignkitError(f"--expect {text!r}: write MODEL.METRIC OP VALUE, e.g. 'grpo.win_rate_vs_before>=0.7' "
                            "or 'grpo.toxicity_mean<=before.toxicity_mean' (OP one of >=, <=, >, <)")
    left, op, right = m.groups()
    try:
        value: tuple[str, str] | float = float(right)
    except ValueError:
        value = tuple(right.split(".", 1))
    return Expectation(text.strip(), tuple(left.split(".", 1)), op, value)


def check(expectations: list[Expectation], metrics: dict[str, dict]) -> list[tuple[Expectation, bool, str]]:
    """(expectation, met, what was compared) for each, against {model name: {metric: value}}. A model
    name the evaluation does not have is an error (a typo, not a miss)."""
    def value(ref: tuple[str, str]) -> float | None:
        model, metric = ref
        if model not in metrics:
            raise AlignkitError(f"--expect: no model named {model!r} in this evaluation "
                                f"(models: {', '.join(metrics)})")
        v = metrics[model].get(metric)
        return None if v is None else float(v)

    out = []
    for e in expectations:
        left = value(e.left)
        right = e.right if isinstance(e.right, float) else value(e.right)
        if left is None or right is None:
            out.append((e, False, f"{left} {e.op} {right}: not measured"))
        else:
            out.append((e, bool(OPS[e.op](left, right)), f"{left:.4g} {e.op} {right:.4g}"))
    return out
