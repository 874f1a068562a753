"""Program-aided answering (PAL, Gao et al. 2022): the model writes Python, the sandbox computes, the model answers.

The loop, top to bottom, in `run_pal`:

1. Ask the model for a program with the few-shot prompt in `prompts/pal_few_shot.yaml`: reasoning
   steps as comments, computations as code, the result stored in `answer`.
2. Extract the code from the reply (`extract_code`) and run it in the sandbox (an OS boundary: the
   code is untrusted).
3. If that failed (no code, syntax error, exception, time or memory limit, or no `answer`), feed
   the error back to the model and ask again, at most `max_retries` more times; if every attempt
   failed, say so (`PalResult.error`; the command exits non-zero).
4. Give the question and the computed result to the model, which writes the final answer sentence.

The result is the program's `answer` variable and nothing else. A program that never sets it has
failed, even if it printed something or assigned other variables: guessing which of its values was
meant (the last one assigned, the last line printed) turned wrong programs into confident wrong
answers, and kept the retry from ever running.

With `constrained` (local models only), the program is decoded under `program_pattern(question)`:
one `name = <number>` line for every quantity of the question, in its order, then at most one
comment line and `answer = ...`. The model cannot then write prose, call functions, forget
`answer`, or leave out or invent a quantity of the question in the bindings (free programs on the
word-problem set did all of these); what it can still get wrong is the arithmetic that combines
the names (`answer = eggs * per_box` for "84 eggs in boxes of 6").
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignkit.apps.agents.backends import ChatBackend
from alignkit.apps.agents.cot import PROMPTS_DIR, few_shot_messages, load_prompt_file
from alignkit.apps.agents.sandbox import SandboxResult, run_code
from alignkit.errors import AlignkitError
from alignkit.models.constrained import regex_grammar

PAL_FILE: Path = PROMPTS_DIR / "pal_few_shot.yaml"
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _is_program(tree: ast.Module) -> bool:
    # A lone word or number parses as Python too; a program assigns, calls, imports or loops.
    return any(not (isinstance(s, ast.Expr) and isinstance(s.value, (ast.Name, ast.Constant)))
               for s in tree.body)


def _parses(code: str) -> ast.Module | None:
    try:
        return ast.parse(code)
    except SyntaxError:
        return None


def extract_code(reply: str) -> str | None:
    """The Python program in a model's reply, or None when there is none.

    Fenced blocks (```python, ```py or a bare ```) win: the first one labelled python, else the
    first one; an unclosed fence (the reply was cut off) runs to the end. Without fences, prose
    lines before and after the code are trimmed until what is left parses as a program. A fenced
    block is returned even if it does not parse, so that the syntax error can be reported back.
    """
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(reply)]
    blocks = [(lang, body.strip("\n")) for lang, body in blocks if body.strip()]
    if blocks:
        labelled = [body for lang, body in blocks if lang in ("python", "py", "python3")]
        return (labelled or [body for _, body in blocks])[0]
    lines = reply.strip().splitlines()
    # Longest span first, so that code with a comment or blank line inside is kept whole.
    for length in range(len(lines), 0, -1):
        for start in range(len(lines) - length + 1):
            candidate = "\n".join(lines[start:start + length]).strip()
            tree = _parses(candidate)
            if candidate and tree is not None and _is_program(tree):
                return candidate
    return None


def _assigns_answer(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "answer" and isinstance(n.ctx, ast.Store)
               for n in ast.walk(tree))


@dataclass
class Attempt:
    reply: str
    """The model's whole reply."""
    code: str | None
    """The program extracted from it; None when there was none."""
    sandbox: SandboxResult | None = None
    error_kind: str | None = None
    """None on success, else "no_code", "syntax_error", "runtime_error", "timeout", "limit" or "no_answer"."""
    error: str | None = None
    """A message the model (and a person) can act on."""


@dataclass
class PalResult:
    question: str
    attempts: list[Attempt] = field(default_factory=list)
    code: str | None = None
    """The program that produced the answer (the last attempt's when none did)."""
    sandbox: SandboxResult | None = None
    answer: object = None
    """The computed result: a number, string or JSON value; None when every attempt failed."""
    final_answer: str | None = None
    """The model's answer sentence, written from `answer`; None when every attempt failed."""
    error: str | None = None
    """Why there is no answer, after all attempts; None on success."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}


def _run_attempt(reply: str, timeout_s: float, memory_mb: int) -> Attempt:
    """Extract, check and run the program in `reply`; the Attempt says how it went."""
    code = extract_code(reply)
    attempt = Attempt(reply=reply, code=code)
    if code is None:
        attempt.error_kind = "no_code"
        attempt.error = "the reply contains no Python code; write the program in a ```python block"
        return attempt
    try:
        tree = ast.parse(code)
    except SyntaxError as e:
        attempt.error_kind = "syntax_error"
        attempt.error = f"SyntaxError on line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
        return attempt
    if not _assigns_answer(tree):
        # Not run: whatever it computes, nothing says which value is the answer.
        attempt.error_kind = "no_answer"
        attempt.error = "the program never sets the variable answer; end it with a line answer = ..."
        return attempt
    result = run_code(code, timeout_s=timeout_s, memory_mb=memory_mb)
    attempt.sandbox = result
    if not result.ok:
        attempt.error_kind = {"wall": "timeout", "cpu": "timeout", None: "runtime_error"}.get(result.limit, "limit")
        detail = result.stderr.strip().splitlines()[-1:] if result.limit is None else []
        attempt.error = result.error or (detail[0] if detail else "the program failed")
        if attempt.error_kind == "timeout":
            attempt.error += "; the program must finish within a few seconds"
        return attempt
    if result.result is None:
        attempt.error_kind = "no_answer"
        attempt.error = "the program ran but left answer set to None; store the final result in answer"
    return attempt


NUMBER_WORDS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
                "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "twenty": "20",
                "hundred": "100", "thousand": "1000", "dozen": "12", "half": "0.5", "quarter": "0.25"}
"""Words a question may spell a quantity with; a constrained program may name them as numbers."""

_QUANTITY = re.compile(r"\d[\d,]*(?:\.\d+)?|\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_NAME = r"[a-z][a-z0-9_]{0,30}"
_EXPRESSION = r"[-+*/%(). 0-9a-z_]{1,80}"


def question_numbers(question: str) -> list[str]:
    """The quantities of `question` in order of appearance, as Python literals.

    "Lena buys 4 notebooks at $3 each and 2 pens at $2 each." -> ["4", "3", "2", "2"]; "Three
    friends share 117 stickers" -> ["3", "117"]; thousands separators are dropped ("1,250" -> "1250").
    """
    numbers = []
    for match in _QUANTITY.finditer(question):
        token = match.group().lower()
        numbers.append(NUMBER_WORDS.get(token, token.replace(",", "")))
    return numbers


def program_pattern(question: str) -> str:
    """The programs constrained PAL may write for `question` (a regular expression).

    One line per quantity of the question, in its order, binding a name the model chooses to that
    number (`eggs = 84`, `per_box = 6`), then at most one comment line and `answer = <arithmetic>`.
    The model cannot drop a number, write prose, call functions or forget `answer`; its decisions
    are the names, the comment and the arithmetic. Tighter variants did worse, although the model
    copies wrong sums from its comments ("# 144/8 = 20" then `answer = 20`): only names in the
    arithmetic and no comment, 1 of the first 12 benchmark problems against 3; only names and a
    comment without digits or "=", 2 of 10 problems written apart from the benchmark against 4.
    A question without numbers gets up to ten free `name = arithmetic` lines instead.
    """
    numbers = question_numbers(question)
    if numbers:
        bindings = "".join(f"{_NAME} = {re.escape(n)}\n" for n in numbers)
    else:
        bindings = f"({_NAME} = {_EXPRESSION}\n){{0,10}}"
    return f"{bindings}(# [^\n]{{1,80}}\n)?answer = {_EXPRESSION}\n?"


def run_pal(backend: ChatBackend, question: str, *, max_retries: int = 2, max_tokens: int = 256,
            temperature: float = 0.0, timeout_s: float = 5.0, memory_mb: int = 256,
            constrained: bool = False, answer_sentence: bool = True) -> PalResult:
    """Answer `question` by having the model write a program that the sandbox runs (see the module docstring).

    Failures of the model's program become error messages fed back to the model, at most
    `max_retries` times; a sandbox that cannot start (SandboxUnavailable) is raised, not retried.
    `constrained` decodes the program under `program_pattern(question)` (local models only); without
    `answer_sentence` the model is not asked to phrase the computed result.
    """
    from alignkit.apps.agents.backends import LocalBackend

    prompt = load_prompt_file(PAL_FILE, ("system", "user", "examples", "retry", "answer_system", "answer_user"))
    messages = few_shot_messages(prompt, question, "code", fence="python")
    grammar = None
    if constrained:
        if not isinstance(backend, LocalBackend):
            raise AlignkitError("constrained PAL needs a local model; a served model gets the plain prompt")
        grammar = regex_grammar(program_pattern(question))
    out = PalResult(question=question)
    for _ in range(1 + max_retries):
        if grammar is not None:
            reply = backend.chat(messages, max_tokens=max_tokens, temperature=temperature, grammar=grammar)
        else:
            reply = backend.chat(messages, max_tokens=max_tokens, temperature=temperature)
        attempt = _run_attempt(reply, timeout_s, memory_mb)
        out.attempts.append(attempt)
        out.code, out.sandbox = attempt.code, attempt.sandbox
        if attempt.error is None:
            out.answer = attempt.sandbox.result
            break
        messages = messages + [{"role": "assistant", "content": reply},
                               {"role": "user", "content": prompt["retry"].format(error=attempt.error)}]
    else:
        tries = len(out.attempts)
        out.error = f"no answer after {tries} attempt{'s' if tries > 1 else ''}: {out.attempts[-1].error}"
        return out
    if not answer_sentence:
        return out
    answer_messages = [
        {"role": "system", "content": prompt["answer_system"]},
        {"role": "user", "content": prompt["answer_user"].format(question=question, code=out.code,
                                                                 result=out.answer)}]
    out.final_answer = backend.chat(answer_messages, max_tokens=max_tokens, temperature=temperature).strip()
    return out
