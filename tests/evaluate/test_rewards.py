"""Rewards named as Python functions: loaded from a file or a module, with clear errors otherwise."""

import pytest

from alignkit.errors import AlignkitError
from alignkit.evaluate.rewards import load_reward


def test_a_python_file_function_is_the_reward(tmp_path):
    (tmp_path / "r.py").write_text("def exclaim(prompts, completions):\n"
                                   "    return [float(c.count('!')) for c in completions]\n")
    fn, name = load_reward(tmp_path / "r.py:exclaim", "cpu")
    assert fn(["a", "b"], ["hi!!", "no"]) == [2.0, 0.0] and name.startswith("python function")


def test_a_module_function_is_the_reward():
    fn, _ = load_reward("alignkit.evaluate.monitors:distinct_n", "cpu")  # any importable callable
    assert fn(["a b c a b"]) == pytest.approx(0.75)  # 3 distinct bigrams of 4


@pytest.mark.parametrize("spec, message", [("missing.py:f", "no file"), ("alignkit.nope:f", "cannot import"),
                                           ("alignkit.evaluate.monitors:nothing", "has no function")])
def test_bad_python_rewards_say_what_is_wrong(spec, message):
    with pytest.raises(AlignkitError, match=message):
        load_reward(spec, "cpu")
