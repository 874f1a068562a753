"""Answer by quoting: the reply is one sentence copied word for word from the passages, with its citation.

A small reader given a passage that holds the answer still answers from its own head ("25 paid
vacation days" becomes "2", "Dock Street" becomes "Parking"). Quoting takes that freedom away:
the reply is decoded under a grammar whose only sentences are the passages' own sentences, each
followed by the number of its passage, so the model's one decision is *which* sentence answers
the question, and whatever it picks is supported by the text by construction.

    sentences = passage_sentences(hit)          # ["Every full-time employee accrues 25 ...", ...]
    grammar = quote_grammar([hit1, hit2])       # start: "Every full-time ... [1]" | ... | "... [2]"

A candidate is a sentence of the chunk's text, or a whole line for a table row or a "key: value"
record (a CSV row); the chunk's first line is skipped when it is only its heading path, and table
header and separator rows are skipped. The candidates are kept in passage order, best passage
first. Decoding is greedy token by token, so the choice is made on the first tokens where the
candidates differ: the prompt asks for the sentence that answers the question (prompts/rag_quote.yaml).
"""

from __future__ import annotations

import re

from alignkit.apps.rag.chunk import HEADING_SEPARATOR
from alignkit.apps.rag.embed import Embedder
from alignkit.apps.rag.store import Hit
from alignkit.errors import AlignkitError
from alignkit.models.constrained import json_string, lark_grammar

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9`\"'(])")
_TABLE_RULE = re.compile(r"^\|?[\s:|-]+\|?$")
_IDENTIFIER = re.compile(r"\w+(?:[-.]\w+)*")

MAX_QUOTE_CHARS = 400
"""A longer sentence is cut at a word boundary: a quote is an answer, not a page."""


def _is_header_row(line: str, next_line: str | None) -> bool:
    return line.startswith("|") and next_line is not None and bool(_TABLE_RULE.match(next_line))


def passage_sentences(hit: Hit) -> list[str]:
    """The sentences (or table rows, or records) of a passage that a quote may copy, in order, without repeats."""
    lines = [line.strip() for line in hit.text.splitlines()]
    lines = [line for line in lines if line]
    if lines and hit.heading_path and lines[0] in (HEADING_SEPARATOR.join(hit.heading_path), hit.heading_path[-1]):
        lines = lines[1:]
    # A prose sentence wrapped over two lines ("... is not started twice;" / "the later run ...") is one.
    joined: list[str] = []
    for line in lines:
        if joined and not joined[-1].startswith("|") and not line.startswith("|") and joined[-1][-1] in ",;":
            joined[-1] += " " + line
        else:
            joined.append(line)
    lines = joined
    out: list[str] = []
    for i, line in enumerate(lines):
        if _TABLE_RULE.match(line) or _is_header_row(line, lines[i + 1] if i + 1 < len(lines) else None):
            continue
        pieces = [line] if line.startswith("|") else _SENTENCE_END.split(line)
        for piece in pieces:
            piece = " ".join(piece.split())
            if len(piece) > MAX_QUOTE_CHARS:
                piece = piece[:MAX_QUOTE_CHARS].rsplit(" ", 1)[0]
            if len(re.findall(r"\w", piece)) >= 3 and piece not in out:
                out.append(piece)
    return out


def quote_candidates(passages: list[Hit]) -> list[tuple[int, str]]:
    """(passage number from 1, sentence) for every sentence a quote may copy."""
    return [(n, s) for n, hit in enumerate(passages, start=1) for s in passage_sentences(hit)]


def identifiers(text: str) -> set[str]:
    """Words that name one thing exactly, lower-cased: those with a digit or an underscore ("QK-4417",
    "max_inflight_batches", "9464", "2.3.0"; a hyphen or dot inside keeps the word whole)."""
    return {w.lower() for w in _IDENTIFIER.findall(text) if re.search(r"[\d_]", w)}


def closest_sentence(question: str, passages: list[Hit], embedder: Embedder) -> str:
    """The candidate sentence that best answers `question`, as "<sentence> [n]".

    Sentences that contain every identifier of the question (see `identifiers`) come first: an
    embedding hears "QK-4417" and "QK-5020" as the same kind of thing, so "What does QK-4417
    mean?" was closest to a release note naming other codes. Among those (or among all, when the
    question has no identifier or no sentence holds them all), the highest cosine similarity of
    `embedder`'s vectors wins; ties go to the better-ranked passage. AlignkitError when no passage
    has a sentence to quote.
    """
    candidates = quote_candidates(passages)
    if not candidates:
        raise AlignkitError("the passages shown have no sentence to quote; try --answer generate")
    vectors = embedder.encode([question] + [sentence for _, sentence in candidates])
    similarity = vectors[1:] @ vectors[0]
    wanted = identifiers(question)
    named = [wanted <= identifiers(sentence) for _, sentence in candidates] if wanted else [False] * len(candidates)
    best = max(range(len(candidates)), key=lambda i: (named[i], similarity[i], -i))
    n, sentence = candidates[best]
    return f"{sentence} [{n}]"


def quote_grammar(passages: list[Hit]) -> str:
    """A grammar whose sentences are exactly "<a sentence of passage n> [n]" for the given passages.

    Raises AlignkitError (from lark_grammar) if no passage has a sentence to quote.
    """
    candidates = quote_candidates(passages)
    alternatives = "\n    | ".join(json_string(f"{sentence} [{n}]") for n, sentence in candidates)
    return lark_grammar(f"start: {alternatives or json_string('')}\n")
