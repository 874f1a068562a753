"""PrefixCachedDecoder on the tiny model: the scores it decodes from equal a full forward pass over the
whole sequence (no cache), whether the prompt's prefix came from the cache or not, after cutting the
cache back, after the cache grew, and after the weights changed; prompt-lookup drafting gives greedy
decoding's own tokens in fewer passes."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.models import prefix_cache
from alignkit.models.drafting import ReplyHistory, lookup_draft
from alignkit.models.prefix_cache import PrefixCachedDecoder, shared_prefix_length


class Recorder:
    """A logits processor that keeps (input ids, scores) of every step and changes nothing."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids[0].tolist(), scores[0].clone()))
        return scores


def assert_scores_match_full_forward(model, recorder: Recorder, new: list[int]) -> None:
    assert len(recorder.steps) == len(new)
    for (seq, scores), token in zip(recorder.steps, new):
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)
        assert token == int(scores.argmax())  # greedy


@pytest.fixture()
def model_and_tokenizer(tiny):
    model, tokenizer = tiny
    return copy.deepcopy(model), tokenizer  # a private copy: one test changes its weights


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_shared_prefix_length_leaves_the_last_prompt_token_to_run():
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 9]) == 2
    assert shared_prefix_length([1, 2, 3, 4], [1, 2, 3]) == 2  # the whole prompt is cached: its last token still runs
    assert shared_prefix_length([], [1, 2]) == 0
    assert shared_prefix_length([5], [1, 2]) == 0


def test_reused_prefix_gives_the_scores_of_a_full_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = PrefixCachedDecoder(model, tokenizer)
    first_ids = prompt(tokenizer, "The quick brown fox jumps over the lazy dog. user")
    recorder = Recorder()
    first = decoder.generate(first_ids, max_new_tokens=6, logits_processor=recorder)
    assert decoder.reused_tokens == 0
    assert_scores_match_full_forward(model, recorder, first)

    # The next step's prompt: the previous prompt, the reply, then more text (as an agent's next step).
    second_ids = first_ids + first + prompt(tokenizer, " assistant system")
    recorder = Recorder()
    second = decoder.generate(second_ids, max_new_tokens=6, logits_processor=recorder)
    # Everything read before is reused: the prompt and the reply but its last token, never run through the model.
    assert decoder.reused_tokens == len(first_ids) + len(first) - 1
    assert_scores_match_full_forward(model, recorder, second)

    # A prompt that shares only its beginning: the cache is cut back there and written over.
    third_ids = first_ids[:5] + prompt(tokenizer, " system assistant user")
    recorder = Recorder()
    third = decoder.generate(third_ids, max_new_tokens=6, logits_processor=recorder)
    assert decoder.reused_tokens == 5
    assert_scores_match_full_forward(model, recorder, third)


def test_without_reuse_every_prompt_is_read_again_and_decodes_the_same(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    reuse, fresh = PrefixCachedDecoder(model, tokenizer), PrefixCachedDecoder(model, tokenizer, reuse=False)
    ids = prompt(tokenizer, "The quick brown fox jumps over the lazy dog.")
    first = reuse.generate(ids, max_new_tokens=5)
    assert fresh.generate(ids, max_new_tokens=5) == first
    longer = ids + first + prompt(tokenizer, " user")
    assert fresh.generate(longer, max_new_tokens=5) == reuse.generate(longer, max_new_tokens=5)
    assert fresh.reused_tokens == 0 and reuse.reused_tokens >= len(ids)


def test_the_cache_grows_past_its_capacity(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(prefix_cache, "MIN_CAPACITY", 8)
    decoder = PrefixCachedDecoder(model, tokenizer)
    ids = prompt(tokenizer, "The quick brown fox")
    decoder.generate(ids, max_new_tokens=2)
    small = decoder.capacity
    longer = ids + prompt(tokenizer, " jumps over the lazy dog. The quick brown fox jumps over the lazy dog.")
    recorder = Recorder()
    new = decoder.generate(longer, max_new_tokens=4, logits_processor=recorder)
    assert decoder.capacity > small >= 8
    assert_scores_match_full_forward(model, recorder, new)


def test_new_weights_empty_the_cache(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = PrefixCachedDecoder(model, tokenizer)
    ids = prompt(tokenizer, "The quick brown fox jumps over the lazy dog.")
    decoder.generate(ids, max_new_tokens=3)
    with torch.no_grad():  # an optimizer step, as far as the cache can tell
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
    recorder = Recorder()
    new = decoder.generate(ids, max_new_tokens=3, logits_processor=recorder)
    assert decoder.reused_tokens == 0  # keys computed with the old weights are not read
    assert_scores_match_full_forward(model, recorder, new)


def test_sampling_is_repeatable_with_a_seed(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    decoder = PrefixCachedDecoder(model, tokenizer)
    ids = prompt(tokenizer, "The quick brown fox")
    a = decoder.generate(ids, max_new_tokens=8, temperature=1.0, seed=3)
    b = decoder.generate(ids, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_a_grammar_is_obeyed_and_its_forced_tokens_share_one_forward_pass(model_and_tokenizer):
    """Jump-forward decoding: the literal the grammar forces is read with the prompt, in one pass; the
    scores of the drawn tokens still equal a full forward pass over prompt + tokens so far."""
    import re

    from alignkit.models.constrained import lark_grammar

    model, tokenizer = model_and_tokenizer
    decoder = PrefixCachedDecoder(model, tokenizer, draft=0)  # one pass per drawn token (drafting: below)
    grammar = lark_grammar('start: "The quick brown fox jumps over" WORD "." \nWORD: /( [a-z]{1,6}){1,3}/')
    ids = prompt(tokenizer, "user system")
    recorder = Recorder()
    new = decoder.generate(ids, max_new_tokens=40, grammar=grammar, logits_processor=recorder)
    text = tokenizer.decode([t for t in new if t not in decoder.eos])
    assert re.fullmatch(r"The quick brown fox jumps over( [a-z]{1,6}){1,3}\.", text), text
    assert decoder.forward_passes == len(recorder.steps) < len(new)  # forced tokens were never drawn
    forced = len(prompt(tokenizer, "The quick brown fox jumps over")) - 1  # its last token may merge with what follows
    assert decoder.forward_passes <= len(new) - forced
    for seq, scores in recorder.steps:
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)


def test_lookup_draft_continues_the_latest_earlier_occurrence():
    ctx = [5, 1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 1, 2, 3]
    assert lookup_draft(ctx, 3) == [7, 8, 4]  # the last 3 tokens occurred at 6..8 (latest) and 1..3
    assert lookup_draft(ctx, 1) == [7]
    assert lookup_draft([4, 2, 3, 6, 2, 3], 5) == [6, 2, 3]  # no earlier (6, 2, 3): the 2-gram (2, 3) did
    assert lookup_draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup_draft(ctx, 0) == []


def test_reply_history_finds_the_latest_continuation_and_forgets_the_oldest():
    history = ReplyHistory(max_tokens=10)
    history.add([1, 2, 3, 4, 5])
    history.add([9, 2, 3, 7, 8])
    assert history.lookup([2, 3], 2) == [7, 8]  # the latest reply with (2, 3)
    assert history.lookup([1, 2, 3], 4) == [4, 5]
    assert history.lookup([3, 4], 0) == [] and history.lookup([5, 6], 3) == []
    history.add([6, 6, 6])  # 13 tokens: the first reply goes
    assert history.lookup([1, 2, 3], 4) == [] and (1, 2, 3) not in history.index
    assert history.lookup([2, 3], 2) == [7, 8] and history.tokens == 8


def test_lookup_draft_tries_the_context_then_earlier_replies_at_each_length():
    history = ReplyHistory()
    history.add([5, 6, 7, 1, 2, 3, 40, 41])
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3], 2, history=history) == [9, 1]  # the context first
    assert lookup_draft([8, 8, 1, 2, 3], 2, history=history) == [40, 41]  # a 3-gram of a reply before
    assert lookup_draft([2, 3, 0, 2, 3], 2) == [0, 2]
    assert lookup_draft([9, 6, 7], 3, history=history) == [1, 2, 3]  # (9, 6, 7) nowhere: the 2-gram (6, 7)
    assert lookup_draft([9, 9, 9, 5], 3, history=history) == []


REPEATS = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick"


@pytest.mark.parametrize("with_grammar", [False, True])
def test_drafting_gives_greedy_tokens_in_fewer_passes(model_and_tokenizer, with_grammar):
    """The same tokens with drafting as without (under a grammar too), every drawn token's scores equal a
    full forward pass, and on a prompt that repeats itself drafts are kept and passes saved."""
    from alignkit.models.constrained import lark_grammar

    model, tokenizer = model_and_tokenizer
    grammar = lark_grammar('start: /[a-z .]{1,200}/') if with_grammar else None
    ids = prompt(tokenizer, REPEATS)
    plain = PrefixCachedDecoder(model, tokenizer, draft=0)
    drafting = PrefixCachedDecoder(model, tokenizer, draft=8)
    expected = plain.generate(ids, max_new_tokens=30, grammar=grammar)
    recorder = Recorder()
    got = drafting.generate(ids, max_new_tokens=30, grammar=grammar, logits_processor=recorder)
    assert got == expected
    assert drafting.drafted_tokens > 0 and drafting.accepted_tokens > 0
    assert drafting.forward_passes < plain.forward_passes
    for seq, scores in recorder.steps:
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        torch.testing.assert_close(scores, reference, atol=1e-4, rtol=1e-4)
    # The cache holds what was kept, not the rejected drafts: the next step reuses it and decodes the same.
    longer = ids + got + prompt(tokenizer, " user")
    assert drafting.generate(longer, max_new_tokens=10) == PrefixCachedDecoder(model, tokenizer, draft=0).generate(
        longer, max_new_tokens=10)
    assert drafting.reused_tokens == len(ids) + len(got) - 1


def test_a_reply_decoded_before_drafts_the_next_one(model_and_tokenizer):
    """The same prompt answered twice: the second reply, drafted from the first (kept in the decoder's
    history, not in the prompt), is the same greedy reply in far fewer forward passes. A logits
    processor (a test double) steers greedy decoding to 20 distinct tokens, so no draft can come from
    the reply repeating itself."""
    model, tokenizer = model_and_tokenizer
    ids = prompt(tokenizer, "Write the query for order 12.")
    script = [t for t in range(40, 200) if t not in ids][:20]

    def steer(input_ids, scores):
        step = input_ids.shape[1] - len(ids)
        scores = scores.clone()
        scores[:, script[step % len(script)]] += 1e4
        return scores

    decoder = PrefixCachedDecoder(model, tokenizer, draft=8)
    first = decoder.generate(ids, max_new_tokens=20, logits_processor=steer)
    assert first == script and decoder.accepted_tokens == 0 and decoder.forward_passes == 20
    assert decoder.history.tokens == 20
    again = decoder.generate(ids, max_new_tokens=20, logits_processor=steer)
    assert again == first
    assert decoder.accepted_tokens >= 15 and decoder.forward_passes <= 5
    plain = PrefixCachedDecoder(model, tokenizer, draft=0)
    assert plain.generate(ids, max_new_tokens=20, logits_processor=steer) == first
