"""Chunking: every chunk fits the token budget (property test), structure is followed, overlap is kept."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.apps.rag.chunk import ChunkConfig, TokenCounter, chunk_blocks, chunk_budget
from alignkit.apps.rag.sources import Block, markdown_blocks

# Text that stresses a tokenizer: long words, digits, punctuation runs, emoji, CJK, newlines.
_alphabet = st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs"), include_characters="\n\t")
_ascii_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_paragraph = st.one_of(
    st.text(alphabet=_alphabet, min_size=1, max_size=400),
    st.lists(_ascii_word, min_size=1, max_size=120).map(" ".join),
    st.lists(st.lists(_ascii_word, min_size=1, max_size=15).map(" ".join), min_size=1, max_size=12).map(". ".join),
)
_heading = st.lists(st.text(alphabet=_alphabet, min_size=1, max_size=60), max_size=4).map(tuple)
_blocks = st.lists(
    st.builds(Block, text=_paragraph, heading_path=_heading, locator=st.integers(1, 1000), record=st.booleans()),
    min_size=1, max_size=8,
)


@st.composite
def _configs(draw):
    max_tokens = draw(st.integers(16, 160))
    return ChunkConfig(max_tokens=max_tokens, overlap_tokens=draw(st.integers(0, max_tokens // 2)))


@pytest.mark.parametrize("tokenizer_fixture", ["bpe_tokenizer", "minilm_tokenizer"])
def test_chunks_always_fit_the_budget(tokenizer_fixture, request):
    """For any blocks and any budget, each chunk's text has at most max_tokens tokens and loses no short word."""
    counter = TokenCounter(request.getfixturevalue(tokenizer_fixture))

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(blocks=_blocks, config=_configs())
    def check(blocks, config):
        chunks = chunk_blocks(blocks, counter, config)
        for chunk in chunks:
            assert counter(chunk.text) <= config.max_tokens, (config, chunk)
            assert chunk.token_count == counter(chunk.text)
        joined = "\n".join(c.text for c in chunks)
        for block in blocks:
            for word in re.findall(r"\b[a-z]{1,8}\b", block.text):
                assert word in joined

    check()


def test_structure_headings_paragraphs_and_overlap(bpe_tokenizer):
    """A heading starts a chunk, a paragraph that fits is never cut, and split sections overlap."""
    sentence = "The gateway routes traffic through port {n} when the tunnel is up."
    long_para = " ".join(sentence.format(n=n) for n in range(12))
    text = f"# Guide\n\nShort intro.\n\n## Setup\n\n{long_para}\n\nClosing paragraph that fits.\n\n## Other\n\nLast words."
    counter = TokenCounter(bpe_tokenizer)
    config = ChunkConfig(max_tokens=200, overlap_tokens=60)
    assert counter(long_para) > 2 * config.max_tokens and counter(sentence.format(n=10)) < config.overlap_tokens
    chunks = chunk_blocks(markdown_blocks(text), counter, config)

    assert chunks[0].heading_path == ("Guide",) and chunks[0].text == "Guide\nShort intro."
    setup = [c for c in chunks if c.heading_path == ("Guide", "Setup")]
    assert len(setup) >= 3 and all(c.text.startswith("Guide > Setup\n") for c in setup)
    assert chunks[-1].heading_path == ("Guide", "Other") and chunks[-1].text.endswith("Last words.")
    # Overlap: each continuation starts with the sentence that ended the previous chunk.
    for before, after in itertools.pairwise(setup):
        last_sentence = before.text.rsplit(". ", 1)[-1].rstrip(".")
        assert last_sentence in after.text
    assert any("Closing paragraph that fits." in c.text for c in setup)
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    assert setup[0].first_locator == 7  # the long paragraph's line


def test_table_rows_are_chunks_of_their_own(bpe_tokenizer):
    rows = [Block(f"id: {i}; name: item {i}", ("orders",), i, record=True) for i in range(1, 4)]
    chunks = chunk_blocks(rows, bpe_tokenizer, ChunkConfig(max_tokens=64, overlap_tokens=8))
    assert [c.text for c in chunks] == [f"orders\nid: {i}; name: item {i}" for i in range(1, 4)]
    assert [(c.first_locator, c.last_locator) for c in chunks] == [(1, 1), (2, 2), (3, 3)]


def test_chunk_budget_leaves_room_for_question_and_answer():
    """2048 context - 128 question - 256 answer - 64 prompt = 1600 tokens, over k=4 chunks: 400 each."""
    assert chunk_budget(2048, k=4, question_tokens=128, answer_tokens=256) == 400
    with pytest.raises(ValueError, match="too small"):
        chunk_budget(512, k=8, question_tokens=200, answer_tokens=200)


def test_config_rejects_tiny_budgets():
    with pytest.raises(ValueError, match="max_tokens"):
        ChunkConfig(max_tokens=8)
    with pytest.raises(ValueError, match="overlap_tokens"):
        ChunkConfig(max_tokens=64, overlap_tokens=40)
