"""Chain-of-thought prompting: ask for step-by-step reasoning, then extract the final answer from it.

Two templates, both data files in `alignkit/prompts/`: zero-shot (`cot_zero_shot.yaml`, "Let's think
step by step", Kojima et al. 2022) and few-shot (`cot_few_shot.yaml`, worked examples, Wei et al.
2022). Both ask the model to end with "The answer is X."

`extract_answer` reads the answer from the reasoning, trying in order:

1. "answer_is": the last "The answer is X" / "Final answer: X" / "Answer: X" (case-insensitive);
   when some of them state a number and a later one does not (small models go on to talk about
   "the answer is X" as a phrase), the last one with a number wins.
   X runs to the end of its line or sentence; when X contains a number, the answer is that number
   (so "The answer is $1,234 apples." gives "1234"), else X itself without markup.
2. "boxed": the last \\boxed{X}, the LaTeX convention of maths-tuned models.
3. "last_number": the last number anywhere in the text (commas as thousands separators removed).
4. "none": nothing found; the answer is None.

The method used is returned with the answer, so callers can tell a stated answer from a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit.apps.agents.backends import ChatBackend
from alignkit.errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
COT_ZERO_SHOT_FILE = PROMPTS_DIR / "cot_zero_shot.yaml"
COT_FEW_SHOT_FILE = PROMPTS_DIR / "cot_few_shot.yaml"

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"\b(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:|answer\s*:)\s*:?[ \t*]*",
                        re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def load_prompt_file(path: Path, required: tuple[str, ...]) -> dict:
    """Read a prompt YAML file and check that it has the `required` keys."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read prompt file: {e}") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigError(f"{path}: missing key(s) {', '.join(missing)}")
    return data


def few_shot_messages(prompt: dict, question: str, answer_key: str, fence: str | None = None) -> list[dict]:
    """System message, then each example as a user turn and an assistant turn, then the question."""
    messages = [{"role": "system", "content": prompt["system"]}]
    for example in prompt.get("examples", []):
        reply = example[answer_key]
        messages.append({"role": "user", "content": prompt["user"].format(question=example["question"])})
        messages.append({"role": "assistant", "content": f"```{fence}\n{reply}\n```" if fence else reply})
    messages.append({"role": "user", "content": prompt["user"].format(question=question)})
    return messages


def cot_messages(question: str, few_shot: bool = False) -> list[dict]:
    """The chat messages that ask `question` with the zero-shot or the few-shot template."""
    path = COT_FEW_SHOT_FILE if few_shot else COT_ZERO_SHOT_FILE
    return few_shot_messages(load_prompt_file(path, ("system", "user")), question, "answer")


def normalize_number(text: str) -> str:
    """'1,234' -> '1234', '8.0' -> '8', '-0.50' -> '-0.5'."""
    plain = text.replace(",", "")
    if "." in plain:
        plain = plain.rstrip("0").rstrip(".")
    return plain if plain not in ("", "-") else "0"


@dataclass
class ExtractedAnswer:
    answer: str | None
    method: str
    """"answer_is", "boxed", "last_number" or "none": which rule of `extract_answer` found it."""


def _from_phrase(phrase: str) -> str:
    number = re.search(_NUMBER, phrase)
    if number:
        return normalize_number(number.group())
    return phrase.strip().strip("*_`\"'").strip()


def extract_answer(text: str) -> ExtractedAnswer:
    """The final answer stated in a chain of thought; the rules are in the module docstring."""
    stated = [text[m.end():].split("\n", 1)[0] for m in _ANSWER_IS.finditer(text)]
    # The sentence ends at a full stop followed by a space or the end (not the one in "2.5").
    phrases = [re.split(r"\.(?:\s|$)", p.strip(), maxsplit=1)[0].strip().strip("*").strip() for p in stated]
    phrases = [p for p in phrases if p]
    if phrases:
        phrase = ([p for p in phrases if re.search(r"\d", p)] or phrases)[-1]
        return ExtractedAnswer(_from_phrase(phrase.removeprefix("\\boxed{").removesuffix("}")), "answer_is")
    boxed = _BOXED.findall(text)
    if boxed:
        return ExtractedAnswer(_from_phrase(boxed[-1]), "boxed")
    numbers = re.findall(_NUMBER, text)
    if numbers:
        return ExtractedAnswer(normalize_number(numbers[-1]), "last_number")
    return ExtractedAnswer(None, "none")


@dataclass
class CotResult:
    question: str
    few_shot: bool
    reasoning: str
    """The model's full reply."""
    answer: str | None
    method: str
    """How the answer was extracted (see `extract_answer`)."""

    def to_dict(self) -> dict:
        return dict(vars(self))


def run_cot(backend: ChatBackend, question: str, *, few_shot: bool = False, max_tokens: int = 256,
            temperature: float = 0.0) -> CotResult:
    """Ask `question` with a chain-of-thought template and extract the answer from the reply."""
    reply = backend.chat(cot_messages(question, few_shot), max_tokens=max_tokens, temperature=temperature)
    extracted = extract_answer(reply)
    return CotResult(question=question, few_shot=few_shot, reasoning=reply, answer=extracted.answer,
                     method=extracted.method)
