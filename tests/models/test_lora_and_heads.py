"""LoRA merge parity (W + (alpha/r) B A), adapter save/load, and the scalar head."""

import pytest
import torch

from alignkit.models import ScalarHeadModel, attach_lora, load_model, merge_lora, save_model


def randomize_lora_b(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter do something
            p.data = torch.randn(p.shape, generator=g) * 0.1


def test_merged_lora_equals_base_plus_ba(tiny_model_dir):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    q0 = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    randomize_lora_b(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    expected = q0 + (8 / 4) * B @ A
    ids = tok(["Where is my order?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merged = merge_lora(model)
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_adapter_save_and_load_round_trip(tiny_model_dir, tmp_path):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(base, r=4, alpha=8, dropout=0.0)
    randomize_lora_b(model, seed=1)
    save_model(model, tok, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # only the adapter is stored
    loaded, _ = load_model(str(tmp_path / "adapter"), device="cpu")
    ids = tok(["Refund please"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        # and the adapter really changes the output
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_scalar_head_scores_last_real_token_with_any_padding(tiny):
    model, tok = tiny
    head_model = ScalarHeadModel(model)
    a = tok("Where is my order?")["input_ids"]
    b = tok("Hi")["input_ids"]
    pad = tok.pad_token_id
    with torch.no_grad():
        alone = [head_model(torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0, -1] for x in (a, b)]
        width = len(a)
        right = torch.tensor([a, b + [pad] * (width - len(b))])
        right_mask = torch.tensor([[1] * len(a), [1] * len(b) + [0] * (width - len(b))])
        left = torch.tensor([a, [pad] * (width - len(b)) + b])
        left_mask = torch.tensor([[1] * len(a), [0] * (width - len(b)) + [1] * len(b)])
        for ids, mask in ((right, right_mask), (left, left_mask)):
            torch.testing.assert_close(head_model.score(ids, mask), torch.stack(alone), atol=1e-5, rtol=1e-4)


def test_score_texts_keeps_the_callers_order_when_it_batches_by_length(tiny):
    """score_texts batches rows of similar length together; each score still lands on its own row:
    equal to scoring that (prompt, completion) alone."""
    model, tok = tiny
    head_model = ScalarHeadModel(model)
    prompts = ["Where is my order?", "Hi", "My kettle arrived cracked, what now?", "Refund please"]
    replies = ["It ships tomorrow, I will send the tracking number.", "Hello.", "Sorry!", "I can help with that."]
    batched = head_model.score_texts(tok, prompts, replies, batch_size=2)
    alone = [head_model.score_texts(tok, [p], [r])[0] for p, r in zip(prompts, replies)]
    assert batched == pytest.approx(alone, abs=1e-4)
    assert len(set(round(x, 4) for x in alone)) == 4  # distinct scores, so a mix-up would show


def test_scalar_head_save_load_round_trip(tiny_model_dir, tmp_path):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    model = ScalarHeadModel(attach_lora(base, r=4, alpha=8, dropout=0.0))
    randomize_lora_b(model.causal_lm, seed=2)
    torch.nn.init.normal_(model.head.weight)
    model.save_pretrained(tmp_path / "rm", tok)
    loaded, _ = ScalarHeadModel.from_pretrained(tmp_path / "rm", device="cpu")
    ids = tok(["Where is my order?", "Hi there friend"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(ids["input_ids"], ids["attention_mask"]),
                                   model.score(ids["input_ids"], ids["attention_mask"]))


@pytest.mark.parametrize("alpha,dropout", [(8, 0.0), (6, 0.2)])  # scale 2 (exact) and 1.5 (rounding)
def test_fused_lora_forward_equals_peft_values_and_gradients(tiny_model_dir, alpha, dropout):
    """lora_linear_forward against PEFT's own LoRA forward: outputs and every adapter gradient, in
    training mode (dropout drawn from the same seed), with all seven projections adapted."""
    from alignkit.models.lora import lora_linear_forward

    base, tok = load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(base, r=4, alpha=alpha, dropout=dropout,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    randomize_lora_b(model)
    layers = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert all(m.forward.func is lora_linear_forward for m in layers)
    ids = tok(["Where is my order?", "Refund please, it broke"], return_tensors="pt", padding=True)
    model.train()

    def run(fused: bool):
        saved = {m: m.__dict__.pop("forward") for m in layers} if not fused else {}
        try:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(3)
            logits = model(**ids).logits
            (logits.square().mean()).backward()
        finally:
            for m, f in saved.items():
                m.forward = f
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return logits.detach(), grads

    (plain, plain_grads), (fused, fused_grads) = run(False), run(True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys() and len(fused_grads) == 2 * len(layers)
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4)
    # and the adapter matters: disabled (PEFT's own path), the output differs
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(**ids).logits, fused, atol=1e-3)


def test_fused_lora_forward_with_a_base_layer_that_returns_a_view(tiny_model_dir):
    """A base layer whose output is a view (it cannot be written in place) still gets the adapter's
    product added, as PEFT adds it; and with the frozen products in bfloat16 (a base output made by a
    patched layer) the fused forward equals PEFT's too."""
    from alignkit.models.cpu_linear import frozen_products_in_bf16
    from alignkit.models.lora import lora_linear_forward

    base, _ = load_model(str(tiny_model_dir), device="cpu")
    model = attach_lora(base, r=4, alpha=6, dropout=0.0, target_modules=["q_proj"])
    randomize_lora_b(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)

    def both():
        want = type(layer).forward(layer, x)  # PEFT's own
        got = lora_linear_forward(layer, x)
        return got, want

    inner = layer.base_layer
    inner.forward = lambda h: torch.nn.functional.linear(h, inner.weight)[..., :]  # a view of the product
    got, want = both()
    assert inner(x.reshape(-1, x.shape[-1]))._base is not None
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    del inner.forward
    assert frozen_products_in_bf16(model) > 0  # the base layer now multiplies in bfloat16
    got, want = both()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, inner(x), atol=1e-3)  # the adapter is in both
