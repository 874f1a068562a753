"""Chain of thought: prompt files, answer extraction rules, and run_cot with a scripted backend."""

from __future__ import annotations

import pytest

from alignkit.apps.agents.cot import cot_messages, extract_answer, run_cot


@pytest.mark.parametrize("text, answer, method", [
    ("5 * 3 = 15. 23 - 15 = 8.\nThe answer is 8.", "8", "answer_is"),
    ("The answer is 2. Wait, recount: the answer is $1,234 apples.", "1234", "answer_is"),
    ("So the final answer is 2.50", "2.5", "answer_is"),
    ("Final answer: -7", "-7", "answer_is"),
    ("**Answer:** Paris.", "Paris", "answer_is"),
    ("The answer is **blue**.", "blue", "answer_is"),
    ("Therefore \\boxed{42} is it", "42", "boxed"),
    ("17 * 23 = 381, so we have 381", "381", "last_number"),
    ("I have no idea.", None, "none"),
    # seen from the embedded model: it answers, then talks about the phrase itself
    ('The answer is 36.\n\nThe line of the form "The answer is X" is a formula.', "36", "answer_is"),
])
def test_extract_answer(text, answer, method):
    got = extract_answer(text)
    assert (got.answer, got.method) == (answer, method)


def test_prompts_are_data_files():
    zero = cot_messages("What is 2 + 2?")
    assert [m["role"] for m in zero] == ["system", "user"]
    assert "Let's think step by step" in zero[-1]["content"] and "What is 2 + 2?" in zero[-1]["content"]
    few = cot_messages("What is 2 + 2?", few_shot=True)
    assert [m["role"] for m in few[1:3]] == ["user", "assistant"] and len(few) >= 5
    assert all("The answer is" in m["content"] for m in few if m["role"] == "assistant")
    assert few[-1] == {"role": "user", "content": "What is 2 + 2?"}


class ScriptedBackend:
    """Test double: returns canned replies in order and records the messages it was sent."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def chat(self, messages, *, max_tokens, temperature, stop=None):
        self.calls.append(messages)
        return self.replies.pop(0)


def test_run_cot_with_scripted_backend():
    backend = ScriptedBackend(["17 * 20 = 340 and 17 * 3 = 51. 340 + 51 = 391. The answer is 391."])
    result = run_cot(backend, "What is 17 * 23?", few_shot=True)
    assert (result.answer, result.method) == ("391", "answer_is")
    assert backend.calls[0][-1]["content"] == "What is 17 * 23?"
    assert result.to_dict()["reasoning"].endswith("391.")
