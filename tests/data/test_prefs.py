"""Preference data: validation messages, rankings -> pairs with ties and F, majority, agreement."""

import json

import pytest

from alignkit.data.prefs import (agreement, krippendorff_alpha_nominal, load_pairs, outcome,
                                 rankings_to_pairs, validate)
from alignkit.errors import DataError


def write(tmp_path, lines, name="f.jsonl"):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


def test_one_message_with_line_number_per_kind_of_bad_pair(tmp_path):
    p = write(tmp_path, [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        "{broken",
        {"prompt": "p", "chosen": "a"},
        {"prompt": "p", "chosen": " ", "rejected": "b"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "c", "margin": "big"},
    ])
    fmt, valid, problems = validate(p)
    assert fmt == "pairs" and [l for l, _ in valid] == [1]
    assert problems == [
        "line 2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        "line 3: missing field 'rejected'",
        "line 4: field 'chosen' is empty",
        "line 5: chosen is identical to rejected",
        "line 6: duplicate of line 1",
        "line 7: field 'margin' must be a number, got 'big'",
    ]
    from alignkit.io import take_skipped

    take_skipped()
    assert load_pairs(p) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]  # the rest named and skipped
    assert [where.split(": ")[0] for where in take_skipped()] == [f"{p}:{n}" for n in range(2, 8)]
    lines = p.read_text().splitlines()
    p.write_text("".join(l + "\n" for l in lines[1:5] + lines[6:]))  # no good line left: refused
    with pytest.raises(DataError, match="5 problem"):
        load_pairs(p)
    assert take_skipped() == []


def test_rankings_and_prompts_are_salvaged_line_by_line(tmp_path):
    from alignkit.data.prefs import load_rankings
    from alignkit.data.prompts import load_prompts
    from alignkit.io import take_skipped

    take_skipped()
    ranked = {"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2], "labeler": "x"}
    p = write(tmp_path, [ranked, {"prompt": "p", "completions": ["a"]}, '{"prompt": "q", "compl'])
    assert load_rankings(p) == [(1, ranked)]
    assert [where.split(": ")[0] for where in take_skipped()] == [f"{p}:2", f"{p}:3"]
    q = write(tmp_path, [{"prompt": "One?"}, {"text": "no prompt"}, "[1]", {"prompt": "Two?"}], "q.jsonl")
    assert load_prompts(q) == ["One?", "Two?"]
    assert [where.split(": ")[0] for where in take_skipped()] == [f"{q}:2", f"{q}:3"]
    q.write_text('{"text": "no prompt"}\n{"prompt": ')
    with pytest.raises(DataError) as e:
        load_prompts(q)
    assert e.value.problems == ["line 1: missing or empty field 'prompt'",
                                "line 2: invalid JSON: Expecting value (column 12)"]


def test_bad_rankings_lines(tmp_path):
    p = write(tmp_path, [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranks": [1, 2], "labeler": "x"},
        {"prompt": "p", "completions": ["a"], "ranks": [1], "labeler": "x"},
        {"prompt": "p", "completions": ["a", "b"], "ranks": [0, "G"], "labeler": "x"},
        {"prompt": "q", "completions": ["a", "b"], "ranks": [1, 2], "labeler": "x"},
        {"prompt": "q", "completions": ["a", "b"], "ranks": [2, 1], "labeler": "x"},
    ])
    fmt, _, problems = validate(p)
    assert fmt == "rankings"
    assert problems == [
        "line 1: ranks has 2 entries for 3 completions",
        "line 2: field 'completions' must be a list of at least 2 strings",
        "line 3: ranks[0] must be a positive integer or \"F\", got 0",
        "line 3: ranks[1] must be a positive integer or \"F\", got 'G'",
        "line 5: duplicate of line 4",
    ]


def test_outcome_rules():
    assert outcome(1, 2) == 1 and outcome(3, 1) == -1 and outcome(2, 2) == 0
    assert outcome(5, "F") == 1 and outcome("F", 1) == -1 and outcome("F", "F") == 0


def test_rankings_to_pairs_with_ties_and_fail():
    """ranks [1, 2, 2, F] over a, b, c, d: a>b, a>c, a>d, b>d, c>d; b~c tie gives none: 5 pairs."""
    rows = [(1, {"prompt": "p", "completions": ["a", "b", "c", "d"], "ranks": [1, 2, 2, "F"], "labeler": "x"}),
            (2, {"prompt": "q", "completions": ["a", "b"], "ranks": [1, 1], "labeler": "x"}),
            (3, {"prompt": "r", "completions": ["a", "b"], "ranks": [], "labeler": None})]
    conv = rankings_to_pairs(rows)
    got = {(p["chosen"], p["rejected"]) for p in conv.pairs}
    assert got == {("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")}
    assert conv.items_in == 3
    assert conv.skipped == ["line 3: not labeled yet (empty ranks)", "line(s) 2: all completions tied: no pair"]


def test_majority_over_labelers():
    item = {"prompt": "p", "completions": ["a", "b", "c"]}
    rows = [(1, {**item, "ranks": [1, 2, 3], "labeler": "x"}),
            (2, {**item, "ranks": [1, 3, 2], "labeler": "y"}),
            (3, {**item, "ranks": [2, 1, 3], "labeler": "z"})]
    conv = rankings_to_pairs(rows)
    # a>b 2 votes of 3, a>c 3 of 3, b vs c: b>c (x, z) 2 of 3
    assert {(p["chosen"], p["rejected"], p["votes"]) for p in conv.pairs} == {
        ("a", "b", "2/3"), ("a", "c", "3/3"), ("b", "c", "2/3")}


def test_no_majority_gives_no_pair():
    item = {"prompt": "p", "completions": ["a", "b"]}
    rows = [(1, {**item, "ranks": [1, 2], "labeler": "x"}), (2, {**item, "ranks": [2, 1], "labeler": "y"})]
    conv = rankings_to_pairs(rows)
    assert conv.pairs == [] and conv.skipped == ["line(s) 1,2: no majority on any completion pair: no pair"]
    assert conv.agreement["percent_agreement"] == 0.0


def test_krippendorff_alpha_hand_derived():
    """Units (a,a), (a,b), (b,b): coincidences o_aa=2, o_ab=o_ba=1, o_bb=2, n=6, n_a=n_b=3.
    D_o = 2/6, D_e = (3*3 + 3*3) / (6*5) = 0.6, alpha = 1 - (1/3)/0.6 = 4/9 = 0.444444."""
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "b"], ["b", "b"]]) == pytest.approx(4 / 9)
    assert krippendorff_alpha_nominal([[1, 1], [0, 0], [-1, -1]]) == pytest.approx(1.0)


def test_percent_agreement():
    """Two labelers over 3 completions (3 pairs): x=[1,2,3], y=[1,3,2] agree on a>b, a>c, not b/c: 2/3."""
    item = {"prompt": "p", "completions": ["a", "b", "c"]}
    rows = [(1, {**item, "ranks": [1, 2, 3], "labeler": "x"}), (2, {**item, "ranks": [1, 3, 2], "labeler": "y"})]
    ag = agreement(rows)
    assert ag["items"] == 1 and ag["units"] == 3
    assert ag["percent_agreement"] == pytest.approx(2 / 3)
