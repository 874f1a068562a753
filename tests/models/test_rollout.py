"""Rollout engine: parity with transformers' generate, log-probs, sync after an optimizer step,
per-row seeding, n > 1 layout, on_step and logits_processor hooks, and the sampler's distribution."""

import math

import pytest
import torch

from alignkit.models import attach_lora, generate, load_model
from alignkit.models.rollout import RolloutEngine, engine_for
from alignkit.models.sampling import draw, row_seeds, sample, uniforms

PROMPTS = ["Where is my order?", "Hi", "Can I return a pair of shoes that do not fit me at all?"]


def hf_greedy(model, prompt_ids, max_new_tokens, eos):
    """transformers' own greedy generate on one unpadded prompt, cut after EOS."""
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


def forward_logprobs(model, prompt_ids, new_tokens, temperature):
    """log p(new token t | prefix) from one unpadded forward pass over prompt + completion."""
    ids = torch.tensor([prompt_ids + new_tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, dim=-1)
    start = len(prompt_ids) - 1
    return torch.stack([logp[start + i, t] for i, t in enumerate(new_tokens)])


@pytest.fixture()
def lora_policy(tiny_model_dir):
    """A fresh tiny model with LoRA on q/v/o whose B matrices are non-zero (so the adapter matters)."""
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    policy = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return policy.eval(), tok


def test_greedy_equals_transformers_generate(tiny):
    model, tok = tiny
    out = RolloutEngine(model, tok).generate(PROMPTS, max_new_tokens=12)
    assert len({len(p) for p in out.prompt_ids}) == 3  # a left-padded batch
    for ids, toks in zip(out.prompt_ids, out.tokens):
        assert toks == hf_greedy(model, ids, 12, tok.eos_token_id)


def test_greedy_with_lora_equals_peft_generate(lora_policy):
    policy, tok = lora_policy
    engine = RolloutEngine(policy, tok)
    out = engine.generate(PROMPTS, max_new_tokens=12)
    with policy.disable_adapter():
        base_first = [hf_greedy(policy, ids, 12, tok.eos_token_id) for ids in out.prompt_ids]
    merged_first = [hf_greedy(policy, ids, 12, tok.eos_token_id) for ids in out.prompt_ids]
    assert out.tokens == merged_first
    assert out.tokens != base_first  # the adapter changes the output, so the merge was tested
    # The training weights were never merged in place: the LoRA layers still hold the plain base weight.
    assert all(not m.merged for n, m in policy.named_modules() if hasattr(m, "merged") and "lora" not in n)


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_sampled_logprobs_equal_forward_pass_with_left_padding(kind, tiny, lora_policy):
    """Through generate() (plain model: its own tensors; LoRA: the merged copy) on a left-padded batch."""
    model, tok = tiny if kind == "plain" else lora_policy
    out = generate(model, tok, PROMPTS, max_new_tokens=12, temperature=0.7, seed=3, return_logprobs=True)
    assert len({len(p) for p in out.prompt_ids}) == 3  # different lengths, so the batch really was left-padded
    for i in range(3):
        assert len(out.tokens[i]) > 0
        expected = forward_logprobs(model, out.prompt_ids[i], out.tokens[i], 0.7)
        torch.testing.assert_close(out.logprobs[i], expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("alpha,dtype", [(8, torch.float32), (6, torch.float32), (6, torch.bfloat16)])
def test_merged_weight_has_the_bits_of_peft_merge(tiny_model_dir, alpha, dtype):
    """W + scaling * B A (scaling 2 and 1.5), bit for bit what PEFT's own merge writes, whether into a
    new tensor or in place into an existing one, for float32 and bfloat16 weights; W alone with the
    adapter disabled."""
    from alignkit.models.rollout import lora_layers, merged_weight

    model, _ = load_model(str(tiny_model_dir), device="cpu")
    model.to(dtype)
    policy = attach_lora(model, r=4, alpha=alpha, dropout=0.0, target_modules=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        layers = lora_layers(policy)
        assert len(layers) == 3 * policy.config.num_hidden_layers
        for layer in layers.values():
            base = layer.get_base_layer().weight
            peft = base.clone()
            peft += layer.get_delta_weight("default")  # the line of PEFT's merge()
            assert torch.equal(merged_weight(layer), peft)
            out = torch.full_like(base, 7.0)
            assert merged_weight(layer, out=out) is out and torch.equal(out, peft)
            assert not torch.equal(peft, base)  # the adapter moved the weight
        with policy.disable_adapter():
            assert all(torch.equal(merged_weight(m), m.get_base_layer().weight) for m in layers.values())


def test_sync_after_optimizer_step_gives_the_updated_logits(lora_policy):
    policy, tok = lora_policy
    engine = RolloutEngine(policy, tok)
    ids = torch.tensor([tok("Where is my order? I paid last week.")["input_ids"]])
    before = engine.model(input_ids=ids).logits
    policy.train()
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
    policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    policy.eval()
    with torch.no_grad():
        updated = policy(input_ids=ids).logits
    torch.testing.assert_close(engine.model(input_ids=ids).logits, before)  # not synced yet: the old weights
    engine.sync(policy)
    assert (updated - before).abs().max() > 1e-3
    torch.testing.assert_close(engine.model(input_ids=ids).logits, updated, atol=1e-5, rtol=1e-5)


def test_module_generate_resyncs_a_peft_model_after_an_update(lora_policy):
    policy, tok = lora_policy
    generate(policy, tok, PROMPTS[:1], max_new_tokens=8)
    engine = engine_for(policy, tok)  # the cached engine that generate() used
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(-3.0)  # an in-place write, as an optimizer step does
    second = generate(policy, tok, PROMPTS[:1], max_new_tokens=8)
    assert engine_for(policy, tok) is engine
    assert second.tokens[0] == hf_greedy(policy, second.prompt_ids[0], 8, tok.eos_token_id)
    ids = torch.tensor([second.prompt_ids[0]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(input_ids=ids).logits, policy(input_ids=ids).logits)
        with policy.disable_adapter():  # switching the adapter off is seen as well
            off = generate(policy, tok, PROMPTS[:1], max_new_tokens=8).tokens[0]
            assert off == hf_greedy(policy, second.prompt_ids[0], 8, tok.eos_token_id)
            torch.testing.assert_close(engine.model(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_same_seed_same_tokens_and_int_seed_means_per_row_seeds(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok)
    a = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    b = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=7)
    c = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=8)
    d = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=row_seeds(7, 3).tolist())
    assert a.tokens == b.tokens == d.tokens and a.tokens != c.tokens


def test_a_row_does_not_depend_on_the_other_rows(tiny):
    """Sampled with per-row seeds and greedy: the same prompt and seed give the same tokens alone, in
    another batch, at another row index, and split into batches (as 2 processes would split a step)."""
    model, tok = tiny
    engine = RolloutEngine(model, tok)
    seeds = [11, 22, 33]
    full = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=seeds)
    alone = engine.generate(PROMPTS[2:], max_new_tokens=10, temperature=1.0, seed=seeds[2:])
    other = engine.generate(["Thanks a lot", PROMPTS[2]], max_new_tokens=10, temperature=1.0, seed=[5, 33])
    split = engine.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=seeds, batch_size=2)
    assert full.tokens[2] == alone.tokens[0] == other.tokens[1]
    assert split.tokens == full.tokens
    greedy = engine.generate(PROMPTS, max_new_tokens=10)
    assert greedy.tokens[0] == engine.generate(PROMPTS[:1], max_new_tokens=10).tokens[0]


def test_n_completions_are_prompt_major(tiny):
    model, tok = tiny
    out = RolloutEngine(model, tok).generate(PROMPTS[:2], n=3, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(out.tokens) == len(out.prompt_ids) == len(out.texts) == 6
    one = RolloutEngine(model, tok).generate(PROMPTS[:1], max_new_tokens=1)
    assert out.prompt_ids[:3] == [one.prompt_ids[0]] * 3 and out.prompt_ids[3] != one.prompt_ids[0]
    assert len({tuple(t) for t in out.tokens[:3]}) > 1  # different seeds per row
    # The n rows share one prefill; each equals the same prompt generated alone with that row's seed.
    seeds = row_seeds(0, 6).tolist()
    for r in (0, 2, 4):
        alone = RolloutEngine(model, tok).generate([PROMPTS[r // 3]], max_new_tokens=6, temperature=1.0,
                                                   seed=[seeds[r]])
        assert alone.tokens[0] == out.tokens[r]


def test_running_rows_are_unchanged_when_others_stop_and_leave_the_batch(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok)
    prompts, seeds = PROMPTS + ["Thanks"], [1, 2, 3, 4]
    full = engine.generate(prompts, max_new_tokens=8, temperature=1.0, seed=seeds, return_logprobs=True)
    cut = engine.generate(prompts, max_new_tokens=8, temperature=1.0, seed=seeds, return_logprobs=True,
                          on_step=lambda step, tokens, finished: torch.tensor([step == 1, step == 1, False, False]))
    assert cut.tokens[:2] == [full.tokens[0][:2], full.tokens[1][:2]]
    assert cut.tokens[2:] == full.tokens[2:]  # computed after rows 0 and 1 left the cache
    for a, b in zip(cut.logprobs, full.logprobs):
        torch.testing.assert_close(a, b[:len(a)], atol=1e-5, rtol=1e-5)


def test_on_step_stops_rows(tiny):
    model, tok = tiny
    seen = []

    def stop_row0_at_step2(step, tokens, finished):
        seen.append((step, tokens.clone(), finished.clone()))
        return torch.tensor([step == 2, False])

    out = RolloutEngine(model, tok).generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, seed=1,
                                             on_step=stop_row0_at_step2)
    assert len(out.tokens[0]) == 3 and not out.finished[0]
    assert [s[1][0].item() for s in seen[:3]] == out.tokens[0]
    assert all(s[1][0].item() == tok.pad_token_id for s in seen[3:])  # done rows report the pad token
    assert len(out.tokens[1]) == 8 or out.finished[1]


def test_logits_processor_bans_a_token_and_sees_prompt_plus_tokens(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok)
    plain = engine.generate(PROMPTS[:2], max_new_tokens=6)
    banned = plain.tokens[0][0]
    shapes = []

    def ban(input_ids, scores):
        shapes.append(input_ids.clone())
        scores[:, banned] = float("-inf")
        return scores

    out = engine.generate(PROMPTS[:2], max_new_tokens=6, logits_processor=ban)
    assert all(banned not in t for t in out.tokens)
    width = max(len(p) for p in out.prompt_ids)
    assert [s.shape for s in shapes] == [(2, width + i) for i in range(len(shapes))]
    assert shapes[-1][0, width:].tolist() == out.tokens[0][:len(shapes) - 1]
    assert [t for t in shapes[0][1].tolist() if t != tok.pad_token_id] == out.prompt_ids[1]  # prompt, padded


def test_streamer_sees_the_tokens_of_one_row(tiny):
    model, tok = tiny

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    out = RolloutEngine(model, tok).generate(PROMPTS[:1], max_new_tokens=5, streamer=streamer)
    assert streamer.puts[0] == [out.prompt_ids[0]] and streamer.ended
    assert [p[0] for p in streamer.puts[1:]] == out.tokens[0]
    with pytest.raises(ValueError):
        RolloutEngine(model, tok).generate(PROMPTS[:2], max_new_tokens=5, streamer=Collect())


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0  # nothing drawn where the probability is zero
    return (((counts[keep] - expected[keep]) ** 2) / expected[keep]).sum().item()


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7)])
def test_sampler_distribution_matches_softmax(top_k, top_p):
    """20,000 rows draw from logits over 8 tokens at temperature 0.8; the counts must fit the softmax
    (after the same top-k / top-p filtering as transformers) with chi-square below the 0.1% critical
    value (24.32 for 7 degrees of freedom, fewer when tokens are filtered out)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    rows = 20_000
    seeds = row_seeds(123, rows)
    tokens = torch.cat([sample(logits.expand(rows, -1), uniforms(seeds, step), 0.8, top_k, top_p)
                        for step in range(2)])
    probs = torch.softmax(logits / 0.8, dim=0)
    if top_k:
        probs[top_k:] = 0
    if top_p < 1:
        before = probs.cumsum(0) - probs
        probs[before >= top_p] = 0
    probs /= probs.sum()
    counts = torch.bincount(tokens, minlength=8).double()
    assert chi_square(counts, probs.double()) < 24.32


def test_uniforms_are_uniform_and_independent_of_the_batch():
    seeds = row_seeds(5, 50_000)
    u = uniforms(seeds, 3)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    assert torch.equal(uniforms(seeds[100:101], 3), u[100:101])
    assert abs(torch.corrcoef(torch.stack([u, uniforms(seeds, 4)]))[0, 1].item()) < 0.02
    assert not math.isclose(uniforms(seeds[:1], 0).item(), uniforms(seeds[:1], 1).item())


def test_engine_on_embedded_model_matches_transformers_greedy():
    model, tok = load_model("embedded", device="cpu")
    engine = RolloutEngine(model, tok)
    out = engine.generate(["What is the capital of France?", "Name a fruit."], max_new_tokens=8)
    for ids, toks in zip(out.prompt_ids, out.tokens):
        assert toks == hf_greedy(model, ids, 8, tok.eos_token_id)
    assert "Paris" in out.texts[0]


def test_two_level_draw_equals_a_full_inverse_cdf_and_skips_zeros():
    """The block-wise draw picks the same entry as one float64 cumulative sum over the whole
    vocabulary (a vocabulary of 1000: three full blocks and a padded one), bar a few rows whose u falls
    within rounding of an edge between two entries, and never a zero entry."""
    torch.manual_seed(0)
    probs = torch.rand(4000, 1000) ** 8  # peaked, like a softmax
    probs[:, 300:700] = 0.0  # a gap spanning whole blocks and parts of blocks
    probs[:, 999] = 0.0  # the last entry, in the padded block
    u = uniforms(row_seeds(9, 4000), 0)
    cdf = probs.double().cumsum(dim=1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
    got = draw(probs, u)
    differ = (got != expected).nonzero().squeeze(1)  # rounding of the block sums at an entry's edge only
    assert len(differ) <= 4 and ((got[differ] - expected[differ]).abs() == 1).all()
    assert probs.gather(1, got[:, None]).min() > 0
    one_hot = torch.zeros(3, 1000)
    one_hot[0, 0], one_hot[1, 999], one_hot[2, 511] = 1.0, 1.0, 1.0
    assert draw(one_hot, torch.tensor([0.999999, 0.0, 0.5], dtype=torch.float64)).tolist() == [0, 999, 511]


def test_min_new_tokens_bans_eos_but_not_the_logprobs(tiny):
    """A processor that makes EOS certain ends every row at its first token; min_new_tokens=5 holds
    EOS off for exactly five tokens (EOS is then the sixth); the log-probs stay those of the model's
    own softmax (a forward pass), untouched by the ban."""
    model, tok = tiny
    engine = RolloutEngine(model, tok)
    eos = engine.eos[0]

    def force_eos(input_ids, scores):
        scores[:, eos] = 1e4
        return scores

    ended = engine.generate(PROMPTS, max_new_tokens=12, logits_processor=force_eos)
    assert ended.tokens == [[eos]] * len(PROMPTS) and all(ended.finished)
    held = engine.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=3, logits_processor=force_eos,
                           min_new_tokens=5, return_logprobs=True)
    assert all(len(t) == 6 and eos not in t[:5] and t[5] == eos for t in held.tokens) and all(held.finished)
    for ids, toks, lp in zip(held.prompt_ids, held.tokens, held.logprobs):
        assert torch.allclose(lp, forward_logprobs(model, ids, toks, 1.0), atol=1e-4)
