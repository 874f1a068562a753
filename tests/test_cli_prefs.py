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


def _sample_args(tiny_model_dir, prompts, out):
    return ["prefs", "sample", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--n", "2",
            "--batch-size", "2", "--out", str(out), "--max-new-tokens", "16", "--device", "cpu"]


def test_sample_resumes_after_sigkill_to_the_uninterrupted_file(tmp_path, tiny_model_dir):
    """Kill `prefs sample` (SIGKILL) once some batches are on disk, tear its last line by hand, run
    it again: the file equals, byte for byte, the one an uninterrupted run wrote."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import torch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Question number {i}: what now?\n" for i in range(24)))
    full, killed = tmp_path / "full.jsonl", tmp_path / "killed.jsonl"
    result = runner.invoke(app, _sample_args(tiny_model_dir, prompts, full))
    assert result.exit_code == 0, result.output
    # Same thread count as this process, so the two processes compute the same floats.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *_sample_args(tiny_model_dir, prompts, killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / ".killed.jsonl.progress.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text() or "{}").get("done", 0) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not after finishing
    state = json.loads(progress.read_text())
    assert not state["complete"] and 0 < state["done"] < 24
    kept = killed.read_bytes()[:state["bytes"]]
    assert full.read_bytes().startswith(kept)
    with open(killed, "a") as f:
        f.write('{"prompt": "Question number 9')  # a torn last line: dropped and redone
    result = runner.invoke(app, _sample_args(tiny_model_dir, prompts, killed))
    assert result.exit_code == 0, result.output
    assert f"resumed after {state['done']} of 24 prompt(s)" in result.output
    assert killed.read_bytes() == full.read_bytes()
    again = runner.invoke(app, _sample_args(tiny_model_dir, prompts, killed))  # finished: nothing to redo
    assert again.exit_code == 0 and "already complete" in again.output and killed.read_bytes() == full.read_bytes()


def test_sample_refuses_to_continue_with_other_arguments(tmp_path, tiny_model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("One?\nTwo?\nThree?\n")
    out = tmp_path / "c.jsonl"
    from alignkit.io import ResumableJsonl

    # An unfinished job of another seed owns the file.
    ResumableJsonl(out, {"command": "prefs sample", "seed": 5}).append([{"prompt": "One?"}], done=1)
    result = runner.invoke(app, _sample_args(tiny_model_dir, prompts, out))
    assert result.exit_code != 0 and "--restart" in str(result.exception)
    result = runner.invoke(app, _sample_args(tiny_model_dir, prompts, out) + ["--restart"])
    assert result.exit_code == 0, result.output
    assert [json.loads(l)["prompt"] for l in out.read_text().splitlines()] == ["One?", "Two?", "Three?"]
