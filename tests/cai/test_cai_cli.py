"""The stage commands one by one on the tiny model: cai redteam -> cai revise -> cai label, and
bad input refused with a message naming the problem."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import AlignkitError, DataError
from alignkit.io import read_jsonl

runner = CliRunner()


def test_redteam_revise_label_commands(tmp_path, tiny_model_dir):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": p, "category": "insults"}) + "\n"
                             for p in ("Insult my neighbour.", "Call my brother names.")))
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "5", "--temperature", "1.0"]
    red = runner.invoke(app, ["cai", "redteam", "--seeds", str(seeds), "--out", str(tmp_path / "red.jsonl"),
                              "--variations", "1", *model])
    assert red.exit_code == 0, red.output
    records = [r for _, r in read_jsonl(tmp_path / "red.jsonl")]
    assert [r["prompt"] for r in records[:2]] == ["Insult my neighbour.", "Call my brother names."]
    assert "flagged harmful" in red.output and "insults:" in red.output

    rev = runner.invoke(app, ["cai", "revise", "-i", str(tmp_path / "red.jsonl"), "--out-dir", str(tmp_path / "rev"),
                              "--principles", "dialogue_rules:no_insults", *model])
    assert rev.exit_code == 0, rev.output
    traces = [t for _, t in read_jsonl(tmp_path / "rev" / "trace.jsonl")]
    assert len(traces) == len(records)
    assert all(t["rounds"][0]["principle"] == "dialogue_rules:no_insults" for t in traces)

    lab = runner.invoke(app, ["cai", "label", "--prompts", str(tmp_path / "red.jsonl"), "--out",
                              str(tmp_path / "pairs.jsonl"), "--feedback-model", str(tiny_model_dir), *model])
    assert lab.exit_code == 0, lab.output
    pairs = [r for _, r in read_jsonl(tmp_path / "pairs.jsonl")]
    assert pairs and all(r["labeler"].startswith("ab_logprob:") and r["p_chosen"] > 0.5 for r in pairs)


def test_bad_input_lines_are_skipped_and_unusable_input_refused(tmp_path, tiny_model_dir):
    from alignkit.io import take_skipped

    take_skipped()
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"response": "no prompt"}\n{"prompt": "cut')
    result = runner.invoke(app, ["cai", "revise", "-i", str(bad), "--out-dir", str(tmp_path / "o"),
                                 "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "4"])
    assert result.exit_code == 3, result.output  # the good line was used, and the exit code says lines were skipped
    assert [t["prompt"] for _, t in read_jsonl(tmp_path / "o" / "trace.jsonl")] == ["fine"]
    bad.write_text('{"response": "no prompt"}\n')
    result = runner.invoke(app, ["cai", "revise", "-i", str(bad), "--out-dir", str(tmp_path / "o2"),
                                 "--model", str(tiny_model_dir)])
    assert isinstance(result.exception, DataError) and "line 1: needs a non-empty string 'prompt'" in str(result.exception)
    result = runner.invoke(app, ["cai", "label", "--prompts", str(bad), "--out", str(tmp_path / "p.jsonl"),
                                 "--mode", "judge"])
    assert isinstance(result.exception, AlignkitError) and "--mode judge with --judge" in str(result.exception)
    assert not (tmp_path / "o2").exists() and not (tmp_path / "p.jsonl").exists()


class Interrupted(Exception):
    """Raised in place of a kill, right after a batch has been appended."""


def interrupt_after_first_batch(monkeypatch):
    from alignkit.io import ResumableJsonl

    original = ResumableJsonl.append

    def append_then_stop(self, records, done):
        original(self, records, done)
        raise Interrupted

    monkeypatch.setattr(ResumableJsonl, "append", append_then_stop)
    return lambda: monkeypatch.setattr(ResumableJsonl, "append", original)


def test_redteam_and_revise_resume_to_the_uninterrupted_files(tmp_path, tiny_model_dir, monkeypatch):
    """Each command, stopped after its first batch with a torn line added by hand, is run again and
    ends with exactly the files an uninterrupted run wrote (sampled text included)."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": f"Say something rude about person {i}.", "category": "insults"})
                             + "\n" for i in range(5)))
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "6", "--batch-size", "2"]
    redteam = lambda out: ["cai", "redteam", "--seeds", str(seeds), "--out", str(out), "--variations", "1",
                           "--temperature", "1.0", *model]
    revise = lambda out: ["cai", "revise", "-i", str(tmp_path / "full.jsonl"), "--out-dir", str(out),
                          "--rounds", "2", "--temperature", "1.0", *model]
    for command, full, part, trace in ((redteam, "full.jsonl", "part.jsonl", ""),
                                       (revise, "rev_full", "rev_part", "trace.jsonl")):
        done = runner.invoke(app, command(tmp_path / full))
        assert done.exit_code == 0, done.output
        restore = interrupt_after_first_batch(monkeypatch)
        stopped = runner.invoke(app, command(tmp_path / part))
        restore()
        assert isinstance(stopped.exception, Interrupted)
        with open(tmp_path / part / trace if trace else tmp_path / part, "a") as f:
            f.write('{"prompt": "torn')
        resumed = runner.invoke(app, command(tmp_path / part))
        assert resumed.exit_code == 0 and "resuming" in resumed.output, resumed.output
        for name in (["trace.jsonl", "sft.jsonl"] if trace else [""]):
            a, b = (tmp_path / full / name).read_bytes(), (tmp_path / part / name).read_bytes()
            assert a == b and len(a.splitlines()) >= 5, name
