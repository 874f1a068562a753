"""Preference data: pairs and rankings formats, validation, rankings -> pairs, and labeler agreement.

Pairs JSONL:    {"prompt", "chosen", "rejected", "margin"?}           (extra fields are kept)
Rankings JSONL: {"prompt", "completions": [...], "ranks": [1, 2, 2, "F"], "labeler"}

Rank 1 is best; equal ranks are ties (no pair); "F" marks a completion that fails the instructions
outright and loses to every non-F completion. An empty ranks list means "not labeled yet".
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.io import line_order, salvage, scan_jsonl

FAIL = "F"


def _text_problem(rec: dict, key: str) -> str | None:
    if key not in rec:
        return f"missing field '{key}'"
    if not isinstance(rec[key], str):
        return f"field '{key}' must be a string"
    if not rec[key].strip():
        return f"field '{key}' is empty"
    return None


def detect_format(rows: list[tuple[int, dict]]) -> str:
    """'rankings' if records carry completions, else 'pairs'."""
    return "rankings" if any("completions" in rec for _, rec in rows) else "pairs"


def check_pair(rec: dict) -> list[str]:
    problems = [p for k in ("prompt", "chosen", "rejected") if (p := _text_problem(rec, k))]
    if not problems and rec["chosen"].strip() == rec["rejected"].strip():
        problems.append("chosen is identical to rejected")
    margin = rec.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        problems.append(f"field 'margin' must be a number, got {margin!r}")
    return problems


def check_ranking(rec: dict, require_ranks: bool = False) -> list[str]:
    problems = [p for p in [_text_problem(rec, "prompt")] if p]
    comps = rec.get("completions")
    if not isinstance(comps, list) or len(comps) < 2:
        problems.append("field 'completions' must be a list of at least 2 strings")
        return problems
    for i, c in enumerate(comps):
        if not isinstance(c, str) or not c.strip():
            problems.append(f"completions[{i}] is empty or not a string")
    ranks = rec.get("ranks", [])
    if not isinstance(ranks, list):
        return problems + ["field 'ranks' must be a list"]
    if ranks or require_ranks:
        if len(ranks) != len(comps):
            problems.append(f"ranks has {len(ranks)} entries for {len(comps)} completions")
        for i, r in enumerate(ranks):
            if r != FAIL and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
                problems.append(f"ranks[{i}] must be a positive integer or \"F\", got {r!r}")
    return problems


def _dedup_key(rec: dict, fmt: str) -> tuple:
    if fmt == "pairs":
        return (rec.get("prompt"), rec.get("chosen"), rec.get("rejected"))
    return (rec.get("prompt"), tuple(rec.get("completions") or []), rec.get("labeler"))


def validate(path: Path, fmt: str | None = None) -> tuple[str, list[tuple[int, dict]], list[str]]:
    """Check a pairs or rankings file: returns (format, valid records, every problem with its line)."""
    rows, problems = scan_jsonl(path)
    fmt = fmt or detect_format(rows)
    seen: dict[tuple, int] = {}
    valid = []
    for lineno, rec in rows:
        errs = check_pair(rec) if fmt == "pairs" else check_ranking(rec)
        key = _dedup_key(rec, fmt)
        if not errs and key in seen:
            errs = [f"duplicate of line {seen[key]}"]
        seen.setdefault(key, lineno)
        problems.extend(f"line {lineno}: {e}" for e in errs)
        if not errs:
            valid.append((lineno, rec))
    problems.sort(key=line_order)
    return fmt, valid, problems


def load_pairs(path: Path) -> list[dict]:
    """The valid pairs of a file; each bad line is named on stderr and skipped (exit code 3), and a
    DataError lists every problem when no pair is valid."""
    _, valid, problems = validate(path, "pairs")
    return [rec for _, rec in salvage(path, valid, problems)]


def load_rankings(path: Path) -> list[tuple[int, dict]]:
    """The valid ranking records of a file with their line numbers, salvaged as in load_pairs."""
    _, valid, problems = validate(path, "rankings")
    return salvage(path, valid, problems)


def outcome(a, b) -> int:
    """+1 if rank a beats rank b, -1 if b beats a, 0 for a tie (equal ranks, or both F)."""
    if a == FAIL or b == FAIL:
        return 0 if a == b else (-1 if a == FAIL else 1)
    return (a < b) - (a > b)


@dataclass
class Conversion:
    pairs: list[dict] = field(default_factory=list)
    items_in: int = 0
    skipped: list[str] = field(default_factory=list)
    agreement: dict | None = None


def rankings_to_pairs(rows: list[tuple[int, dict]]) -> Conversion:
    """Turn ranked items into pairs; several labelers on one item are aggregated by majority.

    For each completion pair the outcome with the most votes (i wins, j wins, tie) is kept; a tie
    for the most votes gives no pair. Every skipped item is reported with its reason.
    """
    result = Conversion(items_in=len(rows))
    groups: dict[tuple, list[tuple[int, dict]]] = defaultdict(list)
    for lineno, rec in rows:
        if not rec.get("ranks"):
            result.skipped.append(f"line {lineno}: not labeled yet (empty ranks)")
            continue
        groups[(rec["prompt"], tuple(rec["completions"]))].append((lineno, rec))
    for (prompt, comps), labelled in groups.items():
        lines = ",".join(str(l) for l, _ in labelled)
        made = 0
        for i, j in itertools.combinations(range(len(comps)), 2):
            votes = Counter(outcome(rec["ranks"][i], rec["ranks"][j]) for _, rec in labelled)
            (top, n_top), *rest = votes.most_common() + [(None, 0)]
            if rest and rest[0][1] == n_top:
                continue  # no majority among labelers for this pair
            if top == 0 or comps[i].strip() == comps[j].strip():
                continue
            win, lose = (i, j) if top == 1 else (j, i)
            pair = {"prompt": prompt, "chosen": comps[win], "rejected": comps[lose]}
            if len(labelled) > 1:
                pair["votes"] = f"{n_top}/{len(labelled)}"
            result.pairs.append(pair)
            made += 1
        if made == 0:
            why = "all completions tied" if len(labelled) == 1 else "no majority on any completion pair"
            result.skipped.append(f"line(s) {lines}: {why}: no pair")
    result.agreement = agreement(rows)
    return result


def agreement(rows: list[tuple[int, dict]]) -> dict | None:
    """Agreement between labelers on items ranked by two or more of them.

    Units are (item, completion pair); each labeler's value is the outcome +1/0/-1. Reports the
    pairwise percent agreement and Krippendorff's alpha for nominal data.
    """
    by_item: dict[tuple, dict[str, list]] = defaultdict(dict)
    for _, rec in rows:
        if rec.get("ranks"):
            by_item[(rec["prompt"], tuple(rec["completions"]))][str(rec.get("labeler"))] = rec["ranks"]
    units = []
    for (prompt, comps), by_labeler in by_item.items():
        if len(by_labeler) < 2:
            continue
        for i, j in itertools.combinations(range(len(comps)), 2):
            units.append([outcome(r[i], r[j]) for r in by_labeler.values()])
    if not units:
        return None
    agree = total = 0
    for values in units:
        for a, b in itertools.combinations(values, 2):
            agree += a == b
            total += 1
    return {"items": sum(1 for v in by_item.values() if len(v) >= 2), "units": len(units),
            "percent_agreement": agree / total, "krippendorff_alpha": krippendorff_alpha_nominal(units)}


def krippendorff_alpha_nominal(units: list[list]) -> float:
    """Krippendorff's alpha, nominal metric: 1 - D_o / D_e from the coincidence matrix.

    Each unit with m >= 2 values adds every ordered pair of its values with weight 1 / (m - 1);
    D_o is the weight of disagreeing pairs over n, D_e = sum_{c != k} n_c n_k / (n (n - 1)).
    (Krippendorff, Content Analysis, 2004, ch. 11.)
    """
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        if m < 2:
            continue
        for a, b in itertools.permutations(values, 2):
            coincidence[(a, b)] += 1.0 / (m - 1)
    n = sum(coincidence.values())
    totals: Counter = Counter()
    for (a, _), w in coincidence.items():
        totals[a] += w
    observed = sum(w for (a, b), w in coincidence.items() if a != b) / n
    expected = sum(totals[a] * totals[b] for a in totals for b in totals if a != b) / (n * (n - 1))
    return 1.0 if expected == 0 else 1.0 - observed / expected


def encode_response(tokenizer, prompt: str, completion: str, max_length: int) -> list[int]:
    """Tokens of prompt (chat template, generation prompt) + completion + EOS, as a policy sees them.

    Too-long sequences keep their last max_length tokens: the end is where a reward is read.
    """
    return encode_split(tokenizer, prompt, completion, max_length)[0]


def encode_split(tokenizer, prompt: str, completion: str, max_length: int) -> tuple[list[int], int]:
    """Like encode_response, plus how many of the kept tokens belong to the prompt."""
    from alignkit.models.generation import render_prompt

    with_template = tokenizer.chat_template is not None
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=not with_template)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids + [tokenizer.eos_token_id]
    cut = max(0, len(ids) - max_length)
    return ids[cut:], max(0, len(prompt_ids) - cut)
