"""`alignkit eval --expect`: expectations parsed, checked against numbers and other models, and a
miss (or an unmeasured figure) reported as one."""

import pytest

from alignkit.errors import AlignkitError
from alignkit.evaluate.expect import check, parse

METRICS = {"before": {"toxicity_mean": 0.0099, "toxicity_share_over_0.5": 0.0, "win_rate_vs_before": 0.5,
                      "kl_to_base": None},
           "grpo": {"toxicity_mean": 0.0144, "toxicity_share_over_0.5": 0.0083, "win_rate_vs_before": 0.7708,
                    "kl_to_base": 3.57}}


def verdicts(*texts):
    return [met for _, met, _ in check([parse(t) for t in texts], METRICS)]


def test_numbers_and_other_models():
    assert verdicts("grpo.win_rate_vs_before>=0.70", "grpo.win_rate_vs_before >= 0.8",
                    "grpo.toxicity_mean<=before.toxicity_mean", "grpo.toxicity_mean > before.toxicity_mean",
                    "grpo.kl_to_base<4", "grpo.kl_to_base<3.57", "grpo.win_rate_vs_before>7e-1") == \
        [True, False, False, True, True, False, True]


def test_a_metric_name_with_a_dot_in_it():
    """The model is what comes before the first dot; the metric keeps its own ("over_0.5")."""
    e = parse("grpo.toxicity_share_over_0.5<=before.toxicity_share_over_0.5")
    assert e.left == ("grpo", "toxicity_share_over_0.5") and e.right == ("before", "toxicity_share_over_0.5")
    assert verdicts("grpo.toxicity_share_over_0.5<=before.toxicity_share_over_0.5",
                    "grpo.toxicity_share_over_0.5<=0.01") == [False, True]


def test_an_unmeasured_figure_is_a_miss():
    (_, met, compared), = check([parse("before.kl_to_base<=1")], METRICS)
    assert not met and "not measured" in compared
    (_, met, _), = check([parse("grpo.no_such_metric>=0")], METRICS)
    assert not met


@pytest.mark.parametrize("bad", ["grpo.win_rate>=", "win_rate>=0.7", "grpo.win_rate => 0.7", "grpo.x == 1", ""])
def test_bad_syntax_is_a_clear_error(bad):
    with pytest.raises(AlignkitError, match="MODEL.METRIC OP VALUE"):
        parse(bad)


def test_an_unknown_model_is_an_error_not_a_miss():
    with pytest.raises(AlignkitError, match="no model named 'gpro'"):
        check([parse("gpro.win_rate_vs_before>=0.7")], METRICS)
