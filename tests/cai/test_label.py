"""RLAIF labeling: the A/B log-likelihood labeler recovers a preference planted in a tiny model,
the order swap cancels a planted letter bias, and soft labels become pairs the reward recipe reads."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from alignkit.cai.constitution import select_principles
from alignkit.cai.label import ABLabeler, label_pairs
from alignkit.data.prefs import validate
from alignkit.evaluate.judges import right_pad
from alignkit.io import write_jsonl
from alignkit.models.generation import render_prompt

MARK = "@@@@@@"  # byte-level tokens the tiny vocabulary keeps apart from every word
# A user-written multiple-choice template that shows the first response only: asking both orders,
# the labeler still compares the two (p(first better) = (p_A(x) + 1 - p_A(y)) / 2).
TEMPLATE = {"template": "Human: {prompt}\nReply: {first}\n{principle}", "answer_prefix": "Answer:",
            "options": [" (A)", " (B)"]}
TRAIN_TEXTS = ["Returns are free within 30 days.", "Your order ships tomorrow.", "Refunds take two days.",
               "Use the Track package button.", "We accept cards and PayPal.", "Stop bothering me.",
               "Ugh, whatever.", "Not my problem."]
HELD_OUT_TEXTS = ["Gift wrap costs three dollars.", "The jacket is back next week.", "Figure it out.",
                  "Go away.", "Thank you for waiting."]
PROMPTS = ["Can I return shoes?", "Where is my order?", "When is my refund?", "How can I pay?"]


@pytest.fixture(scope="module")
def planted(tiny):
    """A copy of the tiny model trained for 60 steps to answer (A) when the reply holds MARK, else (B).

    Only the letter token is trained (the context ends with ' ('): the rest of the option is shared.
    The question carries a random shipped principle, so the preference holds whichever is sampled.
    """
    principles = [p.text for p in select_principles("human_rights,platform_terms,dialogue_rules")]
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    torch.manual_seed(0)
    rng = random.Random(0)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    open_paren = tok(" (", add_special_tokens=False)["input_ids"]
    letters = {True: tok("A", add_special_tokens=False)["input_ids"], False: tok("B", add_special_tokens=False)["input_ids"]}
    for _ in range(60):
        rows = []
        for _ in range(8):
            marked = rng.random() < 0.5
            reply = (f"{MARK} " if marked else "") + rng.choice(TRAIN_TEXTS)
            question = TEMPLATE["template"].format(prompt=rng.choice(PROMPTS), first=reply,
                                                  principle=rng.choice(principles))
            ctx = tok(render_prompt(tok, question) + TEMPLATE["answer_prefix"], add_special_tokens=False)["input_ids"]
            rows.append((ctx + open_paren, letters[marked]))
        ids, mask = right_pad([c + t for c, t in rows], tok.pad_token_id, "cpu")
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        loss = -torch.stack([logp[i, len(c) - 1, t[0]] for i, (c, t) in enumerate(rows)]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), tok


def held_out_pairs():
    """(prompt, marked reply, plain reply) over replies never seen in training, marked one first or second."""
    out = []
    for i, (a, b) in enumerate((a, b) for a in HELD_OUT_TEXTS for b in HELD_OUT_TEXTS if a != b):
        marked, plain = f"{MARK} {a}", b
        out.append(("Do you wrap gifts?", marked, plain) if i % 2 else ("Do you wrap gifts?", plain, marked))
    return out


def test_planted_preference_is_recovered(planted):
    model, tok = planted
    labeler = ABLabeler(model, tok, TEMPLATE, order_swap=True)
    pairs = held_out_pairs()
    records = label_pairs(pairs, select_principles("dialogue_rules"), labeler, labeler_name="ab", seed=0)
    assert len(records) == len(pairs) == 20
    assert all(r["chosen"].startswith(MARK) and not r["rejected"].startswith(MARK) for r in records)
    assert all(r["p_chosen"] > 0.5 for r in records)
    assert {r["principle"].split(":")[0] for r in records} == {"dialogue_rules"}


def test_order_swap_cancels_a_letter_bias(planted):
    """A +8 bias on the LM head's 'A' logit makes one order alone answer (A) for either response;
    averaging both orders cancels it: p(x over y) + p(y over x) = 1 and the planted choice returns."""
    model, tok = planted
    letter_a = tok("A", add_special_tokens=False)["input_ids"][0]
    bias = torch.zeros(model.config.vocab_size)
    bias[letter_a] = 8.0
    handle = model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        pairs = held_out_pairs()
        prompts, first, second = ([p[k] for p in pairs] for k in range(3))
        principles = ["Good?"] * len(pairs)
        one_order = ABLabeler(model, tok, TEMPLATE, order_swap=False)
        assert min(one_order.prefer_first(prompts, principles, first, second)) > 0.5
        assert min(one_order.prefer_first(prompts, principles, second, first)) > 0.5  # the letter wins both ways
        swapped = ABLabeler(model, tok, TEMPLATE, order_swap=True)
        forward = swapped.prefer_first(prompts, principles, first, second)
        backward = swapped.prefer_first(prompts, principles, second, first)
        assert forward == pytest.approx([1 - b for b in backward], abs=1e-6)
        assert all((p > 0.5) == f.startswith(MARK) for p, f in zip(forward, first))
    finally:
        handle.remove()


class FixedProbabilityLabelerDouble:
    """Test double: p(first better) read from a table keyed by the first response."""

    def __init__(self, table):
        self.table = table

    def prefer_first(self, prompts, principles, first, second):
        return [self.table[f] for f in first]


def test_soft_labels_become_pairs_the_reward_recipe_reads(tmp_path, tiny):
    """p = 0.8 keeps the first: p_chosen 0.8, margin log(0.8 / 0.2) = log 4 = 1.386294.
    p = 0.3 keeps the second: p_chosen 0.7, margin log(0.7 / 0.3) = 0.847298. p = 0.5 is a tie: no pair."""
    from alignkit.recipes.reward import encode_pairs

    labeler = FixedProbabilityLabelerDouble({"x1": 0.8, "x2": 0.3, "x3": 0.5})
    pairs = [("p1", "x1", "y1"), ("p2", "x2", "y2"), ("p3", "x3", "y3")]
    records = label_pairs(pairs, select_principles("human_rights"), labeler, labeler_name="double",
                          margin="log_odds")
    assert [(r["chosen"], r["rejected"], r["p_chosen"]) for r in records] == [("x1", "y1", 0.8), ("y2", "x2", 0.7)]
    assert records[0]["margin"] == pytest.approx(math.log(4), abs=1e-6)
    assert records[1]["margin"] == pytest.approx(0.847298, abs=1e-6)
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, records)
    fmt, valid, problems = validate(path)
    assert (fmt, len(valid), problems) == ("pairs", 2, [])
    encoded = encode_pairs(tiny[1], [r for _, r in valid], 64, use_margin=True)
    assert [e["margin"] for e in encoded] == pytest.approx([math.log(4), 0.847298], abs=1e-6)
