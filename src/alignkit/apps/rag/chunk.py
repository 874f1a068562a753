"""Cut documents into chunks measured in the generator's tokens, so k chunks, the question and the answer fit its context.

Chunks follow the document's structure: a heading starts a new chunk, a paragraph that fits is
never split, a paragraph that does not is cut at lines, then sentences, then words, then
characters. Consecutive chunks of a section share `overlap_tokens` of trailing sentences. Each chunk
begins with its heading path ("Install > Linux") so it reads on its own and can be cited, and the
whole text, heading line included, is at most `max_tokens` tokens without special tokens.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tokenizers

from alignkit.apps.rag.sources import Block

HEADING_SEPARATOR = " > "


@dataclass(frozen=True)
class ChunkConfig:
    """How big chunks are, in tokens of the generator's tokenizer."""

    max_tokens: int = 256
    """Upper bound on a chunk's tokens (heading line included, special tokens excluded). At least 16."""
    overlap_tokens: int = 32
    """Tokens of trailing sentences repeated at the start of the next chunk of the same section."""

    def __post_init__(self) -> None:
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be at least 16, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens <= self.max_tokens // 2:
            raise ValueError(f"overlap_tokens must be in [0, max_tokens/2], got {self.overlap_tokens}")


def chunk_budget(
    context_window: int, k: int, question_tokens: int, answer_tokens: int, prompt_tokens: int = 64
) -> int:
    """Largest chunk size such that k chunks, the question, the answer and the prompt's own text fit.

    Each retrieved chunk is also preceded by a citation label in the prompt; `prompt_tokens`
    covers that and the instructions, so budget it generously.
    """
    room = context_window - question_tokens - answer_tokens - prompt_tokens
    if k < 1 or room < 16 * k:
        raise ValueError(
            f"context window {context_window} leaves {room} tokens for {k} chunks after question "
            f"({question_tokens}), answer ({answer_tokens}) and prompt ({prompt_tokens}): too small"
        )
    return room // k


@dataclass(frozen=True)
class Chunk:
    """A piece of a document small enough for the prompt, with what is needed to cite it."""

    text: str
    """Heading line (if any) plus body: what is embedded, indexed and put in the prompt."""
    heading_path: tuple[str, ...]
    ordinal: int
    """Position of the chunk in its document, from 0."""
    first_locator: int
    last_locator: int
    """Locators (line, block, row or page, see Document.locator_unit) of the chunk's first and last text."""
    token_count: int

    @property
    def text_hash(self) -> str:
        """Key of the embedding cache: identical text is never embedded twice."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


class TokenCounter:
    """Counts tokens of a Hugging Face tokenizer (transformers or a bare `tokenizers.Tokenizer`), no special tokens."""

    def __init__(self, tokenizer: object) -> None:
        if isinstance(tokenizer, tokenizers.Tokenizer):
            backend: tokenizers.Tokenizer | None = tokenizer
        elif tokenizer.is_fast:  # type: ignore[attr-defined]
            backend = tokenizer.backend_tokenizer  # type: ignore[attr-defined]
        else:
            backend = None
        if backend is not None:
            # A copy without the padding and truncation a tokenizer.json may carry (MiniLM's pads
            # to 128), which would make every count the same.
            backend = tokenizers.Tokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        self._backend = backend
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> int:
        if self._backend is not None:
            # The Rust tokenizer directly: several times faster than the transformers wrapper,
            # and the chunker calls this once per candidate chunk.
            return len(self._backend.encode(text, add_special_tokens=False).ids)
        return len(self._tokenizer.encode(text, add_special_tokens=False, verbose=False))  # type: ignore[attr-defined]

    def fingerprint(self) -> str:
        """Identifies the vocabulary: chunks are rebuilt when the generator's tokenizer changes."""
        if self._backend is not None:
            return hashlib.sha256(self._backend.to_str().encode("utf-8")).hexdigest()[:16]
        described = f"{type(self._tokenizer).__name__}:{self._tokenizer.name_or_path}:{len(self._tokenizer)}"  # type: ignore[attr-defined]
        return hashlib.sha256(described.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class _Piece:
    text: str
    joiner: str
    """What stood before this piece in the document: "\\n\\n" between blocks, "\\n", " " or "" inside one."""
    locator: int


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
# Finer and finer places to cut an oversized block: lines, sentences, words.
_SPLITTERS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\n"), "\n"),
    (_SENTENCE_END, " "),
    (re.compile(r"\s+"), " "),
)


def _assemble(pieces: Sequence[_Piece]) -> str:
    return "".join((p.joiner if i else "") + p.text for i, p in enumerate(pieces))


def _longest_fitting_prefix(text: str, fits: Callable[[str], bool]) -> int:
    """Largest n with fits(text[:n]); at least 1 so that cutting always makes progress."""
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(text[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split(text: str, joiner: str, locator: int, fits: Callable[[str], bool], level: int = 0) -> list[_Piece]:
    """Cut text into pieces that each fit, at the coarsest boundary that works."""
    if fits(text):
        return [_Piece(text, joiner, locator)]
    if level == len(_SPLITTERS):
        pieces = []
        rest, first = text, True
        while rest:
            n = _longest_fitting_prefix(rest, fits)
            pieces.append(_Piece(rest[:n], joiner if first else "", locator))
            rest, first = rest[n:], False
        return pieces
    pattern, inner_joiner = _SPLITTERS[level]
    parts = [p for p in pattern.split(text) if p.strip()]
    if len(parts) <= 1:
        return _split(text, joiner, locator, fits, level + 1)
    pieces = []
    for i, part in enumerate(parts):
        # Lines of one block keep their own line number where we know it.
        part_locator = locator + i if inner_joiner == "\n" else locator
        pieces.extend(_split(part, joiner if i == 0 else inner_joiner, part_locator, fits, level + 1))
    return pieces


def _heading_line(path: tuple[str, ...], count: Callable[[str], int], config: ChunkConfig) -> str:
    """The heading path as a first line, capped at a quarter of the budget so the body keeps room."""
    if not path:
        return ""
    line = HEADING_SEPARATOR.join(path)
    cap = config.max_tokens // 4
    if count(line) > cap:
        line = line[: _longest_fitting_prefix(line, lambda t: count(t) <= cap - 1)] + "…"
        if count(line) > cap:
            line = line[:-1]
    return line + "\n"


def _overlap_tail(pieces: Sequence[_Piece], count: Callable[[str], int], budget: int) -> list[_Piece]:
    """Trailing sentences of a finished chunk, at most `budget` tokens, to start the next one."""
    if budget <= 0 or not pieces:
        return []
    sentences: list[_Piece] = []
    for piece in reversed(pieces):
        parts = [p for p in _SENTENCE_END.split(piece.text) if p.strip()]
        for part in reversed(parts):
            candidate = [_Piece(part, " ", piece.locator)] + sentences
            if count(_assemble(candidate)) > budget:
                return sentences
            sentences = candidate
    return sentences


def _sections(blocks: Sequence[Block]) -> list[list[Block]]:
    """Runs of blocks under the same heading path; every table row is a section of its own."""
    sections: list[list[Block]] = []
    for block in blocks:
        if block.record or not sections or sections[-1][0].record or sections[-1][0].heading_path != block.heading_path:
            sections.append([block])
        else:
            sections[-1].append(block)
    return sections


def _make_chunk(heading: str, path: tuple[str, ...], pieces: Sequence[_Piece], ordinal: int, count: TokenCounter) -> Chunk:
    text = heading + _assemble(pieces)
    return Chunk(text, path, ordinal, pieces[0].locator, pieces[-1].locator, count(text))


def chunk_blocks(blocks: Sequence[Block], tokenizer: object, config: ChunkConfig = ChunkConfig()) -> list[Chunk]:
    """Chunk one document's blocks; every chunk's text has at most `config.max_tokens` tokens."""
    count = tokenizer if isinstance(tokenizer, TokenCounter) else TokenCounter(tokenizer)
    chunks: list[Chunk] = []
    for section in _sections(blocks):
        heading = _heading_line(section[0].heading_path, count, config)

        def fits(body: str, heading: str = heading) -> bool:
            return count(heading + body) <= config.max_tokens

        pieces: list[_Piece] = []
        for block in section:
            pieces.extend(_split(block.text.strip(), "\n\n", block.locator, fits))

        current: list[_Piece] = []
        fresh = 0  # pieces in `current` that are new, not carried over as overlap
        for piece in pieces:
            if current and fits(_assemble([*current, piece])):
                current.append(piece)
                fresh += 1
                continue
            if current and fresh:
                chunks.append(_make_chunk(heading, section[0].heading_path, current, len(chunks), count))
                current = _overlap_tail(current, count, config.overlap_tokens)
            else:
                current = []
            # Drop overlap from the front until the new piece fits after it; a piece fits alone
            # by construction of _split.
            while current and not fits(_assemble([*current, piece])):
                current.pop(0)
            current.append(piece)
            fresh = 1
        if current and fresh:
            chunks.append(_make_chunk(heading, section[0].heading_path, current, len(chunks), count))
    return chunks
