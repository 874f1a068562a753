"""Side-by-side evaluation of models on held-out prompts (`alignkit eval`): proxy reward, exact KL to
the reference, toxicity, sentiment, length, distinct-2, per-reply repetition, relevance to the
prompt (MiniLM cosine), and an independent (gold) judge's mean score and win rate against the first
model with a bootstrap 95% interval."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from alignkit.evaluate.judges import RelevanceJudge, SentimentJudge, ToxicityJudge
from alignkit.evaluate.monitors import distinct_n, mean_repetition
from alignkit.evaluate.kl import generate_with_kl
from alignkit.models import load_model
from alignkit.models.generation import Generation, left_pad, tail_mask


@dataclass
class ModelReport:
    name: str
    spec: str
    completions: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    judge_scores: list[float] | None = None
    """The judge's score of each completion, when a judge was given."""


@torch.no_grad()
def kl_to_base(model, prompt_ids: list[list[int]], tokens: list[list[int]], pad_id: int,
               batch_size: int = 8) -> float | None:
    """Mean over responses of sum_t KL(pi(.|y_<t) || ref(.|y_<t)), the exact per-token KL over the
    whole vocabulary at each response position (so it is >= 0 even on greedy completions, where a
    sampled-token estimate would be biased); ref = the same model with its adapter disabled.
    None for a model without an adapter. Batched (rows sorted by length), since each position holds
    two vocabulary-wide distributions."""
    if not hasattr(model, "disable_adapter"):
        return None
    per_response = []
    # Rows of similar length share a batch, so little of each forward pass is padding.
    order = sorted(range(len(tokens)), key=lambda j: (len(prompt_ids[j]) + len(tokens[j]), len(tokens[j])))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        toks = [tokens[j] or [pad_id] for j in rows]
        seqs = [prompt_ids[j] + t for j, t in zip(rows, toks)]
        ids, mask = left_pad(seqs, pad_id, next(model.parameters()).device)
        keep = max(map(len, toks))  # left padding: every response ends in the last column
        resp = tail_mask(torch.tensor([len(t) for t in toks], device=ids.device), keep)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)

        def logprobs():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1)
            return torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # (B, keep, V)

        logp = logprobs()
        with model.disable_adapter():
            ref = logprobs()
        kl = (logp.exp() * (logp - ref)).sum(dim=-1)  # (B, keep)
        per_response += (kl * resp).sum(dim=1).tolist()
    return sum(per_response) / len(per_response)


def win_outcomes(mine: list[float], base: list[float], tie_margin: float = 0.0) -> list[float]:
    """Per prompt: 1 when `mine` scores above the base by more than `tie_margin`, 0 when below by
    more, 0.5 otherwise (a tie)."""
    return [1.0 if a - b > tie_margin else 0.0 if b - a > tie_margin else 0.5 for a, b in zip(mine, base)]


def bootstrap_interval(values: list[float], n_boot: int = 2000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the values (prompts) with replacement
    `n_boot` times and take the (1-level)/2 and (1+level)/2 quantiles of the resampled means."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(n_boot))
    lo, hi = (1 - level) / 2, (1 + level) / 2
    return means[int(lo * (n_boot - 1))], means[int(round(hi * (n_boot - 1)))]


def evaluate_models(models: dict[str, str], prompts: list[str], *, reward=None, judge=None,
                    max_new_tokens: int = 48, device: str = "auto", batch_size: int = 8,
                    relevance: bool = True, tie_margin: float = 0.0, cache=None) -> list[ModelReport]:
    """Generate greedily with every model on the same prompts and score the completions.

    `reward` and `judge` are (prompts, completions) -> scores callables (a reward model or a judge);
    the win rate of each model is against the first model, by the judge (ties, judge scores within
    `tie_margin`, count one half), with a bootstrap 95% interval over prompts. `relevance` adds the
    MiniLM prompt/reply cosine.
    `cache` (a completion_cache.CompletionCache over the same models and prompts) keeps the
    completions batch by batch, so a killed run continues and a rerun generates nothing again.
    """
    toxicity, sentiment = ToxicityJudge(), SentimentJudge()
    relevance_judge = RelevanceJudge() if relevance else None
    reports = []
    for name, spec in models.items():
        model, tok = load_model(spec, device=device)
        if cache is not None:
            gen, kls = cache.generate(name, model, tok), cache.kls(name)
        else:
            parts = [generate_with_kl(model, tok, prompts[i:i + batch_size], max_new_tokens=max_new_tokens)
                     for i in tqdm(range(0, len(prompts), batch_size), desc=f"eval {name}", unit="batch")]
            gen = Generation(**{f: [x for g, _ in parts for x in getattr(g, f)]
                                for f in ("prompt_ids", "tokens", "texts", "finished")})
            kls = None if parts[0][1] is None else [k for _, ks in parts for k in ks]
        if kls is None:  # no KL recorded with the replies (an older cache): the two-pass computation
            kl = kl_to_base(model, gen.prompt_ids, gen.tokens, tok.pad_token_id)
        else:
            kl = sum(kls) / len(kls)
        tox = toxicity.score(prompts, gen.texts)
        m = {"response_tokens": sum(map(len, gen.tokens)) / len(gen.tokens),
             "distinct_2": round(distinct_n(gen.texts), 4),
             "repetition_mean": round(mean_repetition(gen.texts), 4),
             "toxicity_mean": round(sum(tox) / len(tox), 6),
             "toxicity_share_over_0.5": sum(t > 0.5 for t in tox) / len(tox),
             "sentiment_mean": round(sum(sentiment.score(prompts, gen.texts)) / len(prompts), 6),
             "kl_to_base": kl}
        if relevance_judge is not None:
            m["relevance_mean"] = round(sum(relevance_judge.score(prompts, gen.texts)) / len(prompts), 4)
        if reward is not None:
            m["reward_mean"] = round(sum(reward(prompts, gen.texts)) / len(prompts), 6)
        reports.append(ModelReport(name, spec, gen.texts, m))
        del model
    if judge is not None:
        base = judge(prompts, reports[0].completions)
        for r in reports:
            mine = base if r is reports[0] else judge(prompts, r.completions)
            outcomes = win_outcomes(mine, base, tie_margin)
            r.metrics["judge_mean"] = round(sum(mine) / len(mine), 6)
            r.metrics[f"win_rate_vs_{reports[0].name}"] = round(sum(outcomes) / len(prompts), 4)
            r.metrics["win_rate_ci95_low"], r.metrics["win_rate_ci95_high"] = (
                round(x, 4) for x in bootstrap_interval(outcomes))
            r.judge_scores = mine
    return reports
