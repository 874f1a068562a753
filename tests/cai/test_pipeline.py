"""A smoke run of the whole Constitutional AI pipeline on the tiny model: every stage leaves its
output, the report puts the three models side by side, and a rerun skips every finished stage."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from alignkit.cai.pipeline import STAGES
from alignkit.cli import app
from alignkit.data.prefs import validate
from alignkit.data.sft import load_conversations
from alignkit.io import read_jsonl

runner = CliRunner()
TRAIN = {"micro_batch_size": 1, "grad_accum": 1, "max_steps": 1, "save_every": 1, "lora": {"r": 2, "alpha": 4}}


def smoke_config(tmp_path, model: str) -> dict:
    judge = lambda principle: {"components": [{"judge": "llm", "mode": "rating", "principle": principle,
                                               "model": model, "batch_size": 8}], "device": "cpu"}
    return {"model": model, "output_dir": str(tmp_path), "run_name": "cai", "device": "cpu", "seed": 1,
            "principles": "dialogue_rules,human_rights:privacy",
            "redteam": {"held_out": 2, "max_seeds": 3, "variations": 1, "max_new_tokens": 6,
                        "temperature": 1.0},
            "revise": {"rounds": 2, "max_new_tokens": 6, "temperature": 1.0},  # greedy: empty text
            "sft": {**TRAIN, "data": {"max_length": 64}},
            "label": {"feedback_model": model, "max_new_tokens": 6, "margin": "log_odds"},
            "reward": {**TRAIN, "data": {"max_length": 64}},
            "ppo": {"rollout_batch": 2, "minibatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6,
                    "max_steps": 1, "save_every": 1},
            "evaluate": {"max_new_tokens": 6, "max_benign": 2, "harmless_judge": judge("harmless"),
                         "helpful_judge": judge("helpful")}}


def test_pipeline_runs_every_stage_and_skips_finished_ones(tmp_path, tiny_model_dir):
    config = tmp_path / "cai.yaml"
    config.write_text(yaml.safe_dump(smoke_config(tmp_path, str(tiny_model_dir))))
    result = runner.invoke(app, ["cai", "pipeline", "--config", str(config)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "cai"

    redteam = [r for _, r in read_jsonl(run / "redteam" / "redteam.jsonl")]
    held = [r["prompt"] for _, r in read_jsonl(run / "redteam" / "held_out.jsonl")]
    seeds = [r for r in redteam if r["origin"] == "seed"]
    assert len(seeds) == 3 and len(held) == 2 and not {r["prompt"] for r in redteam} & set(held)
    assert all({"response", "scores", "flagged"} <= r.keys() and 0 <= r["scores"]["toxicity"] <= 1 for r in redteam)
    assert all(v["seed_prompt"] in {s["prompt"] for s in seeds} for v in redteam if v["origin"] == "variation")

    traces = [t for _, t in read_jsonl(run / "revise" / "trace.jsonl")]
    assert len(traces) == len(redteam) and all(len(t["rounds"]) == 2 for t in traces)
    assert all(r["principle"].startswith(("dialogue_rules:", "human_rights:privacy")) for t in traces for r in t["rounds"])
    assert len(load_conversations(run / "revise" / "sft.jsonl")) >= 1

    _, pairs, problems = validate(run / "label" / "pairs.jsonl", "pairs")
    assert pairs and problems == []
    assert all(0.5 < r["p_chosen"] <= 1 and r["margin"] > 0 for _, r in pairs)

    for stage in ("sft", "reward", "ppo"):
        assert (run / stage / "final" / "adapter_config.json").is_file(), stage
    metrics = json.loads((run / "metrics.json").read_text())
    for part, n in (("harmlessness", 2), ("helpfulness", 2)):
        assert metrics[part]["prompts"] == n
        assert list(metrics[part]["models"]) == ["base", "sl_cai", "rl_cai"]
        for m in metrics[part]["models"].values():
            assert {"toxicity_mean", "judge_mean", "reward_mean", "win_rate_vs_base"} <= m.keys()
            assert 1 <= m["judge_mean"] <= 5
    report = (run / "report.md").read_text()
    assert "| harmlessness judge (higher is better) |" in report and "sl_cai" in report

    # A rerun finds every stage complete and touches nothing.
    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "config.yaml"}
    again = runner.invoke(app, ["cai", "pipeline", "--config", str(config)])
    assert again.exit_code == 0, again.output
    assert [l for l in again.output.splitlines() if "complete, skipped" in l] == \
        [f"cai: {s}: complete, skipped" for s in STAGES]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # --from-stage reruns that stage (and later ones) only.
    redo = runner.invoke(app, ["cai", "pipeline", "--config", str(config), "--from-stage", "evaluate"])
    assert redo.exit_code == 0, redo.output
    assert "cai: ppo: complete, skipped" in redo.output and "cai: evaluate: running" in redo.output


def test_bad_stage_config_fails_before_any_stage(tmp_path, tiny_model_dir):
    cfg = smoke_config(tmp_path, str(tiny_model_dir))
    cfg["ppo"]["rollout_bach"] = 4
    config = tmp_path / "cai.yaml"
    config.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["cai", "pipeline", "--config", str(config)])
    assert result.exit_code != 0
    assert "ppo.rollout_bach: unknown key" in str(result.exception)
    assert not (tmp_path / "cai").exists()
