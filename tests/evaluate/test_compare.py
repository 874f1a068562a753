"""`alignkit eval`: models side by side on the same prompts."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.models import ScalarHeadModel, attach_lora, load_model, save_model


def test_eval_reports_every_metric_for_every_model(tmp_path, tiny_model_dir):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    ScalarHeadModel(base).save_pretrained(tmp_path / "rm" / "final", tok)
    policy = attach_lora(base, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # make the adapter move the policy away from its base
            p.data = torch.randn(p.shape, generator=g)
    save_model(policy, tok, tmp_path / "after")
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("Where is my order?\nCan I return shoes?\nHi\n")
    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: tone, judge: sentiment}\n")
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--models", f"before={tiny_model_dir},after={tmp_path / 'after'}",
                                      "--prompts", str(prompts), "--reward", str(tmp_path / "rm"),
                                      "--judge", str(judge), "--max-new-tokens", "6", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())["models"]
    assert [r["name"] for r in report] == ["before", "after"]
    for r in report:
        assert len(r["completions"]) == 3
        assert {"reward_mean", "toxicity_mean", "toxicity_share_over_0.5", "sentiment_mean", "response_tokens",
                "distinct_2", "repetition_mean", "relevance_mean", "judge_mean", "win_rate_vs_before",
                "win_rate_ci95_low", "win_rate_ci95_high"} <= set(r["metrics"])
        assert r["metrics"]["win_rate_ci95_low"] <= r["metrics"]["win_rate_vs_before"] <= r["metrics"]["win_rate_ci95_high"]
    before, after = report[0]["metrics"], report[1]["metrics"]
    assert before["kl_to_base"] is None  # a plain model has no adapter to disable
    assert math.isfinite(after["kl_to_base"]) and after["kl_to_base"] > 0.0  # exact KL: never negative
    assert before["win_rate_vs_before"] == 0.5  # against itself every prompt is a tie
    assert before["win_rate_ci95_low"] == before["win_rate_ci95_high"] == 0.5
    assert "toxicity_mean" in result.output and "win_rate_vs_before" in result.output


def test_eval_expectations_set_the_exit_status(tmp_path, tiny_model_dir):
    """A met expectation exits 0; a missed one writes the report and exits 1, naming it; a bad one fails
    before anything is generated."""
    prompts = tmp_path / "held_out.txt"
    prompts.write_text("Where is my order?\nHi\n")
    common = ["eval", "--models", f"before={tiny_model_dir},same={tiny_model_dir}", "--prompts", str(prompts),
              "--max-new-tokens", "4", "--device", "cpu"]
    met = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r1"),
                                   "--expect", "same.toxicity_mean<=before.toxicity_mean"])
    assert met.exit_code == 0, met.output
    assert "expect same.toxicity_mean<=before.toxicity_mean" in met.output and ": met" in met.output
    missed = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r2"), "--expect", "same.response_tokens>=99",
                                      "--expect", "same.toxicity_mean<=before.toxicity_mean"])
    assert missed.exit_code == 1
    assert "MISSED" in missed.output and (tmp_path / "r2" / "metrics.json").exists()
    bad = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "r3"), "--expect", "sane.toxicity_mean<=1"])
    assert bad.exit_code != 0 and "no model named 'sane'" in str(bad.exception)
    assert not (tmp_path / "r3").exists()


def test_eval_rejects_a_bad_models_list(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    result = CliRunner().invoke(app, ["eval", "--models", "before", "--prompts", str(prompts)])
    assert result.exit_code != 0 and "expected name=model" in str(result.exception)


def test_kl_to_base_is_exact_and_batch_independent(tiny_model_dir):
    """The batched KL equals the KL summed position by position from full, unbatched forward passes."""
    from alignkit.evaluate.compare import kl_to_base

    base, tok = load_model(str(tiny_model_dir), device="cpu")
    policy = attach_lora(base, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g)
    prompt_ids = [tok("Hi there")["input_ids"], tok("Where is my order?")["input_ids"], tok("Ok")["input_ids"]]
    tokens = [[5, 9, 12], [7], [3, 3, 4, 8, 20]]
    expected = []
    with torch.no_grad():
        for p, t in zip(prompt_ids, tokens):
            ids = torch.tensor([p + t])
            logp = torch.log_softmax(policy(input_ids=ids).logits[0, len(p) - 1:-1], dim=-1)
            with policy.disable_adapter():
                ref = torch.log_softmax(policy(input_ids=ids).logits[0, len(p) - 1:-1], dim=-1)
            expected.append((logp.exp() * (logp - ref)).sum().item())
    want = sum(expected) / len(expected)
    assert want > 0
    assert kl_to_base(policy, prompt_ids, tokens, tok.pad_token_id, batch_size=2) == pytest.approx(want, rel=1e-4)
    assert kl_to_base(policy, prompt_ids, tokens, tok.pad_token_id, batch_size=8) == pytest.approx(want, rel=1e-4)


def test_win_outcomes_count_near_ties_as_half():
    from alignkit.evaluate.compare import win_outcomes

    assert win_outcomes([0.8, 0.4, 0.61, 0.2], [0.6, 0.4, 0.6, 0.5]) == [1.0, 0.5, 1.0, 0.0]
    # With a tie margin of 0.05 the 0.01 difference (a toxicity wobble) is a tie.
    assert win_outcomes([0.8, 0.4, 0.61, 0.2], [0.6, 0.4, 0.6, 0.5], tie_margin=0.05) == [1.0, 0.5, 0.5, 0.0]


def test_bootstrap_interval_of_a_win_rate():
    """40 prompts, 30 wins: mean 0.75, binomial standard error sqrt(0.75 * 0.25 / 40) = 0.0685, so a
    95% interval of about 0.75 -+ 1.96 * 0.0685 = [0.616, 0.884]; the percentile bootstrap lands
    within 0.03 of it (it moves in steps of 1/40). All-equal values have a zero-width interval."""
    from alignkit.evaluate.compare import bootstrap_interval

    lo, hi = bootstrap_interval([1.0] * 30 + [0.0] * 10)
    assert lo == pytest.approx(0.616, abs=0.03) and hi == pytest.approx(0.884, abs=0.03)
    assert bootstrap_interval([1.0] * 30 + [0.0] * 10) == (lo, hi)  # seeded
    assert bootstrap_interval([0.5] * 12) == (0.5, 0.5)


def test_relevance_prefers_the_answer_to_this_message():
    """MiniLM cosine: a reply about the customer's kettle is closer to the kettle message than a
    canned reply about something else, which is the same for every message."""
    from alignkit.evaluate.judges import RelevanceJudge

    judge = RelevanceJudge()
    prompt = "My kettle from order #41234 arrived cracked. I want a replacement."
    on_topic, canned = judge.score([prompt, prompt], ["Sorry your kettle arrived cracked; a replacement kettle "
                                                      "ships today.", "Thank you for your interest in our newsletter."])
    assert on_topic > canned + 0.2
