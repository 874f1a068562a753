"""Reward-hacking monitors for RL runs: warnings computed from the per-step metrics history.

Each check reads the list of step records a run has logged so far (dicts with "score", "kl",
"response_length", "distinct_2", optionally "repetition" and, when an independent judge is
configured, "judge") and returns plain-language warnings. They are heuristics with stated thresholds, not proofs of hacking.
"""

from __future__ import annotations

import re

from alignkit.config import MonitorSettings


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def check(history: list[dict], s: MonitorSettings) -> list[str]:
    """Warnings for the newest record in `history` (oldest first)."""
    if not history:
        return []
    now, first = history[-1], history[0]
    out = []
    if s.max_kl is not None and now["kl"] > s.max_kl:
        out.append(f"KL to the reference {now['kl']:.3f} exceeds {s.max_kl}")
    if first["response_length"] > 0:
        drift = now["response_length"] / first["response_length"] - 1.0
        if abs(drift) > s.length_drift:
            out.append(f"mean response length drifted {drift:+.0%} since step {first['step']} "
                       f"({first['response_length']:.1f} -> {now['response_length']:.1f} tokens)")
    if now["distinct_2"] < s.min_distinct_2:
        out.append(f"degenerate output: distinct-2 {now['distinct_2']:.3f} below {s.min_distinct_2}")
    if now.get("repetition") is not None and now["repetition"] > s.max_repetition:
        out.append(f"degenerate output: {now['repetition']:.0%} of each reply's word 3-grams repeat an earlier "
                   f"one of the same reply (above {s.max_repetition:.0%})")
    judged = [r for r in history if r.get("judge") is not None]
    if len(judged) >= 2 * s.window:
        before, after = judged[-2 * s.window:-s.window], judged[-s.window:]
        d_score = _mean(after, "score") - _mean(before, "score")
        d_judge = _mean(after, "judge") - _mean(before, "judge")
        if d_score > 0 and d_judge < 0:
            out.append(f"reward and independent judge diverge over the last {2 * s.window} steps: "
                       f"score {d_score:+.3f}, judge {d_judge:+.3f}")
    return out


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique n-grams over all n-grams of the batch's responses: low means repetitive output."""
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(max(0, len(t.split()) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(text: str, n: int = 3) -> float:
    """Share of one reply's word n-grams that repeat an earlier n-gram of the same reply, 0..1.

    Words are runs of letters and digits, so "In-Context-In-Context-In-Context" is six words with
    a repeated 3-gram, which distinct-2 over a batch of otherwise varied replies would hardly see.
    A reply of fewer than n words has nothing to repeat (0).
    """
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def mean_repetition(texts: list[str], n: int = 3) -> float:
    """Mean per-reply repetition over a batch (0.0 for an empty batch)."""
    return sum(repetition(t, n) for t in texts) / len(texts) if texts else 0.0
