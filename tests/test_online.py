"""What PPO and GRPO share (alignkit.online): row seeds, the tail log-probs of the trainer, the
sampler-trainer gap, phase timings, the probe schedule, the history read back on resume."""

import json
import math

import pytest
import torch

from alignkit.models.generation import Generation, left_pad
from alignkit.online import PhaseTimer, Probe, load_history, row_seeds, sampler_gap, tail_logprobs


def test_row_seeds_depend_on_seed_step_and_row_only():
    a = row_seeds(0, 3, [0, 1, 2, 3])
    assert row_seeds(0, 3, [2, 3]) == a[2:]  # the same rows, whichever process draws them
    assert len(set(a)) == 4 and row_seeds(0, 4, [0]) != a[:1] and row_seeds(1, 3, [0]) != a[:1]


def test_tail_logprobs_equal_a_full_forward(tiny):
    """The last `keep` tokens' log-probs at temperature 0.7 from the LM head on those positions only
    equal log_softmax(logits / 0.7) of a full forward pass, in a left-padded batch."""
    model, _ = tiny
    rows = [[5, 6, 7, 8, 9], [10, 11, 12]]
    ids, mask = left_pad(rows, 0, "cpu")
    keep = 2
    with torch.no_grad():
        got = tail_logprobs(model, ids, mask, 0.7, keep)
        for b, row in enumerate(rows):
            full = model(input_ids=torch.tensor([row])).logits[0].float() / 0.7
            want = torch.log_softmax(full, dim=-1)[:-1].gather(1, torch.tensor(row[1:])[:, None]).squeeze(1)
            torch.testing.assert_close(got[b], want[-keep:], atol=1e-5, rtol=1e-5)


def test_head_on_hidden_states_equals_the_models_own_logits(tiny, monkeypatch):
    """The trainer's LM head on the hidden states (online.HEAD_ON_HIDDEN) gives the log-probs, hidden
    states and gradients of the model's own logits path, with a LoRA adapter, at temperature 0.7 and 1,
    and the model is asked for no logits."""
    from alignkit import online
    from alignkit.models.lora import attach_lora

    import copy

    torch.manual_seed(0)  # a copy: attach_lora changes the model it wraps, and `tiny` is shared
    model = attach_lora(copy.deepcopy(tiny[0]), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18]], 0, "cpu")
    logits_shapes = []
    hook = model.register_forward_hook(lambda m, args, out: logits_shapes.append(tuple(out.logits.shape)))
    results = {}
    for on in (False, True):
        monkeypatch.setattr(online, "HEAD_ON_HIDDEN", on)
        for temperature in (0.7, 1.0):
            logp, hid = tail_logprobs(model, ids, mask, temperature, 3, hidden=True)
            (logp.sum() + hid.sum()).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            results[on, temperature] = (logp.detach(), hid.detach(), grads)
    hook.remove()
    assert logits_shapes[-1][1] == 0 and logits_shapes[0][1] == 4  # no logits asked for, then keep + 1
    for temperature in (0.7, 1.0):
        (lp_a, h_a, g_a), (lp_b, h_b, g_b) = results[False, temperature], results[True, temperature]
        torch.testing.assert_close(lp_b, lp_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h_b, h_a)
        assert g_a and g_a.keys() == g_b.keys()
        for k in g_a:
            torch.testing.assert_close(g_b[k], g_a[k], atol=1e-5, rtol=1e-4)


def test_tail_logprobs_drop_shared_padding_columns(tiny):
    """A minibatch of the two shorter rows of a left-padded batch, still carrying the longest row's
    padding, runs the model on the minibatch's own width and gives the log-probs (at temperature 1)
    and hidden states of those rows padded alone."""
    model, _ = tiny
    rows = [[5, 6, 7, 8, 9, 10, 11, 12], [10, 11, 12], [13, 14, 15, 16]]
    ids, mask = left_pad(rows, 0, "cpu")
    alone_ids, alone_mask = left_pad(rows[1:], 0, "cpu")
    widths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        with torch.no_grad():
            got, hid = tail_logprobs(model, ids[1:], mask[1:], 1.0, 2, hidden=True)
    finally:
        hook.remove()
    assert widths == [4]  # the 8-column batch cut to the minibatch's longest row
    with torch.no_grad():
        want, want_hid = tail_logprobs(model, alone_ids, alone_mask, 1.0, 2, hidden=True)
        full = torch.log_softmax(model(input_ids=torch.tensor([rows[2]])).logits[0].float(), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(hid, want_hid, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], full[-3:-1].gather(1, torch.tensor([15, 16])[:, None]).squeeze(1),
                               atol=1e-5, rtol=1e-5)


def test_sampler_gap_by_hand():
    """Row 0 sampled 2 tokens (log-p -1.0, -2.0), the trainer says (-1.5, -2.0): |diff| 0.5 and 0; row 1
    sampled 1 token (-0.25 vs -0.5): 0.25. Sum 0.75 over 3 tokens; responses sit at the right end."""
    gen = Generation(prompt_ids=[[1], [1]], tokens=[[3, 4], [5]], texts=["", ""], finished=[False, False],
                     logprobs=[torch.tensor([-1.0, -2.0]), torch.tensor([-0.25])])
    trainer = torch.tensor([[-1.5, -2.0], [9.0, -0.5]])  # row 1's first column is padding
    total, count = sampler_gap(gen, trainer).tolist()
    assert total == pytest.approx(0.75) and count == 3


def test_phase_timer_adds_up_each_phase():
    timer = PhaseTimer()
    for _ in range(2):
        with timer("update"):
            sum(range(10000))
    with pytest.raises(RuntimeError):
        with timer("score"):
            raise RuntimeError("a failing phase is still timed")
    rec = timer.record()
    assert set(rec) == {"time_update_s", "time_score_s"} and all(v >= 0 for v in rec.values())
    assert not math.isnan(rec["time_update_s"])


def test_probe_schedule(tmp_path):
    from alignkit.config import ProbeSettings

    f = tmp_path / "p.txt"
    f.write_text("a\nb\nc\nd\ne\n")
    probe = Probe(ProbeSettings(prompts=f, every=3, n=4), max_new_tokens=9, rank=1, world=2)
    assert probe.prompts == ["a", "b", "c", "d"] and probe.mine == ["b", "d"] and probe.max_new_tokens == 9
    assert [s for s in range(8) if probe.due(s, last=s == 7)] == [0, 3, 6, 7]
    assert not Probe(None, 9, 0, 1).due(0, last=True)


def test_history_leaves_out_probe_only_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "probe_proxy": 0.1}, {"step": 1, "score": 0.5, "kl": 0.0}]) + "\n")
    assert load_history(tmp_path, 1) == [{"step": 1, "score": 0.5, "kl": 0.0}]
    assert load_history(tmp_path, 0) == []


def test_sample_groups_repeated_prompts_without_changing_any_row(tiny):
    """Rows of the same prompts in any order (here interleaved, two each) go to the engine as n = 2
    per prompt; each row still gets the tokens of its own seed, in the caller's order."""
    from alignkit.models.rollout import RolloutEngine
    from alignkit.online import sample

    model, tok = tiny
    engine = RolloutEngine(model, tok)
    prompts, seeds = ["Where is my order?", "Hi", "Hi", "Where is my order?"], [11, 12, 13, 14]
    kw = dict(max_new_tokens=6, temperature=1.0, top_p=1.0, tokenizer=tok, device="cpu")
    grouped = sample(engine, model, prompts, seeds, **kw).gen
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone = sample(engine, model, [p], [s], **kw).gen
        assert grouped.tokens[i] == alone.tokens[0] and grouped.prompt_ids[i] == alone.prompt_ids[0]
        torch.testing.assert_close(grouped.logprobs[i], alone.logprobs[0])
    assert grouped.tokens[0] != grouped.tokens[3] or grouped.tokens[1] != grouped.tokens[2]  # seeds matter


def test_batch_stats_log_per_reply_repetition():
    """The step record carries the mean per-reply repetition, so the degeneracy monitor's check can
    fire during PPO/GRPO. "a b c a b c" has word 3-grams abc, bca, cab, abc: 1 of 4 repeats (0.25);
    "fine thanks" has none (0). Mean 0.125. The scorers are a stand-in with no judge (test double)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from alignkit.online import Rollout, batch_stats

    gen = Generation(prompt_ids=[[1], [1]], tokens=[[3, 4], [5]], texts=["a b c a b c", "fine thanks"],
                     finished=[True, False])
    ids, mask = left_pad([[1, 3, 4], [1, 5]], 0, "cpu")
    rollout = Rollout(gen=gen, ids=ids, mask=mask, keep=2, resp_mask=torch.ones(2, 2),
                      lengths=torch.tensor([2, 1]))
    zeros = torch.zeros(2)
    record = batch_stats(Accelerator(cpu=True), rollout, zeros, zeros, zeros, ["p", "q"],
                         SimpleNamespace(judge=None), torch.tensor([0.0, 1.0]))
    assert record["repetition"] == pytest.approx(0.125)
    assert record["eos_rate"] == pytest.approx(0.5) and "judge" not in record


def test_sample_lets_distinct_prompts_share_their_common_head(tiny):
    """Distinct prompts (PPO's rows) that begin alike read that beginning once in the trainer's passes:
    one group over all rows, cut before the shortest prompt's last token."""
    from alignkit.models.rollout import RolloutEngine
    from alignkit.online import sample

    model, tok = tiny
    head = "Please answer the customer politely and briefly and helpfully: "
    prompts = [head + "where is my order?", head + "can I return shoes?", head + "hi"]
    kw = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, tokenizer=tok, device="cpu")
    ro = sample(RolloutEngine(model, tok), model, prompts, [1, 2, 3], **kw)
    assert ro.split is not None and ro.split.prefix_ids.shape[0] == 1
    assert ro.split.row_group.tolist() == [0, 0, 0]
    cut = int(ro.split.prefix_len[0])
    assert 0 < cut <= min(len(p) for p in ro.gen.prompt_ids) - 1
    assert all(p[:cut] == ro.gen.prompt_ids[0][:cut] for p in ro.gen.prompt_ids)
