"""LLM judges: a language model asked a principle from prompts/judge_principles.yaml, read from its
log-likelihoods rather than its generated text: the expected 1..5 rating of one completion, or
(pairwise) the probability that one completion is better than another, as in Constitutional AI
(Bai et al. 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import yaml
from pydantic import Field

from alignkit.errors import ConfigError
from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch, pad_id, right_pad
from alignkit.models import load_model, render_prompt

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"
PRINCIPLES_FILE = PROMPTS_DIR / "judge_principles.yaml"
LLM_JUDGE_FILE = PROMPTS_DIR / "llm_judge.yaml"


@dataclass
class ChoicePrompt:
    """A multiple-choice question for an LLM judge, from llm_judge.yaml plus one principle."""

    template: str
    principle: str
    answer_prefix: str
    options: list[str]
    values: list[float] | None = None


def load_choice_prompt(mode: Literal["pairwise", "rating"], principle: str,
                       principles_file: Path | None = None, templates_file: Path | None = None) -> ChoicePrompt:
    """Read the `mode` template and the named principle; errors name the file and the missing key."""
    principles_file = Path(principles_file or PRINCIPLES_FILE)
    templates_file = Path(templates_file or LLM_JUDGE_FILE)
    principles, templates = _read_yaml(principles_file), _read_yaml(templates_file)
    if principle not in principles:
        raise ConfigError(f"{principles_file}: no principle {principle!r}; choose one of: "
                          + ", ".join(repr(k) for k in principles))
    question_key = "compare" if mode == "pairwise" else "rate"
    question = principles[principle].get(question_key) if isinstance(principles[principle], dict) else None
    if not isinstance(question, str):
        raise ConfigError(f"{principles_file}: principle {principle!r} needs a '{question_key}' question")
    section = templates.get(mode)
    needed = ["template", "answer_prefix", "options"] + (["values"] if mode == "rating" else [])
    missing = [k for k in needed if not isinstance(section, dict) or k not in section]
    if missing:
        raise ConfigError(f"{templates_file}: section '{mode}' needs " + ", ".join(f"'{k}'" for k in missing))
    options, values = list(section["options"]), section.get("values")
    if mode == "pairwise" and len(options) != 2:
        raise ConfigError(f"{templates_file}: pairwise.options must be two options, got {len(options)}")
    if mode == "rating" and len(values) != len(options):
        raise ConfigError(f"{templates_file}: rating.values must give one value per option")
    return ChoicePrompt(section["template"], question, section["answer_prefix"], options,
                        [float(v) for v in values] if values is not None else None)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


@torch.inference_mode()
def option_logprobs(model, tokenizer, questions: Sequence[str], answer_prefix: str,
                    options: Sequence[str], batch_size: int = 4) -> torch.Tensor:
    """log p(option | question, answer prefix) for every question and option, shape (N, K), float32.

    Each question is a user turn of the chat template; the assistant's turn starts with
    `answer_prefix` and the option's log-probability is the sum over its tokens. Context and option
    are tokenized apart, so every option follows exactly the same context tokens.
    """
    with_template = tokenizer.chat_template is not None
    contexts = [tokenizer(render_prompt(tokenizer, q) + answer_prefix, add_special_tokens=not with_template)
                ["input_ids"] for q in questions]
    option_ids = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    rows = [(ctx, opt) for ctx in contexts for opt in option_ids]
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = right_pad([c + o for c, o in chunk], pad_id(tokenizer), device)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        for i, (ctx, opt) in enumerate(chunk):
            # logits at position t predict token t + 1: the option's tokens are predicted from ctx[-1] on.
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(opt) - 1, device=device)
            logp = torch.log_softmax(logits[i, positions].float(), dim=-1)  # (len(opt), V)
            target = torch.tensor(opt, device=device)[:, None]
            out.append(logp.gather(1, target).sum())
    return torch.stack(out).view(len(questions), len(options)).cpu()


class LLMRatingJudge:
    """A language model's rating of one completion under a principle: the expected value of the
    rating options (1..5 by default), with probabilities from the options' log-likelihoods
    normalised over the options alone."""

    def __init__(self, model, tokenizer, principle: str = "helpful_harmless", *,
                 principles_file: Path | None = None, templates_file: Path | None = None, batch_size: int = 4):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prompt = load_choice_prompt("rating", principle, principles_file, templates_file)
        self.name = f"llm_rating:{principle}"

    def option_probs(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """p(option) per completion, normalised over the rating options, shape (N, K)."""
        check_batch(prompts, completions)
        questions = [self.prompt.template.format(prompt=p, completion=c, principle=self.prompt.principle)
                     for p, c in zip(prompts, completions)]
        logp = option_logprobs(self.model, self.tokenizer, questions, self.prompt.answer_prefix,
                               self.prompt.options, self.batch_size)
        return torch.softmax(logp, dim=-1)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if not completions:
            return []
        values = torch.tensor(self.prompt.values)
        return (self.option_probs(prompts, completions) @ values).tolist()


class LLMPairwiseJudge:
    """A language model's probability that one completion is better than another under a principle.

    The model sees both completions as options (A) and (B) and the probability comes from the
    log-likelihoods of " (A)" and " (B)" after "The answer is:" (Bai et al. 2022, Constitutional AI,
    section 4.1), normalised over the two options. Small models favour one letter whatever the
    content, so `compare` asks both orders and averages: that cancels the position bias, and
    compare(x, y) + compare(y, x) = 1 exactly.

    Weak judges give weak probabilities: SmolLM2-135M-Instruct prefers a helpful reply to an insult
    with only 0.51-0.54 (with the worked example of llm_judge.yaml; zero-shot it was at chance).
    """

    def __init__(self, model, tokenizer, principle: str = "helpful_harmless", *,
                 principles_file: Path | None = None, templates_file: Path | None = None, batch_size: int = 4):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.prompt = load_choice_prompt("pairwise", principle, principles_file, templates_file)
        self.name = f"llm_pairwise:{principle}"

    def prob_first_option(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
        """P(answer is (A)) with `first` shown as (A) and `second` as (B), in one order only, shape (N,)."""
        check_batch(prompts, first)
        check_batch(prompts, second)
        questions = [self.prompt.template.format(prompt=p, first=a, second=b, principle=self.prompt.principle)
                     for p, a, b in zip(prompts, first, second)]
        logp = option_logprobs(self.model, self.tokenizer, questions, self.prompt.answer_prefix,
                               self.prompt.options, self.batch_size)
        return torch.softmax(logp, dim=-1)[:, 0]

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> list[float]:
        """P(first is better than second) = (P_A(first, second) + P_B(second, first)) / 2."""
        if not prompts:
            return []
        n = len(prompts)
        p_a = self.prob_first_option(list(prompts) * 2, list(first) + list(second), list(second) + list(first))
        return (0.5 * (p_a[:n] + (1.0 - p_a[n:]))).tolist()


def win_rates(judge: LLMPairwiseJudge, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """Each completion's mean probability of beating the other completions of its prompt.

    Every unordered pair is compared once (both orders inside `compare`); p(j beats i) = 1 - p(i beats j).
    A group of one completion has nothing to beat and scores 0.5.
    """
    pairs = [(g, i, j) for g, group in enumerate(groups) for i in range(len(group)) for j in range(i + 1, len(group))]
    probs = judge.compare([prompts[g] for g, _, _ in pairs], [groups[g][i] for g, i, _ in pairs],
                          [groups[g][j] for g, _, j in pairs])
    wins = [[0.0] * len(group) for group in groups]
    for (g, i, j), p in zip(pairs, probs):
        wins[g][i] += p
        wins[g][j] += 1.0 - p
    return [[w / (len(group) - 1) if len(group) > 1 else 0.5 for w in row] for row, group in zip(wins, groups)]


class LLMComponent(ComponentBase):
    judge: Literal["llm"]
    """A language model asked a principle: a 1..5 rating, or pairwise win rates."""
    model: str = "embedded"
    """'embedded', a Hugging Face model directory, an adapter directory or a .gguf file."""
    mode: Literal["pairwise", "rating"] = "pairwise"
    """'pairwise': win rate against the prompt's other completions (better for small models);
    'rating': expected rating of the completion alone."""
    principle: str = "helpful_harmless"
    """Principle name in the principles file."""
    principles_file: Path | None = None
    """YAML of principles; default the packaged prompts/judge_principles.yaml."""
    templates_file: Path | None = None
    """YAML of prompt templates; default the packaged prompts/llm_judge.yaml."""
    batch_size: int = Field(4, ge=1)
    """Sequences per forward pass."""

    def build(self, device: str) -> Judge | LLMPairwiseJudge:
        model, tokenizer = load_model(self.model, device=device)
        cls = LLMPairwiseJudge if self.mode == "pairwise" else LLMRatingJudge
        return cls(model, tokenizer, self.principle, principles_file=self.principles_file,
                   templates_file=self.templates_file, batch_size=self.batch_size)
