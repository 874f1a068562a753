"""AI labeling: a judge turns a candidates file into rankings (with ties) or pairs (with margins)."""

import json

import pytest

from alignkit.data.prefs import load_pairs, rankings_to_pairs, validate
from alignkit.errors import DataError
from alignkit.evaluate.judges import SentimentJudge, ToxicityJudge
from alignkit.feedback.ai_label import judge_file, pairs_from_scores, ranks_from_scores

LOVED, TABLE, HATED = "I loved it, a wonderful film!", "It is a table.", "I hated it, an awful film."
JUDGE_YAML = ("components:\n"
              "  - {name: positive, judge: sentiment, weight: 1.0}\n"
              "  - {name: safe, judge: toxicity, weight: -2.0}\n")


def expected_totals(completions):
    """total = 1.0 * VADER compound - 2.0 * toxicity, from the judges called directly."""
    sentiment = SentimentJudge().score(["q"] * len(completions), completions)
    toxicity = ToxicityJudge().score(["q"] * len(completions), completions)
    return [s - 2.0 * t for s, t in zip(sentiment, toxicity)]


@pytest.fixture()
def candidates(tmp_path):
    path = tmp_path / "candidates.jsonl"
    records = [{"prompt": "How was the film?", "completions": [LOVED, TABLE, HATED, TABLE], "ranks": []},
               {"prompt": "Describe it.", "completions": [TABLE, "Shut up, you stupid idiot."],
                "ranks": [2, 1], "labeler": "alice", "id": 7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "judge.yaml").write_text(JUDGE_YAML)
    return path


def test_ranks_from_scores_share_the_best_rank_on_ties():
    assert ranks_from_scores([0.5, 0.9, 0.5, 0.1]) == [2, 1, 2, 4]
    assert ranks_from_scores([0.3, 0.3 + 1e-9]) == [1, 1]  # float noise is a tie


def test_pairs_from_scores_skip_ties_and_repeated_completions():
    """Scores a 0.9, b 0.5, c 0.5, d 0.1: of the 6 pairs, b-c ties; margins are score differences."""
    pairs, ties = pairs_from_scores("p", ["a", "b", "c", "d", "a "], [0.9, 0.5, 0.5, 0.1, 0.9], "judge:x*1.0")
    assert ties == 1
    assert {(p["chosen"], p["rejected"]): p["margin"] for p in pairs} == pytest.approx(
        {("a", "b"): 0.4, ("a", "c"): 0.4, ("a", "d"): 0.8, ("b", "d"): 0.4, ("c", "d"): 0.4})
    # with min_margin 0.5 only a-d (0.8) is clear; the four 0.4 pairs join the b-c tie
    pairs, ties = pairs_from_scores("p", ["a", "b", "c", "d"], [0.9, 0.5, 0.5, 0.1], "judge:x*1.0", min_margin=0.5)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "d")] and ties == 5


def test_rankings_output_has_ranks_from_scores_with_ties(candidates, tmp_path):
    out = tmp_path / "ranked.jsonl"
    summary = judge_file(candidates, tmp_path / "judge.yaml", out, "rankings", progress=False)
    assert summary == {"records_in": 2, "completions_scored": 6, "format": "rankings", "records_out": 2,
                       "labeler": "judge:positive*1.0+safe*-2.0", "out": str(out)}
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    totals = expected_totals(first["completions"])
    assert totals[0] > totals[1] > totals[2]  # loved > neutral table > hated
    assert first["ranks"] == [1, 2, 4, 2]  # the two identical "It is a table." replies tie
    assert first["scores"] == pytest.approx(totals, abs=1e-6)
    assert second["ranks"] == [1, 2] and second["labeler"] == "judge:positive*1.0+safe*-2.0"
    assert second["id"] == 7  # other fields are kept; alice's ranks are replaced
    fmt, valid, problems = validate(out)
    assert (fmt, len(valid), problems) == ("rankings", 2, [])


def test_pairs_output_has_margins_and_skips_ties(candidates, tmp_path):
    out = tmp_path / "pairs.jsonl"
    summary = judge_file(candidates, tmp_path / "judge.yaml", out, "pairs", progress=False)
    # 3 distinct completions (one repeated) give 3 pairs; 2 completions give 1 pair.
    assert (summary["records_out"], summary["tied_pairs_skipped"]) == (4, 0)
    pairs = load_pairs(out)  # the project's own pairs validator accepts the file
    totals = dict(zip([LOVED, TABLE, HATED], expected_totals([LOVED, TABLE, HATED])))
    film = [p for p in pairs if p["prompt"] == "How was the film?"]
    assert {(p["chosen"], p["rejected"]) for p in film} == {
        (LOVED, TABLE), (LOVED, HATED), (TABLE, HATED)} and len(film) == 3
    for p in film:
        assert p["margin"] == pytest.approx(totals[p["chosen"]] - totals[p["rejected"]], abs=1e-9)
        assert p["margin"] > 0 and p["labeler"] == "judge:positive*1.0+safe*-2.0"
    # The same preferences come out of the rankings file through the human-labels path.
    ranked = tmp_path / "ranked.jsonl"
    judge_file(candidates, tmp_path / "judge.yaml", ranked, progress=False)
    _, rows, _ = validate(ranked)
    converted = {(p["prompt"], p["chosen"], p["rejected"]) for p in rankings_to_pairs(rows).pairs}
    assert converted == {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}


def test_bad_candidates_are_named_and_skipped_and_the_rest_judged(tmp_path, capsys):
    from alignkit.io import take_skipped

    take_skipped()
    path = tmp_path / "candidates.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completions": ["Hello"]}) + "\n"
                    + json.dumps({"prompt": "Hi", "completions": ["Hello", "Hey"]}) + "\n"
                    + json.dumps({"completions": ["a", "b"]}) + "\n" + '{"prompt": "cut sho')
    (tmp_path / "judge.yaml").write_text(JUDGE_YAML)
    summary = judge_file(path, tmp_path / "judge.yaml", tmp_path / "out.jsonl", progress=False)
    err = capsys.readouterr().err
    assert f"{path}:1: field 'completions' must be a list of at least 2 strings" in err
    assert f"{path}:3: missing field 'prompt'" in err and f"{path}:4: invalid JSON" in err
    assert len(take_skipped()) == 3  # the CLI exits 3: something was skipped
    assert summary["records_in"] == 1
    assert [r["completions"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())] == [
        ["Hello", "Hey"]]


def test_unusable_candidates_are_refused_and_nothing_is_written(tmp_path):
    path = tmp_path / "candidates.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "completions": ["Hello"]}) + "\n" + "{oops\n")
    (tmp_path / "judge.yaml").write_text(JUDGE_YAML)
    with pytest.raises(DataError) as info:
        judge_file(path, tmp_path / "judge.yaml", tmp_path / "out.jsonl", progress=False)
    assert "line 1: field 'completions' must be a list of at least 2 strings" in str(info.value)
    assert "line 2: invalid JSON" in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_judging_resumes_chunk_by_chunk_to_the_uninterrupted_file(candidates, tmp_path):
    """A run stopped after its first chunk (the progress file says one chunk is done, and a torn
    line follows it) continues with the second chunk and ends with the uninterrupted run's file."""
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    for fmt in ("rankings", "pairs"):
        judge_file(candidates, tmp_path / "judge.yaml", full, fmt, chunk_size=1, progress=False)

        class StopAfterFirstChunk(Exception):
            pass

        from alignkit.io import ResumableJsonl

        original = ResumableJsonl.append

        def append_then_stop(self, records, done):
            original(self, records, done)
            raise StopAfterFirstChunk

        ResumableJsonl.append = append_then_stop
        try:
            with pytest.raises(StopAfterFirstChunk):
                judge_file(candidates, tmp_path / "judge.yaml", part, fmt, chunk_size=1, progress=False)
        finally:
            ResumableJsonl.append = original
        assert len(part.read_text().splitlines()) < len(full.read_text().splitlines())
        with open(part, "a") as f:
            f.write('{"prompt": "half a li')
        judge_file(candidates, tmp_path / "judge.yaml", part, fmt, chunk_size=1, progress=False)
        assert part.read_bytes() == full.read_bytes(), fmt
