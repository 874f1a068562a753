"""generate(): greedy equals argmax, EOS handling, seeding, batch splitting (log-prob parity: test_rollout.py)."""

import torch

from alignkit.models import generate


def test_greedy_matches_argmax_and_batch_of_one(tiny):
    model, tok = tiny
    batch = generate(model, tok, ["Hello there", "Refund please, it broke"], max_new_tokens=8)
    single = generate(model, tok, ["Refund please, it broke"], max_new_tokens=8)
    assert batch.tokens[1] == single.tokens[0]
    ids = torch.tensor([single.prompt_ids[0]])
    with torch.no_grad():
        first = model(input_ids=ids).logits[0, -1].argmax().item()
    assert single.tokens[0][0] == first


def test_seed_repeats_sampling_and_leaves_global_rng(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = generate(model, tok, ["Hi"] * 4, max_new_tokens=10, temperature=1.0, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, ["Hi"] * 4, max_new_tokens=10, temperature=1.0, seed=7)
    c = generate(model, tok, ["Hi"] * 4, max_new_tokens=10, temperature=1.0, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stops_at_eos(tiny):
    """Force EOS from the 4th new token on: completions are 3 tokens + EOS, marked finished."""
    model, tok = tiny
    eos = tok.eos_token_id
    calls = []

    def force_eos(module, inputs, logits):
        calls.append(1)
        if len(calls) >= 4:  # call 1 is the prompt, calls 2.. are one new token each
            logits = logits.clone()
            logits[..., eos] += 1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        out = generate(model, tok, ["Hi", "Hello there"], max_new_tokens=10, temperature=1.0, seed=0)
    finally:
        handle.remove()
    assert out.finished == [True, True]
    for toks, text in zip(out.tokens, out.texts):
        assert len(toks) == 4 and toks[-1] == eos and eos not in toks[:-1]
        assert "<|im_end|>" not in text


def test_batch_size_splits_without_changing_results(tiny):
    model, tok = tiny
    prompts = ["a b c", "Where is it?", "Thanks", "Return"]
    whole = generate(model, tok, prompts, max_new_tokens=6)
    split = generate(model, tok, prompts, max_new_tokens=6, batch_size=1)
    assert whole.tokens == split.tokens
