"""PAL: code extraction, the retry loop with a scripted model, real sandbox runs, and an embedded-model smoke run."""

from __future__ import annotations

import os
import re

import pytest

from alignkit.apps.agents.pal import extract_code, program_pattern, question_numbers, run_pal
from alignkit.apps.agents.sandbox import check_available


def require_sandbox():
    reason = check_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the sandbox must work in CI: {reason}")
        pytest.skip(f"SANDBOX UNAVAILABLE, PAL code cannot run: {reason}")


class ScriptedBackend:
    """Test double for a model: returns canned replies in order and records the messages it was sent."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def chat(self, messages, *, max_tokens, temperature, stop=None):
        self.calls.append(messages)
        return self.replies.pop(0)


@pytest.mark.parametrize("reply, code", [
    ("```python\nanswer = 17 * 23\n```", "answer = 17 * 23"),
    ("```\nx = 2\nanswer = x + 1\n```", "x = 2\nanswer = x + 1"),
    ("Here is the code:\n```py\nanswer = 1\n```\nThis prints 1.", "answer = 1"),
    ("Sure! Here it is.\n# add\nanswer = 2 + 2\nThat gives four.", "# add\nanswer = 2 + 2"),
    ("```python\nanswer = (1 +\n", "answer = (1 +"),  # unclosed fence: kept, so the error can be reported
    ("I cannot write code for that.", None),
    ("Hello", None),
])
def test_extract_code(reply, code):
    assert extract_code(reply) == code


def test_pal_fenced_code_runs_behind_the_boundary():
    require_sandbox()
    backend = ScriptedBackend(["```python\n# 17 times 23\nanswer = 17 * 23\n```", "17 * 23 is 391."])
    result = run_pal(backend, "What is 17 * 23?")
    assert result.ok and result.answer == 391
    assert result.sandbox.sandboxed and result.final_answer == "17 * 23 is 391."
    assert len(backend.calls) == 2 and "391" in backend.calls[1][-1]["content"]
    assert backend.calls[0][0]["role"] == "system" and backend.calls[0][-1]["content"] == "What is 17 * 23?"


def test_pal_code_really_runs_in_the_box():
    """The answer comes from inside the sandbox: its hostname and uid, not this process's."""
    require_sandbox()
    code = "import os, socket\nanswer = [socket.gethostname(), os.getuid()]"
    result = run_pal(ScriptedBackend([f"Prose first.\n```python\n{code}\n```\nprose after", "done"]), "who?")
    assert result.answer == ["sandbox", os.getuid() if os.getuid() != 0 else 65534]


def test_a_program_that_never_sets_answer_fails_and_is_retried_with_the_reason():
    """No guessing from printed lines or the last variable: the retry runs, and if it also fails, it says so."""
    require_sandbox()
    backend = ScriptedBackend(["```python\ntotal = 6 * 7\nprint(total)\n```", "```python\nanswer = 6 * 7\n```", "42"])
    result = run_pal(backend, "q", max_retries=1)
    assert result.ok and result.answer == 42
    assert [a.error_kind for a in result.attempts] == ["no_answer", None]
    assert "never sets the variable answer" in backend.calls[1][-1]["content"]
    failed = run_pal(ScriptedBackend(["apples = 3\npears = apples * 5", "x = 1\ny = 2"]), "q", max_retries=1)
    assert not failed.ok and failed.answer is None and failed.final_answer is None
    assert failed.error.startswith("no answer after 2 attempts: the program never sets")


def test_pal_retries_after_a_syntax_error_with_the_error_fed_back():
    require_sandbox()
    backend = ScriptedBackend(["```python\nanswer = (17 * 23\n```", "```python\nanswer = 17 * 23\n```", "It is 391."])
    result = run_pal(backend, "What is 17 * 23?", max_retries=1)
    assert result.ok and result.answer == 391
    assert [a.error_kind for a in result.attempts] == ["syntax_error", None]
    assert "SyntaxError on line 1" in result.attempts[0].error
    feedback = backend.calls[1][-1]["content"]
    assert "SyntaxError" in feedback and backend.calls[1][-2] == {"role": "assistant", "content": "```python\nanswer = (17 * 23\n```"}


@pytest.mark.parametrize("reply, kind, message", [
    ("I don't know.", "no_code", "contains no Python code"),
    ("```python\nanswer = 1 / 0\n```", "runtime_error", "ZeroDivisionError"),
    ("```python\nwhile True:\n    pass\nanswer = 1\n```", "timeout", "limit"),
    ("```python\nprint()\n```", "no_answer", "never sets the variable answer"),
    ("```python\nanswer = None\n```", "no_answer", "left answer set to None"),
])
def test_pal_failures_become_clear_messages_and_retries_are_bounded(reply, kind, message):
    require_sandbox()
    backend = ScriptedBackend([reply, reply])
    result = run_pal(backend, "q", max_retries=1, timeout_s=1.0)
    assert not result.ok and result.final_answer is None
    assert [a.error_kind for a in result.attempts] == [kind, kind]
    assert message in result.attempts[0].error and "after 2 attempts" in result.error
    assert len(backend.calls) == 2  # no third call: neither another retry nor the answer sentence


@pytest.mark.parametrize("question, numbers", [
    ("A farmer packs 84 eggs into boxes of 6.", ["84", "6"]),
    ("Lena buys 4 notebooks at $3 each and 2 pens at $2 each.", ["4", "3", "2", "2"]),  # repeats kept
    ("Three friends share 1,250 stickers and a quarter of 7.5 kg.", ["3", "1250", "0.25", "7.5"]),
    ("What is the capital of France?", []),
])
def test_question_numbers_in_order(question, numbers):
    assert question_numbers(question) == numbers


def test_program_pattern_binds_every_number_of_the_question_in_order():
    """Checked with Python's re: the pattern uses only syntax Python and the grammar's Rust regex share."""
    pattern = re.compile(program_pattern("A farmer packs 84 eggs into boxes of 6. How many boxes?"))
    assert pattern.fullmatch("eggs = 84\nper_box = 6\nanswer = eggs / per_box\n")
    assert pattern.fullmatch("eggs = 84\nper_box = 6\n# boxes: eggs shared out\nanswer = eggs / per_box")
    for wrong in ("eggs = 84\nanswer = eggs / 6",                       # a number not bound
                  "per_box = 6\neggs = 84\nanswer = eggs / per_box",   # out of order
                  "eggs = 84\nper_box = 7\nanswer = eggs / per_box",   # a number not in the question
                  "eggs = 84\nper_box = 6\nprint(eggs / per_box)",     # no answer, a call
                  "eggs = 84\nper_box = 6\nThe answer is 14."):
        assert not pattern.fullmatch(wrong), wrong
    free = re.compile(program_pattern("What is the answer?"))
    assert free.fullmatch("x = 2 * 3\nanswer = x + 1") and not free.fullmatch("answer = \"14\"")


def test_constrained_pal_on_a_random_model_binds_the_question_numbers(tiny_model_dir):
    """The tiny model has random weights: the bindings are there because the grammar put them there."""
    require_sandbox()
    from alignkit.apps.agents.backends import LocalBackend

    backend = LocalBackend(str(tiny_model_dir), device="cpu")
    result = run_pal(backend, "Sam saves 8 dollars a week for 15 weeks.", constrained=True, max_retries=0,
                     max_tokens=600, answer_sentence=False)  # room for the longest program the grammar allows
    code = result.attempts[0].reply
    lines = code.splitlines()
    assert re.fullmatch(r"[a-z][a-z0-9_]* = 8", lines[0]) and re.fullmatch(r"[a-z][a-z0-9_]* = 15", lines[1]), code
    assert lines[-1].startswith("answer ="), code  # the random arithmetic may be blanks, stripped


def test_pal_smoke_with_the_embedded_model():
    """SmolLM2-135M answers 381 on its own; with PAL the sandbox computes 391."""
    require_sandbox()
    from alignkit.apps.agents.backends import LocalBackend

    try:
        backend = LocalBackend("embedded", device="cpu")
    except Exception as e:  # the embedded model package may be missing outside `make test`
        pytest.skip(f"embedded model unavailable: {e}")
    result = run_pal(backend, "What is 17 * 23?", max_tokens=96)
    assert result.sandbox is not None and result.sandbox.result == 391, result.to_dict()
    assert result.final_answer


def test_pal_command_json_on_the_embedded_model():
    """`alignkit pal --json` end to end: the program runs in the sandbox and computes 391."""
    import json

    from typer.testing import CliRunner

    from alignkit.cli import app

    require_sandbox()
    result = CliRunner().invoke(app, ["pal", "What is 17 * 23?", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout[result.stdout.index("{"):])
    assert out["sandbox"]["result"] == 391 and "391" in out["final_answer"]
