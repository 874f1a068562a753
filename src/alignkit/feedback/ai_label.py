"""AI feedback: rank candidate completions with a composed judge, and write rankings or preference pairs.

    alignkit prefs judge --candidates rankings.jsonl --judge judge.yaml --out OUT [--format rankings|pairs]

The candidates are a rankings file ({"prompt", "completions": [...], "ranks": [...], "labeler"?});
ranks already there are replaced. Every completion is scored by the judge (evaluate.judges) and:

  rankings  each record is written back with ranks from the scores (1 = best; scores equal to six
            decimals tie and share the best rank among them: 0.9, 0.5, 0.5, 0.1 -> 1, 2, 2, 4),
            the scores themselves, and labeler "judge:<composition>";
  pairs     one {"prompt", "chosen", "rejected", "margin", "labeler"} per pair of distinct
            completions of a prompt whose scores differ (to six decimals), margin = score(chosen) -
            score(rejected) > 0; a pair repeated across records is written once.

This is labeling by AI feedback as in RLAIF (Bai et al. 2022, Constitutional AI; Lee et al. 2023).
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Literal

from tqdm.auto import tqdm

from alignkit.data.prefs import validate
from alignkit.errors import AlignkitError, DataError
from alignkit.evaluate.judges import ComposedJudge, JudgeConfig, build_judge, load_judge
from alignkit.io import ResumableJsonl, file_digest, note_skipped

TIE_DECIMALS = 6  # scores this close come from float noise of batching, not from the judge


def ranks_from_scores(scores: list[float]) -> list[int]:
    """Rank 1 for the highest score; equal scores (to TIE_DECIMALS) share the best rank among them."""
    rounded = [round(s, TIE_DECIMALS) for s in scores]
    return [1 + sum(other > mine for other in rounded) for mine in rounded]


def pairs_from_scores(prompt: str, completions: list[str], scores: list[float],
                      labeler: str, min_margin: float = 0.0) -> tuple[list[dict], int]:
    """Every pair of distinct completions with different scores, the better one chosen; also the
    number of tied pairs skipped. A completion repeated in the list counts once. Pairs whose scores
    differ by less than `min_margin` count as ties: a judge's near-ties are mostly noise."""
    first_seen: dict[str, int] = {}
    for i, text in enumerate(completions):
        first_seen.setdefault(text.strip(), i)
    pairs, ties = [], 0
    for i, j in itertools.combinations(first_seen.values(), 2):
        if (round(scores[i], TIE_DECIMALS) == round(scores[j], TIE_DECIMALS)
                or abs(scores[i] - scores[j]) < min_margin):
            ties += 1
            continue
        win, lose = (i, j) if scores[i] > scores[j] else (j, i)
        pairs.append({"prompt": prompt, "chosen": completions[win], "rejected": completions[lose],
                      "margin": scores[win] - scores[lose], "labeler": labeler})
    return pairs, ties


def judge_file(candidates_path: Path | str, judge_config: Path | str | JudgeConfig | ComposedJudge,
               out_path: Path | str, fmt: Literal["rankings", "pairs"] = "rankings", *,
               chunk_size: int = 16, progress: bool = True, min_margin: float = 0.0,
               restart: bool = False) -> dict:
    """Score every candidate completion with the judge and write rankings or pairs, chunk by chunk.

    `judge_config` is a judge YAML file, a JudgeConfig, or an already built ComposedJudge. The input
    is checked before any model is loaded: a bad line is named on stderr and skipped (DataError when
    no usable line is left). Each chunk of `chunk_size` records is appended to the output once
    judged, so a killed run, started again with the same arguments, continues with the next chunk
    and ends with the file an uninterrupted run writes. Returns a summary: records in and out,
    completions scored, ties, the labeler string and, with categories, how many completions fell in
    each (of this run's chunks).
    """
    if fmt not in ("rankings", "pairs"):
        raise AlignkitError(f"--format must be 'rankings' or 'pairs', got {fmt!r}")
    candidates_path, out_path = Path(candidates_path), Path(out_path)
    _, records, problems = validate(candidates_path, "rankings")
    if not records:
        raise DataError(candidates_path, problems or ["no records (the file is empty)"])
    for problem in problems:
        note_skipped(candidates_path, problem)
    records = [rec for _, rec in records]

    if isinstance(judge_config, ComposedJudge):
        judge = judge_config
    elif isinstance(judge_config, JudgeConfig):
        judge = build_judge(judge_config)
    else:
        judge = load_judge(Path(judge_config))
    labeler = f"judge:{judge.name}"
    judge_id = file_digest(judge_config) if isinstance(judge_config, (str, Path)) else labeler
    writer = ResumableJsonl(out_path, {"command": "prefs judge", "candidates": file_digest(candidates_path),
                                       "judge": judge_id, "format": fmt, "min_margin": min_margin,
                                       "chunk_size": chunk_size}, restart=restart)
    if writer.resumed:  # said, as the other data jobs say it: the rerun continues, it does not start over
        print(f"resuming {out_path}: {writer.done} of {len(records)} record(s) already judged")
    # Two records with one prompt may share completions; the pairs file takes each pair once, also
    # across a restart, so the pairs already written count as seen.
    seen_pairs = {(r["prompt"], r["chosen"].strip(), r["rejected"].strip())
                  for r in writer.records()} if fmt == "pairs" else set()
    ties = writer.state.get("ties", 0)
    n_completions = sum(len(rec["completions"]) for rec in records)
    done_completions = sum(len(rec["completions"]) for rec in records[:writer.done])
    categories: Counter = Counter()
    with tqdm(total=n_completions, initial=done_completions, desc="judging", unit="completion",
              disable=not progress) as bar:
        # Chunks of records keep batches of model judges full while the bar still moves.
        for start in range(writer.done, len(records), chunk_size):
            chunk = records[start:start + chunk_size]
            scored = judge.score_groups([r["prompt"] for r in chunk], [r["completions"] for r in chunk])
            out_records = []
            for rec, results in zip(chunk, scored):
                scores = [s.total for s in results]
                categories.update(s.category for s in results)
                if fmt == "rankings":
                    out_records.append({**rec, "ranks": ranks_from_scores(scores), "labeler": labeler,
                                        "scores": [round(s, TIE_DECIMALS) for s in scores]})
                    continue
                pairs, n_ties = pairs_from_scores(rec["prompt"], rec["completions"], scores, labeler, min_margin)
                ties += n_ties
                for pair in pairs:
                    key = (pair["prompt"], pair["chosen"].strip(), pair["rejected"].strip())
                    if key not in seen_pairs:
                        seen_pairs.add(key)
                        out_records.append(pair)
            writer.state["ties"] = ties
            writer.append(out_records, done=start + len(chunk))
            bar.update(sum(len(r["completions"]) for r in chunk))
    writer.finish()

    summary = {"records_in": len(records), "completions_scored": n_completions, "format": fmt,
               "records_out": len(writer.records()), "labeler": labeler, "out": str(out_path)}
    if fmt == "pairs":
        summary["tied_pairs_skipped"] = ties
    if judge.categories is not None:
        summary["categories"] = {label: categories.get(label, 0) for label in judge.categories.labels}
    return summary
