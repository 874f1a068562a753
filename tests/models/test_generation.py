"""Generation helper: log-prob parity with a direct forward pass, EOS handling, seeding."""

import torch

from alignkit.models import generate


def forward_logprobs(model, prompt_ids, new_tokens, temperature):
    """log p(new token t | prefix) from one unpadded forward pass over prompt + completion."""
    ids = torch.tensor([prompt_ids + new_tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(new_tokens))
    return torch.stack([logp[p, t] for p, t in zip(positions, new_tokens)])


def test_logprobs_equal_forward_pass_with_left_padding(tiny):
    model, tok = tiny
    prompts = ["Where is my order?", "Hi", "Can I return a pair of shoes that do not fit me at all?"]
    out = generate(model, tok, prompts, max_new_tokens=12, temperature=0.7, seed=3, return_logprobs=True)
    lengths = {len(p) for p in out.prompt_ids}
    assert len(lengths) == 3  # different lengths, so the batch really was left-padded
    for i in range(3):
        assert len(out.tokens[i]) > 0
        expected = forward_logprobs(model, out.prompt_ids[i], out.tokens[i], 0.7)
        torch.testing.assert_close(out.logprobs[i], expected, atol=2e-5, rtol=1e-4)


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
