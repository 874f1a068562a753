"""Reward-hacking monitors on hand-made histories."""

from alignkit.config import MonitorSettings
from alignkit.evaluate.monitors import check, mean_repetition, repetition


def rec(step, score=0.0, kl=0.0, length=20.0, distinct=0.9, judge=None):
    return {"step": step, "score": score, "kl": kl, "response_length": length, "distinct_2": distinct, "judge": judge}


def test_quiet_run_gives_no_warning():
    history = [rec(i, score=0.1 * i, judge=0.1 * i) for i in range(1, 8)]
    assert check(history, MonitorSettings(max_kl=1.0)) == []


def test_kl_length_and_degeneracy():
    history = [rec(1, length=20.0), rec(2, kl=2.5, length=31.0, distinct=0.1)]
    warnings = check(history, MonitorSettings(max_kl=1.0, length_drift=0.5, min_distinct_2=0.3))
    assert len(warnings) == 3
    assert warnings[0] == "KL to the reference 2.500 exceeds 1.0"
    assert warnings[1].startswith("mean response length drifted +55% since step 1 (20.0 -> 31.0 tokens)")
    assert warnings[2] == "degenerate output: distinct-2 0.100 below 0.3"


def test_reward_up_judge_down_is_divergence():
    """Windows of 2: score means 0.15 -> 0.35 (+0.2), judge means 0.5 -> 0.3 (-0.2)."""
    history = [rec(1, 0.1, judge=0.5), rec(2, 0.2, judge=0.5), rec(3, 0.3, judge=0.3), rec(4, 0.4, judge=0.3)]
    warnings = check(history, MonitorSettings(window=2))
    assert warnings == ["reward and independent judge diverge over the last 4 steps: score +0.200, judge -0.200"]
    both_up = [rec(i, 0.1 * i, judge=0.1 * i) for i in range(1, 5)]
    assert check(both_up, MonitorSettings(window=2)) == []


def test_per_reply_repetition_by_hand():
    """Words are \\w+ runs. "In-Context-In-Context-In-Context" -> in context in context in context:
    3-grams (in context in), (context in context), (in context in), (context in context): 2 of 4
    repeat an earlier one -> 0.5. Four distinct words -> 2 distinct 3-grams -> 0. Two words -> 0."""
    assert repetition("Syntactically In-Context-In-Context-In-Context") == 1 - 3 / 5
    assert repetition("In-Context-In-Context-In-Context") == 0.5
    assert repetition("sorry about your kettle") == 0.0
    assert repetition("two words") == 0.0
    assert mean_repetition(["In-Context-In-Context-In-Context", "sorry about your kettle"]) == 0.25
    assert mean_repetition([]) == 0.0


def test_looping_reply_warns_even_when_the_batch_is_varied():
    history = [rec(1), {**rec(2), "repetition": 0.6}]
    assert check(history, MonitorSettings()) == [
        "degenerate output: 60% of each reply's word 3-grams repeat an earlier one of the same reply (above 30%)"]
    assert check([rec(1), {**rec(2), "repetition": 0.1}], MonitorSettings()) == []
