"""Answering and evaluation logic: retrieval metrics by hand, faithfulness, QA file errors, prompts that fit the window."""

from __future__ import annotations

import pytest

from alignkit.apps.rag import Hit
from alignkit.apps.rag.answer import build_prompt, load_prompt
from alignkit.apps.rag.evaluate import EvalReport, QAItem, faithfulness, load_qa, score_retrieval, sentence_support
from alignkit.errors import DataError


def _hit(source: str, text: str = "filler text") -> Hit:
    return Hit(text=text, source=source, score=1.0, method="dense")


def test_retrieval_metrics_by_hand():
    """Three questions answered at ranks 1, 3 and not at all (k = 5):

    hit-rate@5 = 2/3; MRR = (1/1 + 1/3 + 0) / 3 = 4/9 = 0.4444.
    A fourth question expects two sources and finds one (rank 2): recall 1/2, hit 1, RR 1/2.
    Over all four: hit-rate 3/4, MRR (1 + 1/3 + 0 + 1/2) / 4 = 11/24, recall@5 (1 + 1 + 0 + 0.5) / 4 = 0.625.
    """
    other = [_hit(f"/d/other{i}.md") for i in range(5)]
    q1 = QAItem(1, "q1", ("a.md",))
    q2 = QAItem(2, "q2", ("docs/b.md",), answer="25 days")
    q3 = QAItem(3, "q3", ("c.md",))
    q4 = QAItem(4, "q4", ("x.md", "y.md"))
    ranked = {
        1: [_hit("/d/a.md")] + other[:4],
        # Rank 1 is the right file without the answer, rank 2 a file whose name only ends like it.
        2: [_hit("/d/docs/b.md", "no number here"), _hit("/d/xdocs/b.md", "25 days"), _hit("/d/docs/b.md", "you get 25 DAYS"),
            *other[:2]],
        3: other + [_hit("/d/c.md")],  # at rank 6: outside k = 5
        4: [other[0], _hit("/d/y.md"), *other[1:4]],
    }
    results = [score_retrieval(q, ranked[q.line], k=5) for q in (q1, q2, q3)]
    assert [r.rank for r in results] == [1, 3, None]
    metrics = EvalReport(5, "dense", results).metrics()
    assert metrics["hit_rate@5"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert metrics["recall@5"] == pytest.approx(2 / 3)

    results.append(score_retrieval(q4, ranked[4], k=5))
    metrics = EvalReport(5, "dense", results).metrics()
    assert results[-1].recall == 0.5
    assert metrics["hit_rate@5"] == pytest.approx(3 / 4)
    assert metrics["mrr"] == pytest.approx(11 / 24)
    assert metrics["recall@5"] == pytest.approx(0.625)


def test_faithfulness_on_hand_made_sentences():
    """Passage words: employees, get, 25, paid, vacation, days, year, carry, 5, unused, march.

    "Employees get 25 paid vacation days a year [1]."  content {employees, 25, paid, vacation, days, year}: 6/6.
    "You can carry over 5 unused days."               {carry, over, 5, unused, days}: 4/5 = 0.8 (no "over").
    "Unused days are paid out in cash every December." {unused, days, paid, out, cash, every, december}: 3/7.
    "You get 40 vacation days."                        {40, vacation, days}: 2/3 = 0.667 -> supported at 0.6,
    the overlap check's known blind spot for one changed number among few words; at 0.7 it is flagged.
    """
    passages = ["Employees get 25 paid vacation days per year.", "You may carry 5 unused days into March."]
    assert sentence_support("Employees get 25 paid vacation days a year [1].", passages) == 1.0
    assert sentence_support("You can carry over 5 unused days.", passages) == pytest.approx(0.8)
    answer = ("Employees get 25 paid vacation days a year [1]. You can carry over 5 unused days. "
              "Unused days are paid out in cash every December.")
    score, unsupported = faithfulness(answer, passages)
    assert score == pytest.approx(2 / 3)
    assert unsupported == ["Unused days are paid out in cash every December."]
    assert faithfulness("You get 40 vacation days.", passages) == (1.0, [])
    assert faithfulness("You get 40 vacation days.", passages, threshold=0.7) == (0.0, ["You get 40 vacation days."])
    assert faithfulness("It is.", passages) == (None, [])  # nothing to check: only stopwords


def test_bad_qa_lines_are_reported_with_line_numbers(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        '{"question": "fine", "source": "a.md"}\n'
        '{"question": "no expectation"}\n'
        "not json\n"
        "\n"
        '{"question": "", "answer": "x"}\n'
        '{"question": "bad source", "source": 3}\n'
        '{"question": "list ok", "source": ["a.md", "b.md"], "answer": "x"}\n'
    )
    with pytest.raises(DataError) as info:
        load_qa(qa)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 2", "line 3", "line 5", "line 6"], problems
    assert "needs 'source'" in problems[0] and "invalid JSON" in problems[1] and "'question'" in problems[2]
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "q", "source": "/handbook/a.md"}\n\n{"question": "r", "answer": "x"}\n')
    assert load_qa(good) == [QAItem(1, "q", ("handbook/a.md",)), QAItem(3, "r", (), "x")]


def test_prompt_fits_a_small_context_window(tmp_path, make_tiny_model):
    """A model with 512 positions (the shipped instructions take about 300 of its tiny vocabulary), 4 passages
    of about 900 tokens each, 48 answer tokens: passages are trimmed to fit."""
    from transformers import AutoConfig

    from alignkit.apps.rag.answer import context_window
    from alignkit.models import load_model

    model_dir = make_tiny_model(tmp_path / "small")
    config = AutoConfig.from_pretrained(model_dir)
    config.max_position_embeddings = 512
    config.save_pretrained(model_dir)
    model, tokenizer = load_model(str(model_dir), device="cpu")
    window = context_window(model)
    assert window == 512
    long_text = " ".join(f"The quick brown fox number {i} jumps over the lazy dog." for i in range(30))
    hits = [Hit(text=long_text, source=f"/d/doc{i}.md", score=1.0 - i / 10, method="dense") for i in range(4)]
    prompt = load_prompt()
    messages, passages, count = build_prompt("Which fox jumps?", hits, tokenizer, window, 48, prompt)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert tokens == count
    assert tokens + 48 <= window
    assert passages and all(len(p.text) < len(long_text) for p in passages)
    # Passages are named by number and a short title; the model never sees a file path to copy.
    assert "[1] doc0\n" in messages[-1]["content"] and "/d/" not in messages[-1]["content"]
    # The unconstrained prompt would not have fit: the test exercises the trimming.
    _, untrimmed, big = build_prompt("Which fox jumps?", hits, tokenizer, 100_000, 48, prompt)
    assert big + 48 > window and [p.text for p in untrimmed] == [long_text] * 4


def test_answers_are_compared_normalised():
    from alignkit.apps.rag.evaluate import normalize_answer

    assert normalize_answer("The limit is 1,000 EUR.") == "the limit is 1000 eur"
    assert normalize_answer("25 paid vacation days") in normalize_answer("You get 25 paid  vacation days [1].")
    assert normalize_answer("2.5 km") in normalize_answer("About 2.5 km, then stop.")
    assert normalize_answer("25 paid vacation days") not in normalize_answer("You get 20 paid vacation days.")


def test_passages_are_titled_by_heading_else_file_name_never_by_path():
    from alignkit.apps.rag.answer import passage_title

    assert passage_title(Hit(text="t", source="/srv/docs/handbook/vacation_policy.md", score=1.0, method="dense")) \
        == "vacation policy"
    assert passage_title(Hit(text="t", source="/srv/x.md", score=1.0, method="dense",
                             heading_path=("Handbook", "Vacation"))) == "Vacation"
