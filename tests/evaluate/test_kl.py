"""KL to the base recorded during eval's generation (evaluate/kl.py) equals the two-pass computation."""

import pytest
import torch

from alignkit.evaluate.compare import kl_to_base
from alignkit.evaluate.kl import CaptureLogSoftmax, generate_with_kl
from alignkit.models import attach_lora, generate, load_model

PROMPTS = ["Where is my order?", "Can I return shoes?", "Hi", "My blender arrived cracked, order #42412."]


def moved_policy(tiny_model_dir):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    policy = attach_lora(base, r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # make the adapter move the policy away from its base
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return policy, tok


def test_kl_from_the_decode_steps_equals_two_teacher_forced_passes(tiny_model_dir):
    policy, tok = moved_policy(tiny_model_dir)
    gen, kls = generate_with_kl(policy, tok, PROMPTS, max_new_tokens=8)
    assert len(kls) == len(PROMPTS) and all(k >= 0 for k in kls) and max(kls) > 1e-3
    per_reply = [kl_to_base(policy, [p], [t], tok.pad_token_id) for p, t in zip(gen.prompt_ids, gen.tokens)]
    assert kls == pytest.approx(per_reply, rel=1e-3, abs=1e-5)
    # the capture changes nothing: the same greedy replies without it
    assert generate(policy, tok, PROMPTS, max_new_tokens=8).tokens == gen.tokens


def test_a_model_without_adapter_has_no_kl(tiny):
    model, tok = tiny
    gen, kls = generate_with_kl(model, tok, PROMPTS[:2], max_new_tokens=4)
    assert kls is None and len(gen.texts) == 2


def test_capture_keeps_each_steps_log_softmax():
    capture = CaptureLogSoftmax()
    scores = torch.tensor([[0.0, 1.0, 2.0]])
    assert capture(torch.zeros(1, 1), scores) is scores
    torch.testing.assert_close(capture.steps[0].exp().sum(dim=-1), torch.ones(1))


def test_a_zero_adapter_has_zero_kl_when_the_engine_decodes_in_bfloat16(tiny_model_dir, monkeypatch):
    """On a CPU where the engine multiplies in bfloat16, the policy's half of the KL comes from a
    float32 pass, so an adapter that changes nothing measures 0 (the decode's rounding is not distance),
    and a moved adapter still measures what two teacher-forced passes do."""
    from alignkit.models import cpu_linear

    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "bfloat16")
    monkeypatch.setattr(cpu_linear, "LOWP_SMALL_MIN_ROWS", cpu_linear.LOWP_MIN_ROWS)  # the tiny model's layers
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    zero = attach_lora(base, r=4, alpha=8, dropout=0.0)  # lora_B starts at zero: the base itself
    gen, kls = generate_with_kl(zero, tok, PROMPTS, max_new_tokens=8)
    assert any(gen.tokens) and max(kls) <= 1e-6
    policy, tok = moved_policy(tiny_model_dir)
    gen, kls = generate_with_kl(policy, tok, PROMPTS, max_new_tokens=8)
    per_reply = [kl_to_base(policy, [p], [t], tok.pad_token_id) for p, t in zip(gen.prompt_ids, gen.tokens)]
    assert max(kls) > 1e-3 and kls == pytest.approx(per_reply, rel=1e-3, abs=1e-5)
