"""Judges that score (prompt, completion) pairs, and their composition into one score.

A judge maps a batch of prompts and completions to one float per completion:

  toxicity    alt-profanity-check's probability that the completion is offensive, 0..1
  sentiment   VADER's compound polarity of the completion, -1 (negative) .. +1 (positive), not rescaled
  reward      a trained reward model (a ScalarHeadModel directory) on the chat-rendered prompt + completion
  classifier  a local Hugging Face text classifier: the softmax probability of one label, chosen by name
  llm         a language model asked a principle from prompts/judge_principles.yaml, read from its
              log-likelihoods rather than its generated text: the expected 1..5 rating of one
              completion, or (pairwise) the probability that one completion is better than another,
              as in Constitutional AI (Bai et al. 2022)

A JudgeConfig, loaded from YAML, composes judges into one score: total = sum of weight * score over
named components, optionally mapped to named categories by thresholds. One component with weight -1
is a scalar judge (reward = -toxicity); `categories` makes it categorical (safe/borderline/toxic);
several components make it multi-objective, and every result keeps the per-component scores.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Protocol, Sequence

import torch
import yaml
from pydantic import Field, field_validator, model_validator

from alignkit.config import Strict, load_config
from alignkit.errors import ConfigError, ModelLoadError
from alignkit.models import ScalarHeadModel, load_model, render_prompt, resolve_device
from alignkit.models.heads import HEAD_FILE

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
PRINCIPLES_FILE = PROMPTS_DIR / "judge_principles.yaml"
LLM_JUDGE_FILE = PROMPTS_DIR / "llm_judge.yaml"


class Judge(Protocol):
    """Anything that scores completions: one float per (prompt, completion), higher means more of
    whatever the judge measures (more toxic, more positive, more rewarded)."""

    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


def _check_batch(prompts: Sequence[str], completions: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(completions, str):
        raise TypeError("prompts and completions must be lists of strings")
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")


def right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding leaves every real token at its unpadded position, whatever the position encoding.
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class ToxicityJudge:
    """Probability (0..1) that the completion is offensive, from alt-profanity-check's linear model.

    Only the completion is read: a rude prompt must not make a polite reply look toxic.
    """

    name = "toxicity"

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_batch(prompts, completions)
        if not completions:
            return []
        from profanity_check import predict_prob

        return [float(p) for p in predict_prob(list(completions))]


class SentimentJudge:
    """VADER's compound sentiment of the completion, in -1 (negative) .. +1 (positive).

    Kept on VADER's own scale; a weight in the composition rescales it where needed.
    """

    name = "sentiment"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_batch(prompts, completions)
        return [float(self.analyzer.polarity_scores(c)["compound"]) for c in completions]


class RewardModelJudge:
    """The scalar of a trained reward model (ScalarHeadModel) at the last token of prompt + completion.

    Sequences are encoded as in reward-model training (data.prefs.encode_response: chat-rendered
    prompt, completion, EOS), which is also how a policy's rollouts look.
    """

    name = "reward"

    def __init__(self, model: ScalarHeadModel, tokenizer, batch_size: int = 8, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def load(cls, path: Path | str, *, device: str = "auto", batch_size: int = 8,
             max_length: int = 512) -> RewardModelJudge:
        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise ModelLoadError(f"reward model '{path}': no {HEAD_FILE} there, so it is not "
                                 "a reward model saved by alignkit")
        model, tokenizer = ScalarHeadModel.from_pretrained(path, device=device)
        return cls(model, tokenizer, batch_size, max_length)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_batch(prompts, completions)
        return self.model.score_texts(self.tokenizer, list(prompts), list(completions),
                                      batch_size=self.batch_size, max_length=self.max_length)


class ClassifierJudge:
    """Softmax probability of one named label of a Hugging Face sequence classifier.

    A classifier with a single output (a reward model in the Hugging Face format) gives its raw
    logit instead, and needs no label. With `with_prompt` the prompt and completion are fed as a
    text pair, as cross-encoder reward models expect; otherwise the completion is read alone.
    """

    def __init__(self, model, tokenizer, label: str | None, *, with_prompt: bool = False,
                 batch_size: int = 16, max_length: int = 512, source: str = "classifier"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.with_prompt, self.batch_size, self.max_length = with_prompt, batch_size, max_length
        id2label = {int(i): name for i, name in model.config.id2label.items()}
        if model.config.num_labels == 1:
            self.label_id = None
            self.name = label or id2label.get(0, "score")
        else:
            by_name = {name: i for i, name in id2label.items()}
            if label not in by_name:
                choices = ", ".join(repr(name) for name in by_name)
                given = "no label was given" if label is None else f"it has no label {label!r}"
                raise ConfigError(f"classifier '{source}': {given}; choose one of: {choices}")
            self.label_id = by_name[label]
            self.name = label

    @classmethod
    def load(cls, path: Path | str, label: str | None, *, device: str = "auto", with_prompt: bool = False,
             batch_size: int = 16, max_length: int = 512) -> ClassifierJudge:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"classifier '{path}': no config.json, so not a Hugging Face model directory")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # transformers raises many kinds of errors on a bad directory
            raise ModelLoadError(f"classifier '{path}': cannot load: {e}") from None
        model.to(resolve_device(device))
        return cls(model, tokenizer, label, with_prompt=with_prompt, batch_size=batch_size,
                   max_length=max_length, source=str(path))

    @torch.inference_mode()
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        _check_batch(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            texts = list(completions[start:start + self.batch_size])
            pair = (list(prompts[start:start + self.batch_size]), texts) if self.with_prompt else (texts,)
            enc = self.tokenizer(*pair, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()  # (B, num_labels)
            if self.label_id is None:
                scores.extend(logits[:, 0].cpu().tolist())
            else:
                scores.extend(torch.softmax(logits, dim=-1)[:, self.label_id].cpu().tolist())
        return scores


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
        ids, mask = right_pad([c + o for c, o in chunk], _pad_id(tokenizer), device)
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
        _check_batch(prompts, completions)
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
        _check_batch(prompts, first)
        _check_batch(prompts, second)
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


# ---- composition ------------------------------------------------------------------------------


@dataclass
class Component:
    """One named, weighted judge of a composition."""

    name: str
    judge: Judge | LLMPairwiseJudge
    weight: float = 1.0


@dataclass
class Scored:
    """A completion's composed score."""

    total: float
    """sum of weight * component score."""
    components: dict[str, float]
    """Each component's own score, before weighting, by component name."""
    category: str | None = None
    """The category of `total` when the composition has categories."""


class ComposedJudge:
    """Judges combined into one score: total = sum of weight * score, optionally categorised.

    A pairwise LLM component scores a completion by its win rate against the other completions of
    the same prompt, so it needs groups (`score_groups`); the other judges score completions alone.
    """

    def __init__(self, components: list[Component], categories: Categories | None = None):
        if not components:
            raise ValueError("a composed judge needs at least one component")
        self.components, self.categories = components, categories
        self.name = "+".join(f"{c.name}*{c.weight}" for c in components)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return [s.total for s in self.score_detailed(prompts, completions)]

    def score_detailed(self, prompts: Sequence[str], completions: Sequence[str]) -> list[Scored]:
        _check_batch(prompts, completions)
        pairwise = [c.name for c in self.components if isinstance(c.judge, LLMPairwiseJudge)]
        if pairwise:
            raise ConfigError(f"component(s) {', '.join(pairwise)} compare completions with each other: "
                              "score groups of completions per prompt (score_groups) instead")
        raw = {c.name: c.judge.score(prompts, completions) for c in self.components}
        return [self._combine({name: scores[k] for name, scores in raw.items()}) for k in range(len(completions))]

    def score_groups(self, prompts: Sequence[str], groups: Sequence[Sequence[str]]) -> list[list[Scored]]:
        """Scores for every completion of every prompt, grouped as given."""
        if len(prompts) != len(groups):
            raise ValueError(f"{len(prompts)} prompts but {len(groups)} groups of completions")
        flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
        flat = [c for group in groups for c in group]
        raw = {}
        for c in self.components:
            if isinstance(c.judge, LLMPairwiseJudge):
                raw[c.name] = [w for row in win_rates(c.judge, prompts, groups) for w in row]
            else:
                raw[c.name] = c.judge.score(flat_prompts, flat)
        scored = [self._combine({name: scores[k] for name, scores in raw.items()}) for k in range(len(flat))]
        out, start = [], 0
        for group in groups:
            out.append(scored[start:start + len(group)])
            start += len(group)
        return out

    def _combine(self, components: dict[str, float]) -> Scored:
        total = sum(c.weight * components[c.name] for c in self.components)
        category = self.categories.label(total) if self.categories is not None else None
        return Scored(total, components, category)


# ---- configuration ----------------------------------------------------------------------------


class ComponentBase(Strict):
    name: str | None = None
    """Component name in results and in the labeler string; default the judge's name."""
    weight: float = 1.0
    """Multiplies this component's score in the total; negative to penalise (e.g. -2.0 on toxicity)."""

    @model_validator(mode="after")
    def _default_name(self):
        if self.name is None:
            self.name = self.judge
        return self


class ToxicityComponent(ComponentBase):
    judge: Literal["toxicity"]
    """Probability the completion is offensive, 0..1 (alt-profanity-check)."""

    def build(self, device: str) -> Judge:
        return ToxicityJudge()


class SentimentComponent(ComponentBase):
    judge: Literal["sentiment"]
    """VADER compound sentiment of the completion, -1..1."""

    def build(self, device: str) -> Judge:
        return SentimentJudge()


class RewardComponent(ComponentBase):
    judge: Literal["reward"]
    """A trained reward model's scalar on prompt + completion."""
    path: Path
    """Reward model directory (ScalarHeadModel format), relative to the working directory."""
    batch_size: int = Field(8, ge=1)
    """Sequences per forward pass."""
    max_length: int = Field(512, ge=8)
    """Tokens per sequence, as in reward-model training; longer ones lose tokens from the left."""

    def build(self, device: str) -> Judge:
        return RewardModelJudge.load(self.path, device=device, batch_size=self.batch_size,
                                     max_length=self.max_length)


class ClassifierComponent(ComponentBase):
    judge: Literal["classifier"]
    """A Hugging Face sequence classifier's probability of one label."""
    path: Path
    """Classifier directory (AutoModelForSequenceClassification), relative to the working directory."""
    label: str | None = None
    """Label to score, by name from the model's id2label; not needed for a single-output model."""
    with_prompt: bool = False
    """Feed (prompt, completion) as a text pair instead of the completion alone."""
    batch_size: int = Field(16, ge=1)
    """Texts per forward pass."""
    max_length: int = Field(512, ge=8)
    """Tokens per text; longer texts are cut."""

    def build(self, device: str) -> Judge:
        return ClassifierJudge.load(self.path, self.label, device=device, with_prompt=self.with_prompt,
                                    batch_size=self.batch_size, max_length=self.max_length)


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


ComponentConfig = Annotated[
    ToxicityComponent | SentimentComponent | RewardComponent | ClassifierComponent | LLMComponent,
    Field(discriminator="judge"),
]


class Categories(Strict):
    labels: list[str] = Field(min_length=2)
    """Category names from the lowest total to the highest, e.g. [safe, borderline, toxic]."""
    thresholds: list[float]
    """Strictly increasing boundaries, one fewer than labels; a total equal to a threshold goes up."""

    @model_validator(mode="after")
    def _check(self):
        if len(self.thresholds) != len(self.labels) - 1:
            raise ValueError(f"{len(self.labels)} labels need {len(self.labels) - 1} thresholds, "
                             f"got {len(self.thresholds)}")
        if any(b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError(f"thresholds must be strictly increasing, got {self.thresholds}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self

    def label(self, score: float) -> str:
        return self.labels[bisect.bisect_right(self.thresholds, score)]


class JudgeConfig(Strict):
    components: list[ComponentConfig] = Field(min_length=1)
    """Named, weighted judges; the total is sum of weight * score."""
    categories: Categories | None = None
    """Optional mapping of the total to named categories by thresholds."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device for model-based judges; 'auto' uses CUDA when present."""

    @field_validator("components")
    @classmethod
    def _unique_names(cls, components):
        names = [c.name for c in components]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"component names must be distinct; repeated: {', '.join(repeated)} "
                             "(give each component a name)")
        return components


def build_judge(config: JudgeConfig) -> ComposedJudge:
    """Load every component's judge (models included) and compose them."""
    components = [Component(c.name, c.build(config.device), c.weight) for c in config.components]
    return ComposedJudge(components, config.categories)


def load_judge(path: Path | None = None, overrides: list[str] | None = None,
               base: dict | None = None) -> ComposedJudge:
    """A composed judge from a YAML file (or a dict) plus key=value overrides; ConfigError names the field."""
    return build_judge(load_config(JudgeConfig, path, overrides, base))
