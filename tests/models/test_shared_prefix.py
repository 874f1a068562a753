"""The shared-prefix pass (models.shared_prefix) equals the plain pass over whole rows: outputs and gradients,
for the policy log-probs (GRPO), a scalar head's last-token score (reward model) and DPO's summed
completion log-probs; and it is only used when it saves work."""

import pytest
import torch

from alignkit.models import ScalarHeadModel, load_model
from alignkit.models.generation import left_pad, tail_mask
from alignkit.models.lora import attach_lora
from alignkit.models.shared_prefix import forward_shared, repeat_cache_rows, repeat_rows, split_shared_prefix
from alignkit.online import Rollout, rollout_logprobs, tail_logprobs


@pytest.fixture()
def lora_model(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    torch.manual_seed(0)
    model = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it weight, so it matters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model, tok


def grouped_rows(n_groups=3, per_group=3, seed=0):
    """Prompt-major rows: n_groups prompts of different lengths, each with replies of 1..8 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 200, (5 + 3 * k,), generator=g).tolist() for k in range(n_groups)]
    rows, groups, prompt_len = [], [], []
    for k, p in enumerate(prompts):
        for _ in range(per_group):
            n = int(torch.randint(1, 9, (1,), generator=g))
            rows.append(p + torch.randint(5, 200, (n,), generator=g).tolist())
            groups.append(k)
            prompt_len.append(len(p))
    return rows, groups, prompt_len


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a, b):
    assert a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_split_is_none_when_nothing_is_shared():
    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9]]
    assert split_shared_prefix(rows, [0, 1, 2], [2, 2, 1], 0, "cpu") is None  # every group a single row
    assert split_shared_prefix([[1, 2, 3], [4, 2, 3]], [0, 0], [1, 1], 0, "cpu") is None  # nothing in common


def test_prefix_stops_at_the_first_needed_position_and_at_a_difference():
    rows = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 7], [1, 2, 3, 9, 9, 9, 9]]
    split = split_shared_prefix(rows, [0, 0, 0], [4, 4, 4], 0, "cpu", min_saving=0.0)
    assert split.prefix_len.tolist() == [3]  # the rows part after token 3
    split = split_shared_prefix(rows[:2], [0, 0], [2, 2], 0, "cpu", min_saving=0.0)
    assert split.prefix_len.tolist() == [2]  # position 2's output is needed: it stays in the tails
    assert split.tail_pos[0].tolist() == [2, 3, 4, 5] and split.tail_pos[1].tolist() == [-1, 2, 3, 4]
    assert split.tail_ids[1].tolist() == [0, 3, 4, 7]


def test_policy_logprobs_and_gradients_equal_the_plain_pass(lora_model):
    model, tok = lora_model
    rows, groups, prompt_len = grouped_rows()
    resp = [len(r) - n for r, n in zip(rows, prompt_len)]
    keep = max(resp)
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    valid = tail_mask(torch.tensor(resp), keep)
    plain = tail_logprobs(model, ids, mask, 0.7, keep)
    (plain * valid).sum().backward()
    g_plain = grads(model)
    split = split_shared_prefix(rows, groups, [n - 1 for n in prompt_len], tok.pad_token_id, "cpu")
    assert split is not None and split.prefix_ids.shape[0] == 3 and split.tail_ids.shape[1] == keep + 1
    ro = Rollout(None, ids, mask, keep, valid, torch.tensor(resp), split)
    shared = rollout_logprobs(model, ro, 0.7)
    torch.testing.assert_close(shared * valid, plain * valid, atol=1e-5, rtol=1e-5)
    (shared * valid).sum().backward()
    assert_same_grads(g_plain, grads(model))
    # a minibatch of rows from two groups
    rows_mb = torch.tensor([1, 4, 5])
    with torch.no_grad():
        mb = rollout_logprobs(model, ro, 0.7, rows_mb)
    torch.testing.assert_close(mb * valid[rows_mb], plain.detach()[rows_mb] * valid[rows_mb], atol=1e-5, rtol=1e-5)
    assert ro.split.select(rows_mb).prefix_ids.shape[0] == 2


def test_reference_pass_with_the_adapter_disabled(lora_model):
    model, tok = lora_model
    rows, groups, prompt_len = grouped_rows(seed=1)
    resp = [len(r) - n for r, n in zip(rows, prompt_len)]
    keep = max(resp)
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    valid = tail_mask(torch.tensor(resp), keep)
    split = split_shared_prefix(rows, groups, [n - 1 for n in prompt_len], tok.pad_token_id, "cpu")
    ro = Rollout(None, ids, mask, keep, valid, torch.tensor(resp), split)
    with torch.no_grad(), model.disable_adapter():
        plain = tail_logprobs(model, ids, mask, 1.0, keep)
        shared = rollout_logprobs(model, ro, 1.0)
    with torch.no_grad():
        adapted = rollout_logprobs(model, ro, 1.0)
    torch.testing.assert_close(shared * valid, plain * valid, atol=1e-5, rtol=1e-5)
    assert ((adapted - shared) * valid).abs().max() > 1e-3  # the adapter really was off


def test_scalar_head_score_equals_the_plain_pass(lora_model):
    model, tok = lora_model
    head = ScalarHeadModel(model)
    torch.nn.init.normal_(head.head.weight, std=0.5)
    rows, groups, _ = grouped_rows(n_groups=2, per_group=2, seed=2)
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    plain = head(ids, mask, per_token=False)
    plain.sum().backward()
    g_plain = grads(head)
    split = split_shared_prefix(rows, groups, [len(r) - 1 for r in rows], tok.pad_token_id, "cpu")
    shared = head(None, None, per_token=False, split=split)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    shared.sum().backward()
    assert_same_grads(g_plain, grads(head))
    with pytest.raises(ValueError, match="per_token=False"):
        head(None, None, per_token=True, split=split)


def test_score_texts_groups_replies_to_one_prompt_and_keeps_the_order(tiny):
    model, tok = tiny
    head = ScalarHeadModel(model)
    torch.nn.init.normal_(head.head.weight, std=0.5)
    prompts = ["Where is my order?"] * 3 + ["Can I return shoes?"] * 2 + ["Hi"]
    replies = ["It ships tomorrow.", "Soon.", "Let me check the order for you.", "Yes, within 30 days.", "No.",
               "Hello!"]
    together = head.score_texts(tok, prompts, replies, batch_size=4)
    alone = [head.score_texts(tok, [p], [r])[0] for p, r in zip(prompts, replies)]
    assert together == pytest.approx(alone, abs=1e-5)


def test_dpo_summed_logprobs_equal_the_plain_pass(lora_model):
    from alignkit.models.logprobs import sequence_logprob, shared_sequence_logprob

    model, tok = lora_model
    rows, groups, prompt_len = grouped_rows(n_groups=3, per_group=2, seed=3)
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    width = ids.shape[1]
    starts = torch.tensor([width - len(r) + n for r, n in zip(rows, prompt_len)])
    target = (torch.arange(width)[None, :] >= starts[:, None]).long() * mask
    plain = sequence_logprob(model, ids, mask, target)
    plain.sum().backward()
    g_plain = grads(model)
    split = split_shared_prefix(rows, groups, [n - 1 for n in prompt_len], tok.pad_token_id, "cpu")
    shared = shared_sequence_logprob(model, split, torch.tensor(prompt_len))
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-5)
    shared.sum().backward()
    assert_same_grads(g_plain, grads(model))


def test_forward_shared_returns_the_tail_pass(lora_model):
    model, tok = lora_model
    rows, groups, prompt_len = grouped_rows(n_groups=1, per_group=3, seed=4)
    split = split_shared_prefix(rows, groups, [n - 1 for n in prompt_len], tok.pad_token_id, "cpu")
    out = forward_shared(model, split, logits_to_keep=2)
    assert out.logits.shape[:2] == (3, 2)


def test_repeat_rows_is_indexing_with_a_fixed_order_backward():
    """repeat_rows(x, index) is x[index] bit for bit; its gradient is each source row's summed output
    gradients, the same as indexing's up to rounding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 4, generator=g, requires_grad=True)
    index = torch.tensor([0, 0, 2, 1, 2, 2])
    out = repeat_rows(x, index)
    assert torch.equal(out, x[index])
    upstream = torch.randn(out.shape, generator=g)
    (gx,) = torch.autograd.grad((out * upstream).sum(), x)
    (gi,) = torch.autograd.grad((x[index] * upstream).sum(), x)
    torch.testing.assert_close(gx, gi, atol=1e-6, rtol=1e-6)
    assert torch.equal(gx[1], upstream[3])  # a row read once gets exactly its one gradient


def _prefix_gradients(select, passes=30):
    """Gradients of one prefix cache (the embedded model's shapes: 3 key/value heads of 64, a 44-token
    prompt) read by 32 rows, through `select(cache, index)`, over repeated backward passes."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 3, 44, 64, generator=g, requires_grad=True)
    values = torch.randn(1, 3, 44, 64, generator=g, requires_grad=True)
    upstream = torch.randn(32, 3, 44, 64, generator=g)
    out = []
    for _ in range(passes):
        cache = DynamicCache()
        cache.update(keys, values, 0)
        select(cache, torch.zeros(32, dtype=torch.long))
        layer = cache.layers[0]
        out.append(torch.autograd.grad(((layer.keys + 2 * layer.values) * upstream).sum(), (keys, values)))
    return out


def test_gradients_through_the_repeated_prefix_cache_repeat_bit_for_bit():
    """The prefix cache's gradients are the same in every pass. With transformers' batch_select_indices
    (advanced indexing, whose CPU backward accumulates the 32 rows in a thread-dependent order) they
    differed in the sixth digit from pass to pass, and seeded GRPO runs parted after a few steps."""
    first, *rest = _prefix_gradients(repeat_cache_rows)
    for grads_ in rest:
        assert all(torch.equal(a, b) for a, b in zip(grads_, first))
    torch.testing.assert_close(first[0], _prefix_gradients(lambda c, i: c.batch_select_indices(i), 1)[0][0])



def test_ppo_log_probs_values_and_gradients_equal_the_plain_pass_over_one_shared_head(lora_model):
    """PPO's distinct prompts share only their leading tokens (a chat template's system turn): all rows
    form one group, that head is read once, and the policy's log-probs, the value head's values and
    every gradient equal the plain pass over whole rows."""
    from alignkit.models.heads import scalar_head
    from alignkit.recipes.ppo import PolicyWithValue

    model, tok = lora_model
    g = torch.Generator().manual_seed(3)
    head = torch.randint(5, 200, (12,), generator=g).tolist()
    prompts = [head + torch.randint(5, 200, (2 + k,), generator=g).tolist() for k in range(4)]
    rows = [p + torch.randint(5, 200, (1 + 2 * k,), generator=g).tolist() for k, p in enumerate(prompts)]
    resp = [len(r) - len(p) for r, p in zip(rows, prompts)]
    keep = max(resp)
    ids, mask = left_pad(rows, tok.pad_token_id, "cpu")
    valid = tail_mask(torch.tensor(resp), keep)
    torch.manual_seed(0)
    both = PolicyWithValue(model, scalar_head(model.config.hidden_size))
    torch.nn.init.normal_(both.value_head.weight, std=0.5)
    plain_ro = Rollout(None, ids, mask, keep, valid, torch.tensor(resp))
    split = split_shared_prefix(rows, [0] * 4, [len(p) - 1 for p in prompts], tok.pad_token_id, "cpu")
    assert split is not None and split.prefix_len.tolist() == [12]
    shared_ro = Rollout(None, ids, mask, keep, valid, torch.tensor(resp), split)
    results = []
    for ro in (plain_ro, shared_ro):
        logp, values = both(ro, 0.7)
        ((logp * valid).sum() + (values * valid).sum()).backward()
        results.append((logp.detach() * valid, values.detach() * valid, grads(both)))
    (lp_a, v_a, g_a), (lp_b, v_b, g_b) = results
    torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_b, v_a, atol=1e-5, rtol=1e-5)
    assert any("value_head" in k for k in g_a)
    assert_same_grads(g_a, g_b)
    with torch.no_grad():  # a minibatch of the rows
        lp_mb, v_mb = both(shared_ro, 0.7, torch.tensor([3, 1]))
    torch.testing.assert_close(lp_mb * valid[[3, 1]], lp_a[[3, 1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_mb * valid[[3, 1]], v_a[[3, 1]], atol=1e-5, rtol=1e-5)
