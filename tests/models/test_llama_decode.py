"""The written-out Llama decode step (models.llama_decode): bit for bit transformers' decode step in
float32 (logits and the keys and values it caches), its fused bfloat16 weights share memory with the
kept copies and follow a rewritten weight, which models it declines, and that the engine and the
prefix-cached decoder give the same tokens with it and without."""

from __future__ import annotations

import copy

import pytest
import torch

from alignkit.models import attach_lora, llama_decode
from alignkit.models.cpu_linear import fused_low_precision_weight, forget_low_precision, low_precision_weight
from alignkit.models.prefix_cache import PrefixCachedDecoder
from alignkit.models.rollout import RolloutEngine, filled_static_cache


def prefill(model, prompts: list[list[int]], pad: int, extra: int):
    """Left-padded prompts read into a filled static cache by transformers; returns the cache, the
    attention mask (rows, P + extra) and each row's next position."""
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    cache = filled_static_cache(model.config, P + extra)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    attn = torch.zeros((len(prompts), P + extra), dtype=torch.long)
    attn[:, :P] = mask
    return cache, attn, mask.sum(1), P


@pytest.mark.parametrize("padded", [True, False])
def test_decode_steps_equal_transformers_bit_for_bit_in_float32(tiny, padded):
    """Three rows, of different lengths (left padding: the step passes attention a mask) or of one
    prompt (no padding: no mask), four steps each way from the same prefill: the logits and every
    cached key and value are identical."""
    model, tok = tiny
    texts = ["Where is my order?", "Hi", "Can I return shoes?"] if padded else ["Where is my order?"] * 3
    prompts = [tok(t)["input_ids"] for t in texts]
    ours, attn, next_pos, P = prefill(model, prompts, tok.pad_token_id, 4)
    theirs = copy.deepcopy(ours)
    tokens = torch.tensor([5, 17, 42])
    for step in range(4):
        attn[:, P + step] = 1
        mask = attn[:, :P + step + 1].bool()
        with torch.inference_mode():
            expected = model(input_ids=tokens[:, None], attention_mask=mask[:, None, None, :],
                             position_ids=(next_pos + step)[:, None], past_key_values=theirs,
                             use_cache=True).logits[:, -1]
        got = llama_decode.decode_step(model, tokens, next_pos + step, mask, ours, precision="float32")
        assert torch.equal(got, expected)
        tokens = expected.argmax(-1)
    for a, b in zip(ours.layers, theirs.layers):
        assert a.filled == b.filled == P + 4 and int(a.cumulative_length) == int(b.cumulative_length)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_block_of_tokens_equals_transformers_bit_for_bit_in_float32(tiny):
    """One row: a prompt read by transformers, then blocks of 5 and 1 tokens read each way (each token
    attends to the cache and the block's tokens before it): the kept logits and the cache are identical."""
    model, tok = tiny
    prompt = tok("Where is my order? It was due last week.")["input_ids"]
    ours, _, _, P = prefill(model, [prompt], tok.pad_token_id, 6)
    theirs = copy.deepcopy(ours)
    for block, keep in (([5, 17, 42, 8, 9], 3), ([11], 1)):
        filled = theirs.layers[0].filled
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([block]), position_ids=torch.arange(filled, filled + len(block))[None],
                             past_key_values=theirs, use_cache=True, logits_to_keep=keep).logits[0]
        got = llama_decode.read_block(model, torch.tensor(block), ours, keep=keep, precision="float32")
        assert got.shape == (keep, model.config.vocab_size) and torch.equal(got, expected)
    for a, b in zip(ours.layers, theirs.layers):
        assert a.filled == b.filled == P + 6 and int(a.cumulative_length) == int(b.cumulative_length)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_bfloat16_step_is_close_and_its_fused_weights_are_the_kept_copies(tiny):
    model, tok = tiny
    model = copy.deepcopy(model)
    prompts = [tok("Where is my order?")["input_ids"]] * 4
    cache, attn, next_pos, P = prefill(model, prompts, tok.pad_token_id, 1)
    exact_cache = copy.deepcopy(cache)
    attn[:, P] = 1
    mask, tokens = attn.bool(), torch.tensor([5, 6, 7, 8])
    low = llama_decode.decode_step(model, tokens, next_pos, mask, cache, precision="bfloat16")
    exact = llama_decode.decode_step(model, tokens, next_pos, mask, exact_cache, precision="float32")
    assert not torch.equal(low, exact)  # the bfloat16 products did run
    torch.testing.assert_close(low, exact, atol=0.05, rtol=0.05)
    attn0 = model.model.layers[0].self_attn
    fused = fused_low_precision_weight([attn0.q_proj, attn0.k_proj, attn0.v_proj])
    for module in (attn0.q_proj, attn0.k_proj, attn0.v_proj):  # views of the fused weight: no second copy
        kept = low_precision_weight(module)
        assert kept.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
        assert torch.equal(kept, module.weight.to(torch.bfloat16))
    with torch.inference_mode():
        attn0.k_proj.weight.mul_(2.0)  # rewritten in place, as the engine's sync does ...
    forget_low_precision(attn0.k_proj)  # ... which then forgets the module's kept copies
    fused = fused_low_precision_weight([attn0.q_proj, attn0.k_proj, attn0.v_proj])
    rows = attn0.q_proj.out_features
    assert torch.equal(fused[rows:rows + attn0.k_proj.out_features], attn0.k_proj.weight.to(torch.bfloat16))


def test_models_it_does_not_compute_keep_transformers_forward(tiny):
    model, _ = tiny
    assert llama_decode.supports(model)
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: output)
    try:
        assert not llama_decode.supports(model)  # a hook expects its module to be called
    finally:
        handle.remove()
    asked = copy.deepcopy(model)  # transformers hooks a model the first time it is asked for hidden states
    with torch.no_grad():
        asked(input_ids=torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert any(m._forward_hooks for m in asked.modules()) and llama_decode.supports(asked)  # inactive: lean
    scaled = copy.deepcopy(model)
    scaled.model.rotary_emb.attention_scaling = 0.5
    assert not llama_decode.supports(scaled)
    biased = copy.deepcopy(model)
    biased.model.layers[1].self_attn.q_proj.bias = torch.nn.Parameter(torch.zeros(biased.config.hidden_size))
    assert not llama_decode.supports(biased)
    assert not llama_decode.supports(attach_lora(copy.deepcopy(model), r=2, alpha=4, dropout=0.0,
                                                 target_modules=("q_proj",)))  # LoRA layers: the engine merges first


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_engine_gives_the_same_tokens_with_and_without_it(tiny, monkeypatch, precision):
    """Sampled rows with an adapter, rows leaving the batch as they finish: identical tokens and
    log-probs in float32; in bfloat16 the same greedy tokens."""
    model, tok = tiny
    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", precision)
    policy = attach_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    engine = RolloutEngine(policy, tok)
    temperature = 1.0 if precision == "float32" else 0.0
    runs = []
    for lean in (True, False):
        engine.lean_decode = lean
        runs.append(engine.generate(["Where is my order?", "Hi"], n=3, max_new_tokens=12, temperature=temperature,
                                    seed=11, return_logprobs=True))
    assert runs[0].tokens == runs[1].tokens
    if precision == "float32":
        assert all(torch.equal(a, b) for a, b in zip(runs[0].logprobs, runs[1].logprobs))


def test_prefix_cached_decoder_gives_the_same_tokens_with_and_without_it(tiny, monkeypatch):
    model, tok = tiny
    prompt = tok("Where is my order? It was due last week and nothing came.")["input_ids"]
    replies = []
    for lean in (True, False):
        monkeypatch.setattr(RolloutEngine, "lean_decode", lean)
        decoder = PrefixCachedDecoder(model, tok)
        first = decoder.generate(prompt, max_new_tokens=10)
        again = decoder.generate(prompt + first + prompt[:3], max_new_tokens=10)  # most of it from the cache
        replies.append((first, again, decoder.reused_tokens))
    assert replies[0] == replies[1] and replies[0][2] > 0
