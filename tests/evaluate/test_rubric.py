"""The rubric judge: criteria scored by hand, its config errors, and the demo's gold labeler file."""

from pathlib import Path

import pytest

from alignkit.config import load_config
from alignkit.errors import ConfigError
from alignkit.evaluate.judges import Criterion, JudgeConfig, RubricJudge, load_judge

GOLD = Path(__file__).resolve().parents[2] / "configs" / "demo" / "gold_judge.yaml"
PROMPT = "My kettle from order #41234 arrived cracked. Fix it now."


def rubric() -> RubricJudge:
    return RubricJudge([
        Criterion(name="sorry", any=["sorry", "apolog"]),
        Criterion(name="calm", none=["your fault", "!!"]),
        Criterion(name="specific", weight=2.0, echo=r"#\d{5}|kettle"),
        Criterion(name="short", words=(3, 12)),
    ])


def test_rubric_scores_by_hand():
    """Weights 1, 1, 2, 1 (total 5); the score is the weight of the passed criteria over 5.

    a: "Sorry about order #41234, I will send a new one."  sorry, calm, specific (#41234), 10 words:
       (1 + 1 + 2 + 1) / 5 = 1.0
    b: "That is your fault!!"  no sorry, not calm, nothing specific, 4 words: 1 / 5 = 0.2
    c: "We apologise for the KETTLE."  apolog, calm, 'kettle' ignoring case, 5 words: 5 / 5 = 1.0
    d: a 13-word reply with sorry and nothing specific: sorry + calm = 2 / 5 = 0.4
    """
    judge = rubric()
    replies = ["Sorry about order #41234, I will send a new one.", "That is your fault!!",
               "We apologise for the KETTLE.", "sorry " * 13]
    assert judge.score([PROMPT] * 4, replies) == pytest.approx([1.0, 0.2, 1.0, 0.4])
    assert judge.passes(PROMPT, "That is your fault!!") == {"sorry": False, "calm": False, "specific": False,
                                                              "short": True}
    assert judge.pass_rates([PROMPT] * 4, replies) == {"sorry": 0.75, "calm": 0.75, "specific": 0.5, "short": 0.75}


def test_echo_wants_the_prompts_own_detail_and_passes_when_there_is_none():
    judge = RubricJudge([Criterion(name="specific", echo=r"#\d{5}")])
    # Another order number is not this customer's.
    assert judge.score([PROMPT, PROMPT], ["About #41234: on its way.", "About #99999: on its way."]) == [1.0, 0.0]
    # Nothing to repeat in the prompt: the criterion cannot be failed.
    assert judge.score(["Where is my parcel?"], ["No idea."]) == [1.0]


def test_max_repetition_fails_a_reply_that_says_the_same_thing_twice():
    """"sorry about order 41234" twice: words sorry about order 41234 sorry about order 41234 (8 words,
    6 3-grams); the 3-grams from the second "sorry" on repeat earlier ones except "41234 sorry about",
    "order 41234 sorry": (sorry about order), (about order 41234) repeat -> 2 of 6 = 0.333."""
    judge = RubricJudge([Criterion(name="no_repeats", max_repetition=0.2)])
    once, twice = "Sorry about order 41234.", "Sorry about order 41234. Sorry about order 41234."
    assert judge.score([PROMPT, PROMPT], [once, twice]) == [1.0, 0.0]
    assert RubricJudge([Criterion(name="lenient", max_repetition=0.34)]).score([PROMPT], [twice]) == [1.0]


def test_rubric_config_errors_name_the_field():
    def error(criteria):
        with pytest.raises(ConfigError) as e:
            load_config(JudgeConfig, base={"components": [{"judge": "rubric", "criteria": criteria}]})
        return str(e.value)

    assert "states no condition" in error([{"name": "empty"}])
    assert "invalid regular expression '(unclosed'" in error([{"name": "bad", "any": ["(unclosed"]}])
    assert "criterion names must be distinct; repeated: a" in error([{"name": "a", "words": [1, 2]},
                                                                      {"name": "a", "words": [1, 3]}])
    assert "words must be [min, max]" in error([{"name": "w", "words": [5, 2]}])
    assert "max_repetition" in error([{"name": "r", "max_repetition": 1.5}])


def test_gold_labeler_composes_rubric_and_toxicity():
    """The demo's gold labeler: rubric share passed (0..1) minus the toxicity probability. The rude
    reply fails five of the six criteria; it passes only no_repeats (it says nothing twice): 1/6."""
    judge = load_judge(GOLD)
    good = ("I'm sorry your kettle from order #41234 arrived cracked. I will send a replacement today "
            "and email you a return label.")
    rude = "Not my problem, you should have checked it yourself, idiot"
    (g, r) = judge.score_detailed([PROMPT, PROMPT], [good, rude])
    assert g.components["rubric"] == 1.0 and g.total > 0.9
    assert r.components["rubric"] == pytest.approx(1 / 6)
    assert r.total == pytest.approx(1 / 6 - r.components["toxicity"]) and r.components["toxicity"] > 0.5
