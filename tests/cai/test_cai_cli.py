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


def test_bad_input_is_refused(tmp_path, tiny_model_dir):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"response": "no prompt"}\n')
    result = runner.invoke(app, ["cai", "revise", "-i", str(bad), "--out-dir", str(tmp_path / "o"),
                                 "--model", str(tiny_model_dir)])
    assert isinstance(result.exception, DataError) and "line 2: needs a non-empty string 'prompt'" in str(result.exception)
    result = runner.invoke(app, ["cai", "label", "--prompts", str(bad), "--out", str(tmp_path / "p.jsonl"),
                                 "--mode", "judge"])
    assert isinstance(result.exception, AlignkitError) and "--mode judge with --judge" in str(result.exception)
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.jsonl").exists()
