"""prefs and reward commands: validate, from-rankings, sample, score."""

import json

from typer.testing import CliRunner

from alignkit.cli import app

runner = CliRunner()


def test_validate_lists_problems_and_exits_1(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    result = runner.invoke(app, ["prefs", "validate", str(p)])
    assert result.exit_code == 1
    assert f"{p}:2: missing field 'rejected'" in result.output
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert runner.invoke(app, ["prefs", "validate", str(p)]).exit_code == 0


def test_from_rankings_reports_counts_skips_and_agreement(tmp_path):
    r = tmp_path / "r.jsonl"
    item = {"prompt": "p", "completions": ["a", "b", "c"]}
    r.write_text("\n".join(json.dumps(x) for x in [
        {**item, "ranks": [1, 2, "F"], "labeler": "x"}, {**item, "ranks": [1, 2, 3], "labeler": "y"},
        {"prompt": "q", "completions": ["a", "b"], "ranks": [], "labeler": None}]) + "\n")
    out = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["prefs", "from-rankings", str(r), str(out)])
    assert result.exit_code == 0, result.output
    assert "3 ranked item line(s) in, 3 pair(s) out" in result.output
    assert "skipped line 3: not labeled yet" in result.output
    assert "100.0% pairwise" in result.output
    pairs = [json.loads(l) for l in out.read_text().splitlines()]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("a", "b"), ("a", "c"), ("b", "c")}


def test_from_rankings_refuses_invalid_file(tmp_path):
    r = tmp_path / "r.jsonl"
    r.write_text('{"prompt": "p", "completions": ["a", "b"], "ranks": [1], "labeler": "x"}\n')
    result = runner.invoke(app, ["prefs", "from-rankings", str(r), str(tmp_path / "o.jsonl")])
    assert result.exit_code != 0 and "ranks has 1 entries for 2 completions" in str(result.exception)
    assert not (tmp_path / "o.jsonl").exists()


def test_sample_writes_unlabeled_rankings(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Where is my order?\nCan I return shoes?\n")
    out = tmp_path / "cands.jsonl"
    result = runner.invoke(app, ["prefs", "sample", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                 "--n", "3", "--out", str(out), "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == ["Where is my order?", "Can I return shoes?"]
    assert all(len(r["completions"]) == 3 and r["ranks"] == [] for r in recs)
    assert len({c for r in recs for c in r["completions"]}) > 1  # sampled, not greedy copies


def test_reward_score_single_and_file(tmp_path, tiny_model_dir):
    from alignkit.models import ScalarHeadModel, load_model

    base, tok = load_model(str(tiny_model_dir), device="cpu")
    rm = ScalarHeadModel(base)
    rm.save_pretrained(tmp_path / "rm" / "final", tok)
    single = runner.invoke(app, ["reward", "score", "-m", str(tmp_path / "rm"), "--prompt", "Hi",
                                 "--completion", "Hello!", "--device", "cpu"])
    assert single.exit_code == 0, single.output
    expected = rm.score_texts(tok, ["Hi"], ["Hello!"])[0]
    assert abs(float(single.output.strip().splitlines()[-1]) - expected) < 1e-5
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away"}\n{"prompt": "Hi", "completion": "Hello!"}\n')
    out = tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["reward", "score", "-m", str(tmp_path / "rm"), "--file", str(f), "--out", str(out),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert abs(recs[0]["reward_chosen"] - expected) < 1e-5 and abs(recs[1]["reward"] - expected) < 1e-5
    assert "reward_rejected" in recs[0]
