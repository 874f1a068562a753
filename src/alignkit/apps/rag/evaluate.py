"""Measure a RAG index against questions with known answers: hit-rate@k, MRR and recall@k, plus answer checks.

A QA file is JSONL, one question per line:

    {"question": "How long do I have to hand in receipts?", "source": "handbook/expenses.md", "answer": "30 days"}

`source` (a string or a list of strings) names the document(s) holding the answer, matched as a
path suffix ("handbook/expenses.md" matches "/srv/docs/handbook/expenses.md"); `answer` is a
substring the answer must contain. Each line needs a question and at least one of the two.

A retrieved chunk is relevant when it comes from an expected source (if any are given) and
contains the answer substring (if given), both case-insensitively. Over the top k chunks:

  hit-rate@k  share of questions with at least one relevant chunk
  MRR         mean over questions of 1 / rank of the first relevant chunk (0 when there is none)
  recall@k    mean over questions of the share of expected sources with a relevant chunk; with a
              single expected source (or none) it equals that question's hit

With generation, `answer_accuracy` is the share of questions whose generated answer contains the
answer substring, both normalised (`normalize_answer`: case, thousands separators, punctuation and
runs of spaces do not count), and `faithfulness` the share of answer sentences supported by the retrieved
text (see `sentence_support`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from alignkit.apps.rag.answer import Answer
from alignkit.apps.rag.store import STOPWORDS, Hit
from alignkit.errors import DataError
from alignkit.io import scan_jsonl

SUPPORT_THRESHOLD = 0.6
"""Share of a sentence's content words that must appear in one retrieved chunk for it to count as supported."""


@dataclass(frozen=True)
class QAItem:
    line: int
    question: str
    sources: tuple[str, ...] = ()
    answer: str | None = None


def load_qa(path: str | Path) -> list[QAItem]:
    """Read a QA file; every bad line is reported at once, with its line number, in one DataError."""
    rows, problems = scan_jsonl(Path(path))
    items = []
    for line, obj in rows:
        question, source, answer = obj.get("question"), obj.get("source"), obj.get("answer")
        bad = []
        if not isinstance(question, str) or not question.strip():
            bad.append("'question' must be a non-empty string")
        if isinstance(source, str):
            source = [source]
        if source is not None and (not isinstance(source, list) or not source
                                   or not all(isinstance(s, str) and s.strip() for s in source)):
            bad.append("'source' must be a non-empty string or list of strings")
        if answer is not None and (not isinstance(answer, str) or not answer.strip()):
            bad.append("'answer' must be a non-empty string")
        if source is None and answer is None:
            bad.append("needs 'source' (expected document) and/or 'answer' (expected substring)")
        if bad:
            problems.append(f"line {line}: " + "; ".join(bad))
            continue
        items.append(QAItem(line, question, tuple(s.strip().lstrip("/") for s in source or ()), answer))
    if problems:
        problems.sort(key=lambda p: int(re.match(r"line (\d+)", p).group(1)) if p.startswith("line ") else 0)
        raise DataError(path, problems)
    return items


def source_matches(hit_source: str, expected: str) -> bool:
    """Path-suffix match on whole path components: "a/b.md" matches "/x/a/b.md", not "/x/aa/b.md"."""
    return hit_source == expected or hit_source.endswith("/" + expected)


def is_relevant(hit: Hit, item: QAItem) -> bool:
    if item.sources and not any(source_matches(hit.source, s) for s in item.sources):
        return False
    return item.answer is None or item.answer.lower() in hit.text.lower()


@dataclass
class QuestionResult:
    item: QAItem
    rank: int | None
    """Rank (from 1) of the first relevant chunk within k; None for a miss."""
    recall: float
    hits: list[Hit] = field(default_factory=list)
    abstained: bool = False
    answer: str | None = None
    answer_correct: bool | None = None
    faithfulness: float | None = None
    unsupported: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        record = {"line": self.item.line, "question": self.item.question, "rank": self.rank, "recall": self.recall,
                  "abstained": self.abstained, "retrieved": [h.source for h in self.hits]}
        if self.answer is not None:
            record.update(answer=self.answer, answer_correct=self.answer_correct,
                          faithfulness=self.faithfulness, unsupported=self.unsupported)
        return record


def score_retrieval(item: QAItem, hits: Sequence[Hit], k: int) -> QuestionResult:
    """Rank of the first relevant chunk among the top k and the share of expected sources found."""
    top = list(hits[:k])
    rank = next((r for r, h in enumerate(top, start=1) if is_relevant(h, item)), None)
    if item.sources:
        found = sum(any(source_matches(h.source, s) and is_relevant(h, item) for h in top) for s in item.sources)
        recall = found / len(item.sources)
    else:
        recall = float(rank is not None)
    return QuestionResult(item, rank, recall, top)


@dataclass
class EvalReport:
    k: int
    mode: str
    results: list[QuestionResult]

    def metrics(self) -> dict:
        n = len(self.results)
        out = {
            "questions": n,
            f"hit_rate@{self.k}": sum(r.rank is not None for r in self.results) / n,
            "mrr": sum(1 / r.rank for r in self.results if r.rank) / n,
            f"recall@{self.k}": sum(r.recall for r in self.results) / n,
        }
        generated = [r for r in self.results if r.answer is not None]
        if generated:
            with_answer = [r for r in generated if r.answer_correct is not None]
            out["answer_accuracy"] = sum(r.answer_correct for r in with_answer) / len(with_answer) if with_answer else None
            checked = [r.faithfulness for r in generated if r.faithfulness is not None]
            out["faithfulness"] = sum(checked) / len(checked) if checked else None
        out["abstained"] = sum(r.abstained for r in self.results)
        return out

    def to_json(self) -> dict:
        """{"k", "mode", "metrics": {...}, "questions": [per-question records]} (see `rag eval --help`)."""
        return {"k": self.k, "mode": self.mode, "metrics": self.metrics(), "questions": [r.to_json() for r in self.results]}


# ---------------------------------------------------------------------------- faithfulness

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")


def normalize_answer(text: str) -> str:
    """'The limit is 1,000 EUR.' -> 'the limit is 1000 eur': lower case, no thousands separators, punctuation as spaces."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.lower())
    text = re.sub(r"(?<!\d)[.,](?!\d)|[^\w\s.,%€$]", " ", text)
    return " ".join(text.split())


def content_words(text: str) -> set[str]:
    """Lower-cased words minus stopwords; numbers stay, since a changed number is a changed claim."""
    return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS}


def sentence_support(sentence: str, passages: Sequence[str]) -> float:
    """Largest share of the sentence's content words found in any one passage (1.0 for no content words)."""
    words = content_words(re.sub(r"\[\d+\]", " ", sentence))
    if not words:
        return 1.0
    return max((len(words & content_words(p)) / len(words) for p in passages), default=0.0)


def faithfulness(answer: str, passages: Sequence[str], threshold: float = SUPPORT_THRESHOLD) -> tuple[float | None, list[str]]:
    """Share of the answer's sentences supported by the passages, and the unsupported sentences.

    Best effort, by word overlap: a sentence is supported when at least `threshold` of its content
    words occur in one passage. Overlap rather than embedding similarity because embeddings score
    "you get 30 days" close to "you get 25 days" (same topic), while overlap at least notices the
    changed number or name. It still misses a claim built from passage words in a wrong
    combination or negated, and flags a correct paraphrase as unsupported; it is a screen for
    answers worth reading, not a verdict. None when the answer has no sentence with content words.
    """
    sentences = [s.strip() for s in _SENTENCE.split(answer.strip()) if s.strip()]
    checked = [s for s in sentences if content_words(re.sub(r"\[\d+\]", " ", s))]
    if not checked:
        return None, []
    unsupported = [s for s in checked if sentence_support(s, passages) < threshold]
    return 1 - len(unsupported) / len(checked), unsupported


def evaluate(
    items: Sequence[QAItem], ask: Callable[[QAItem], Answer], k: int, mode: str, generated: bool = False,
    progress: bool = False,
) -> EvalReport:
    """Score `ask` (item -> answer_question's result) on every item.

    Retrieval is scored on the result's hits; with `generated`, the reply is also checked for the
    answer substring and for faithfulness to the passages it was shown. An abstention counts as a wrong answer and is left out of faithfulness.
    """
    from tqdm.auto import tqdm

    results = []
    for item in tqdm(items, desc="evaluating", unit="question", disable=not progress):
        asked = ask(item)
        result = score_retrieval(item, asked.hits, k)
        result.abstained = asked.abstained
        if generated:
            result.answer = asked.answer
            result.answer_correct = None if item.answer is None else (
                not asked.abstained and normalize_answer(item.answer) in normalize_answer(asked.answer))
            if not asked.abstained:
                result.faithfulness, result.unsupported = faithfulness(asked.answer, [h.text for h in asked.passages])
        results.append(result)
    return EvalReport(k, mode, results)
