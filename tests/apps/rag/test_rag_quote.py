"""Quoted answers: which sentences a quote may copy, how the closest one is chosen, and the quote grammar."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

from alignkit.apps.rag import Hit
from alignkit.apps.rag.answer import _quote
from alignkit.apps.rag.quote import closest_sentence, identifiers, passage_sentences, quote_candidates

VACATION = Hit(
    text="Leave policy > Annual leave\nEvery full-time employee accrues 25 paid vacation days per calendar year.\n"
         "Up to five unused days carry over; the rest lapse on 31 March. Ask HR.",
    source="/d/handbook/vacation.md", score=1.0, method="dense", heading_path=("Leave policy", "Annual leave"))
SCHEDULING = Hit(
    text="Scheduling pipelines\nA pipeline that is still running when its next start arrives is not started twice;\n"
         "the later run is queued until the first finishes.",
    source="/d/product/scheduling.md", score=0.9, method="dense", heading_path=("Scheduling pipelines",))
CODES = Hit(
    text="Quokka error codes > Broker errors\n| Code | Meaning |\n| --- | --- |\n"
         "| QK-4410 | The worker timed out waiting for the message broker. |\n"
         "| QK-4417 | The worker could not authenticate to the broker. |",
    source="/d/product/error-codes.md", score=0.8, method="dense", heading_path=("Quokka error codes", "Broker errors"))
RELEASES = Hit(text="releases\nQK-5020: what the worker could not do",
               source="/d/product/releases.csv", score=0.7, method="dense", heading_path=("releases",))


def test_sentences_skip_the_heading_join_wrapped_lines_and_keep_table_rows():
    assert passage_sentences(VACATION) == [
        "Every full-time employee accrues 25 paid vacation days per calendar year.",
        "Up to five unused days carry over; the rest lapse on 31 March.",
        "Ask HR.",
    ]
    # A sentence wrapped after ";" is one sentence; the table's header and rule rows are not answers.
    assert passage_sentences(SCHEDULING) == [
        "A pipeline that is still running when its next start arrives is not started twice; "
        "the later run is queued until the first finishes."]
    assert passage_sentences(CODES) == [
        "| QK-4410 | The worker timed out waiting for the message broker. |",
        "| QK-4417 | The worker could not authenticate to the broker. |"]
    assert [n for n, _ in quote_candidates([VACATION, CODES])] == [1, 1, 1, 2, 2]


def test_identifiers_are_words_with_digits_or_underscores():
    assert identifiers("What does error QK-4417 mean for max_inflight_batches in 2.3.0, a well-known port?") == {
        "qk-4417", "max_inflight_batches", "2.3.0"}
    assert identifiers("Who is Jonas Berg?") == set()


class BagOfWords:
    """Test double for the embedder: unit vectors of hashed lower-case word counts (cosine = shared words)."""

    name = "bag-of-words"

    def encode(self, texts):
        vectors = np.zeros((len(texts), 512), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[\w-]+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % 512] += 1
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_closest_sentence_prefers_the_sentence_naming_the_question_identifier():
    """By shared words alone the release note wins: it shares what, the, worker, could, not, do (cosine
    6 / (sqrt(8) sqrt(7)) = 0.80) against the row's qk-4417, the (twice in the row), worker, could, not
    (6 / (sqrt(8) sqrt(11)) = 0.64); the QK-4417 row is the one that holds the question's identifier."""
    question = "What could the worker not do in QK-4417?"
    plain = BagOfWords().encode([question, passage_sentences(RELEASES)[0], passage_sentences(CODES)[1]])
    assert plain[1] @ plain[0] > plain[2] @ plain[0]
    assert closest_sentence(question, [RELEASES, CODES], BagOfWords()) == (
        "| QK-4417 | The worker could not authenticate to the broker. | [2]")
    # Without an identifier, similarity decides; the citation is the sentence's passage number.
    assert closest_sentence("How many paid vacation days per year?", [CODES, VACATION], BagOfWords()) == (
        "Every full-time employee accrues 25 paid vacation days per calendar year. [2]")


def test_quote_grammar_makes_a_random_model_copy_a_passage_sentence(tiny):
    """The tiny model has random weights: whatever it picks, the grammar makes it a whole sentence of a passage
    followed by that passage's number."""
    model, tokenizer = tiny
    messages = [{"role": "user", "content": "Passages: ... Question: how many vacation days?"}]
    allowed = {f"{s} [{n}]" for n, s in quote_candidates([VACATION, SCHEDULING])}
    assert _quote(model, tokenizer, messages, [VACATION, SCHEDULING]) in allowed


def test_nothing_to_quote_is_a_clear_error():
    from alignkit.errors import AlignkitError

    empty = Hit(text="Title only", source="/d/x.md", score=1.0, method="dense", heading_path=("Title only",))
    with pytest.raises(AlignkitError, match="no sentence to quote"):
        closest_sentence("anything?", [empty], BagOfWords())
