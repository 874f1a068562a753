"""RLAIF labeling: an AI feedback model picks the better of two responses under a sampled principle.

    alignkit cai label --model runs/cai/sft/final --prompts prompts.jsonl --out pairs.jsonl

The policy (the SL-CAI model) samples two responses per prompt. Two labelers:

  logprob  the multiple-choice question of Bai et al. 2022 (section 4.1): the feedback model reads
           the prompt, the principle and the responses as options (A) and (B), and
               p(A) = exp(lp_A) / (exp(lp_A) + exp(lp_B)),
           lp_X = log p(" (X)" | question, "The answer is:"). With order swap, both orders are asked
           and p(first better) = (p_A(first, second) + 1 - p_A(second, first)) / 2, which cancels a
           preference for one letter whatever the content.
  judge    a composed judge (YAML) scores both responses; p(first better) = sigmoid(s_first - s_second).

Each pair is written as {"prompt", "chosen", "rejected", "p_chosen", "principle", "labeler"} and,
with margin "log_odds", "margin" = log(p_chosen / (1 - p_chosen)) for the reward recipe's
Bradley-Terry loss with margin. p_chosen >= 0.5 is the soft label.
"""

from __future__ import annotations

import math
import random
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm

from alignkit.cai.constitution import Principle, sample_principle
from alignkit.cai.templates import load_template
from alignkit.evaluate.judges import option_logprobs

MAX_LOG_ODDS = 10.0  # p_chosen of 1 - 4.5e-5; keeps a saturated label from becoming an infinite margin


class ABLabeler:
    """p(first response better) from a feedback model's log-likelihoods of " (A)" and " (B)"."""

    def __init__(self, model, tokenizer, template: dict | None = None, *, order_swap: bool = True,
                 batch_size: int = 4):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or load_template("compare", ("template", "answer_prefix", "options"))
        if len(self.template["options"]) != 2:
            raise ValueError("the comparison template needs exactly two options")
        self.order_swap, self.batch_size = order_swap, batch_size

    def prob_a(self, prompts: Sequence[str], principles: Sequence[str], first: Sequence[str],
               second: Sequence[str]) -> torch.Tensor:
        """p(A) with `first` shown as (A), in this order only, shape (N,)."""
        questions = [self.template["template"].format(prompt=p, principle=q, first=a, second=b)
                     for p, q, a, b in zip(prompts, principles, first, second)]
        logp = option_logprobs(self.model, self.tokenizer, questions, self.template["answer_prefix"],
                               self.template["options"], self.batch_size)  # (N, 2)
        return torch.softmax(logp, dim=-1)[:, 0]

    def prefer_first(self, prompts: Sequence[str], principles: Sequence[str], first: Sequence[str],
                     second: Sequence[str]) -> list[float]:
        """p(first better than second); with order swap, the mean over both orders."""
        n = len(prompts)
        if not self.order_swap:
            return self.prob_a(prompts, principles, first, second).tolist()
        p = self.prob_a(list(prompts) * 2, list(principles) * 2, list(first) + list(second),
                        list(second) + list(first))
        return (0.5 * (p[:n] + 1.0 - p[n:])).tolist()


class JudgeLabeler:
    """p(first response better) = sigmoid(score(first) - score(second)) under a composed judge."""

    def __init__(self, judge):
        self.judge = judge

    def prefer_first(self, prompts: Sequence[str], principles: Sequence[str], first: Sequence[str],
                     second: Sequence[str]) -> list[float]:
        scored = self.judge.score_groups(list(prompts), [[a, b] for a, b in zip(first, second)])
        return [1.0 / (1.0 + math.exp(-(a.total - b.total))) for a, b in scored]


def sample_pairs(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 48, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 8) -> tuple[list[tuple[str, str, str]], int]:
    """Two sampled responses per prompt; (prompt, first, second) where they are non-empty and differ,
    plus how many prompts gave no usable pair."""
    from alignkit.models import generate

    flat = [p for p in prompts for _ in range(2)]
    texts: list[str] = []
    for start in tqdm(range(0, len(flat), batch_size), desc="sampling pairs", unit="batch"):
        texts += generate(model, tokenizer, flat[start:start + batch_size], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed + start).texts
    pairs = [(p, texts[2 * i], texts[2 * i + 1]) for i, p in enumerate(prompts)
             if texts[2 * i].strip() and texts[2 * i + 1].strip() and texts[2 * i].strip() != texts[2 * i + 1].strip()]
    return pairs, len(prompts) - len(pairs)


def label_pairs(pairs: list[tuple[str, str, str]], principles: list[Principle], labeler, *, labeler_name: str,
                seed: int = 0, margin: Literal["none", "log_odds"] = "none", chunk: int = 8) -> list[dict]:
    """Preference pairs from the labeler's choices, one principle sampled per pair.

    An exact tie (p = 0.5) gives no pair: there is no preference to learn.
    """
    rng = random.Random(seed)
    chosen_principles = [sample_principle(principles, rng) for _ in pairs]
    probs: list[float] = []
    for start in tqdm(range(0, len(pairs), chunk), desc="labeling", unit="batch"):
        part = pairs[start:start + chunk]
        probs += labeler.prefer_first([p for p, _, _ in part], [q.text for q in chosen_principles[start:start + chunk]],
                                      [a for _, a, _ in part], [b for _, _, b in part])
    records = []
    for (prompt, a, b), principle, p in zip(pairs, chosen_principles, probs):
        if p == 0.5:
            continue
        chosen, rejected, p_chosen = (a, b, p) if p > 0.5 else (b, a, 1.0 - p)
        rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "p_chosen": p_chosen,
               "principle": principle.key, "labeler": labeler_name}
        if margin == "log_odds":
            rec["margin"] = round(min(math.log(p_chosen / max(1.0 - p_chosen, 1e-12)), MAX_LOG_ODDS), 6)
        records.append(rec)
    return records
