"""Critique and revise (Bai et al. 2022, Constitutional AI, section 3): the supervised stage.

    alignkit cai revise --input redteam.jsonl --out-dir revise/ --rounds 2

For every red-team prompt, starting from the model's response, each round samples one principle and
asks the model, in one conversation,

    Human: <prompt>                      Assistant: <current response>
    Human: Critique request: <critique_request of the principle>      Assistant: <critique>
    Human: Revision request: <revision_request of the principle>      Assistant: <revision>

and the revision becomes the next round's response. Every step goes into the trace (trace.jsonl);
the SFT dataset (sft.jsonl) pairs each prompt with its final revision, the format `alignkit train
sft` reads. Fine-tuning on it gives the SL-CAI model.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence

from tqdm.auto import tqdm

from alignkit.cai.constitution import Principle, sample_principle
from alignkit.cai.templates import load_template, strip_prefixes

Chat = Callable[[list[list[dict]]], list[str]]
"""Conversations (lists of {"role", "content"} ending with a user turn) -> the assistant's next reply to each."""


def model_chat(model, tokenizer, *, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
               batch_size: int = 8) -> Chat:
    """A Chat backed by a causal LM through the chat template (models.generate)."""
    from alignkit.models import generate

    calls = [0]

    def chat(conversations: list[list[dict]]) -> list[str]:
        calls[0] += 1  # each call samples with its own seed, so rounds do not repeat one another's noise
        return generate(model, tokenizer, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed + calls[0], batch_size=batch_size).texts

    return chat


def critique_revise(prompts: Sequence[str], responses: Sequence[str], principles: list[Principle], chat: Chat, *,
                    rounds: int = 1, seed: int = 0, templates: dict | None = None,
                    progress: bool = True) -> list[dict]:
    """Run `rounds` of critique -> revision for every prompt, all prompts batched per step.

    Returns one trace per prompt: prompt, initial response, one record per round (principle,
    requests, critique, revision) and the final response. A revision that comes back empty keeps
    the previous response (marked `kept_previous`), so the final response is never empty when the
    initial one was not.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not principles:
        raise ValueError("no principles selected")
    t = templates or load_template("critique_revise", ("critique", "revision", "strip_prefixes"))
    rng = random.Random(seed)
    traces = [{"prompt": p, "initial_response": r, "rounds": [], "final": r} for p, r in zip(prompts, responses)]
    bar = tqdm(total=rounds * 2, desc="critique/revise", unit="step", disable=not progress)
    for _ in range(rounds):
        chosen = [sample_principle(principles, rng) for _ in traces]
        critique_turns = [t["critique"].format(critique_request=p.critique_request) for p in chosen]
        revision_turns = [t["revision"].format(revision_request=p.revision_request) for p in chosen]
        base = [[{"role": "user", "content": tr["prompt"]}, {"role": "assistant", "content": tr["final"]}]
                for tr in traces]
        convs = [b + [{"role": "user", "content": c}] for b, c in zip(base, critique_turns)]
        critiques = [c.strip() for c in chat(convs)]
        bar.update(1)
        convs = [c + [{"role": "assistant", "content": k}, {"role": "user", "content": r}]
                 for c, k, r in zip(convs, critiques, revision_turns)]
        revisions = [strip_prefixes(r, t["strip_prefixes"]) for r in chat(convs)]
        bar.update(1)
        for tr, p, ct, k, rt, rev in zip(traces, chosen, critique_turns, critiques, revision_turns, revisions):
            tr["rounds"].append({"principle": p.key, "critique_request": ct, "critique": k,
                                 "revision_request": rt, "revision": rev, "kept_previous": not rev})
            if rev:
                tr["final"] = rev
    bar.close()
    return traces


def revise_batches(prompts: Sequence[str], responses: Sequence[str | None], principles: list[Principle], model,
                   tokenizer, *, start: int = 0, rounds: int = 1, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int = 0, batch_size: int = 8) -> Iterator[tuple[int, list[dict]]]:
    """critique_revise over the prompts from `start` on, `batch_size` prompts at a time, yielding
    (prompts done, the batch's traces). A missing (None) response is generated first. Every batch
    draws principles and samples with a seed derived from `seed` and its first prompt's index, so a
    run resumed at a batch boundary writes what an uninterrupted run does."""
    from alignkit.io import batch_seed
    from alignkit.models import generate

    starts = range(start, len(prompts), batch_size)
    for first in tqdm(starts, desc="critique/revise", unit="batch", initial=start // batch_size,
                      total=-(-len(prompts) // batch_size)):
        batch_prompts = list(prompts[first:first + batch_size])
        batch_responses = list(responses[first:first + batch_size])
        own_seed = batch_seed(seed, first)
        missing = [i for i, r in enumerate(batch_responses) if r is None]
        if missing:
            texts = generate(model, tokenizer, [batch_prompts[i] for i in missing], max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=[batch_seed(seed, first + i) for i in missing]).texts
            for i, text in zip(missing, texts):
                batch_responses[i] = text
        chat = model_chat(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, seed=own_seed,
                          batch_size=batch_size)
        yield first + len(batch_prompts), critique_revise(batch_prompts, batch_responses, principles, chat,
                                                          rounds=rounds, seed=own_seed, progress=False)


def sft_records(traces: list[dict]) -> list[dict]:
    """(prompt, final revision) pairs for `alignkit train sft`; a trace with an empty final response is left out."""
    return [{"prompt": tr["prompt"], "completion": tr["final"]} for tr in traces if tr["final"].strip()]
