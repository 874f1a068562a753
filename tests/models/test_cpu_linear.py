"""Rows-first linears: the same product as F.linear, applied only inside the block, and the engine's
greedy tokens unchanged with them on a batch large enough to use them; bfloat16 products (CPUs with
AMX): the rounding they promise and no more, a bfloat16 weight copy that follows in-place writes and
the engine's sync, and the precision each setting resolves to."""

import pytest
import torch
import torch.nn.functional as F

from alignkit.models import cpu_linear
from alignkit.models.cpu_linear import rows_first_linear, rows_first_linears
from alignkit.models.rollout import RolloutEngine

BF16_EPS = 2.0 ** -8  # bfloat16 keeps 8 bits of mantissa: relative rounding up to 2^-8 per operand


@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (16, 24), (4, 5, 24), (600, 24)])
@pytest.mark.parametrize("out_features", [40, 9000])
def test_rows_first_equals_f_linear(shape, out_features):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, out_features)
    x = torch.randn(*shape)
    y = rows_first_linear(layer, x)
    assert y.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # Row-major like F.linear's output: a transposed (W x^T)^T would send the attention that reads the
    # query projection to torch's slow math kernel and make every reduction over the logits strided.
    assert y.is_contiguous()
    with torch.no_grad():
        assert rows_first_linear(layer, x, low_precision=True).is_contiguous()


def test_only_plain_linears_inside_the_block_are_patched():
    class Sub(torch.nn.Linear):
        pass

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = torch.nn.Sequential(torch.nn.Linear(64, 64))
    quantize_(quantized, Int8WeightOnlyConfig())  # a tensor-subclass weight: torch.mm would not run on it
    with rows_first_linears(quantized):
        assert "forward" not in quantized[0].__dict__
        quantized(torch.randn(20, 64))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Sub(4, 4))
    calls = []
    original = cpu_linear.rows_first_linear

    def spy(module, x, **kw):
        calls.append(module)
        return original(module, x, **kw)

    cpu_linear.rows_first_linear = spy
    try:
        with rows_first_linears(model):
            assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
            model(torch.randn(20, 4))
    finally:
        cpu_linear.rows_first_linear = original
    assert calls == [model[0]]
    assert "forward" not in model[0].__dict__  # restored
    cpu_linear.ENABLED = False
    try:
        with rows_first_linears(model):
            assert "forward" not in model[0].__dict__
    finally:
        cpu_linear.ENABLED = True


def test_engine_greedy_on_a_wide_batch_equals_one_row_at_a_time(tiny):
    """20 rows (rows-first in every projection) against each prompt alone (F.linear everywhere)."""
    model, tok = tiny
    prompts = [f"Where is order {i}?" for i in range(20)]
    engine = RolloutEngine(model, tok)
    together = engine.generate(prompts, max_new_tokens=10)
    cpu_linear.ENABLED = False
    try:
        alone = [engine.generate([p], max_new_tokens=10).tokens[0] for p in prompts]
    finally:
        cpu_linear.ENABLED = True
    assert together.tokens == alone


@pytest.mark.parametrize("rows,out_features,low", [(2, 600, False), (4, 600, True), (63, 40, False), (64, 40, True),
                                                   (600, 600, True)])
def test_bfloat16_products_round_the_operands_and_nothing_else(rows, out_features, low):
    """From LOWP_MIN_ROWS rows (LOWP_SMALL_MIN_ROWS under LOWP_SMALL_OUTPUTS outputs): the product of the
    bfloat16-rounded operands, summed in float32 and rounded once more to bfloat16 (a CPU bfloat16 matmul
    writes bfloat16); below that, float32 as before."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, out_features)
    x = torch.randn(rows, 48)
    y = rows_first_linear(layer, x, low_precision=True)
    exact = F.linear(x, layer.weight, layer.bias)
    rounded = F.linear(x.bfloat16().double(), layer.weight.bfloat16().double()).float()
    assert y.dtype == torch.float32 and y.shape == exact.shape
    if low:
        # the rounded operands' product, rounded to bfloat16 (within one unit in the last place: 2^-8
        # relative; the kernels here do not always round to nearest)
        assert ((y - layer.bias) - rounded).abs().le(BF16_EPS * rounded.abs() + 1e-6).all()
        assert (y - exact).abs().max() > 1e-6  # and not the float32 one
        scale = F.linear(x.abs(), layer.weight.abs()).max()
        assert (y - exact).abs().max() <= 3 * BF16_EPS * scale  # two operands and the result rounded
    else:
        torch.testing.assert_close(y, exact, rtol=1e-5, atol=1e-5)


def test_the_kept_bfloat16_weight_follows_writes():
    layer = torch.nn.Linear(16, 600, bias=False)
    first = cpu_linear.low_precision_weight(layer)
    assert cpu_linear.low_precision_weight(layer) is first  # kept, not remade per call
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an in-place write (an optimizer step) moves the version counter
    second = cpu_linear.low_precision_weight(layer)
    assert second is not first
    torch.testing.assert_close(second.float(), (layer.weight.detach()).bfloat16().float())
    with torch.inference_mode():
        frozen = torch.nn.Linear(16, 600, bias=False)  # inference tensors: no version counter
        kept = cpu_linear.low_precision_weight(frozen)
        frozen.weight.mul_(2.0)
        assert cpu_linear.low_precision_weight(frozen) is kept  # unseen: the writer must forget it
        cpu_linear.forget_low_precision(frozen)
        torch.testing.assert_close(cpu_linear.low_precision_weight(frozen).float(),
                                   frozen.weight.bfloat16().float())


def test_decode_precision_settings(monkeypatch):
    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "bfloat16")
    assert cpu_linear.decode_precision() == "bfloat16"
    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "float32")
    assert cpu_linear.decode_precision() == "float32"
    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "auto")
    for amx in (True, False):
        monkeypatch.setattr(cpu_linear, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert cpu_linear.decode_precision() == ("bfloat16" if amx else "float32")
    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "half")
    with pytest.raises(ValueError, match="float32"):
        cpu_linear.decode_precision()


def test_engine_in_bfloat16_sees_the_policy_after_sync(tiny_model_dir, monkeypatch):
    """An optimizer step, then sync: the engine's bfloat16 decoding equals a fresh engine's on the new
    weights (no stale bfloat16 copy), and differs from before the step."""
    from alignkit.models import attach_lora, load_model

    monkeypatch.setenv("ALIGNKIT_DECODE_PRECISION", "bfloat16")
    monkeypatch.setattr(cpu_linear, "LOWP_SMALL_MIN_ROWS", cpu_linear.LOWP_MIN_ROWS)  # the tiny model's layers
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    policy = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj", "o_proj"))
    prompts = [f"Where is order {i}?" for i in range(8)]
    engine = RolloutEngine(policy, tok)
    before = engine.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3, return_logprobs=True)
    assert any("_bf16_weight" in m.__dict__ for m in engine.model.modules())  # the bfloat16 path ran
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=2.0)
    ids = torch.tensor([tok("Where is my order? I paid last week.")["input_ids"]])
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    kept = {n: m.__dict__["_bf16_weight"][1] for n, m in engine.model.named_modules() if "_bf16_weight" in m.__dict__}
    engine.sync(policy)
    after = engine.generate(prompts, max_new_tokens=8, temperature=1.0, seed=3, return_logprobs=True)
    # sync rewrote the kept bfloat16 copies in place (a fused weight's rows with them) rather than
    # dropping them: the same tensors, now holding the new weights
    modules = dict(engine.model.named_modules())
    assert any(n.endswith(("q_proj", "v_proj", "o_proj")) for n in kept)
    for name, copy in kept.items():
        now = modules[name].__dict__["_bf16_weight"][1]
        assert now is copy or (now.data_ptr() == copy.data_ptr() and now.shape == copy.shape), name
        assert torch.equal(now, modules[name].weight.bfloat16()), name
    for m in modules.values():
        if "_bf16_fused" in m.__dict__:  # a fused weight is its modules' bfloat16 weights side by side
            fused, start = m.__dict__["_bf16_fused"][1], 0
            members = [x for x in modules.values() if x.__dict__.get("_bf16_fused") is m.__dict__["_bf16_fused"]]
            assert torch.equal(fused, torch.cat([x.weight.bfloat16() for x in members]))
    fresh = RolloutEngine(policy, tok).generate(prompts, max_new_tokens=8, temperature=1.0, seed=3,
                                                return_logprobs=True)
    assert after.tokens == fresh.tokens
    for a, b in zip(after.logprobs, fresh.logprobs):
        torch.testing.assert_close(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(after.logprobs, before.logprobs))


def test_frozen_products_in_bfloat16_forward_and_input_gradient():
    """A frozen layer's product is the bfloat16-rounded operands' product (forward), and the gradient
    reaching its input is the bfloat16 product of the rounded upstream gradient and weight; a
    trainable layer keeps float32."""
    torch.manual_seed(0)
    frozen, trainable = torch.nn.Linear(24, 40), torch.nn.Linear(24, 40)
    frozen.requires_grad_(False)
    model = torch.nn.Sequential(frozen, trainable)
    assert cpu_linear.frozen_products_in_bf16(model) == 1
    assert cpu_linear.is_frozen_product_patch(frozen) and not cpu_linear.is_frozen_product_patch(trainable)
    x = torch.randn(2, 3, 24, requires_grad=True)
    y = frozen(x)
    w16 = frozen.weight.bfloat16().float()
    rounded = x.detach().bfloat16().float() @ w16.t()
    assert y.shape == (2, 3, 40)
    assert ((y - frozen.bias) - rounded).abs().le(BF16_EPS * rounded.abs() + 1e-6).all()
    assert (y - F.linear(x, frozen.weight, frozen.bias)).abs().max() > 1e-6  # not the float32 product
    g = torch.randn(2, 3, 40)
    y.backward(g)
    expected = g.bfloat16().float() @ w16
    assert (x.grad - expected).abs().le(BF16_EPS * expected.abs() + 1e-5).all()
    x2 = torch.randn(5, 24)
    torch.testing.assert_close(trainable(x2), F.linear(x2, trainable.weight, trainable.bias))


def test_bfloat16_training_dtype_patches_the_frozen_base_only(tiny_model_dir, monkeypatch):
    """`dtype: bfloat16` on a CPU: LoRA's frozen base layers multiply in bfloat16, the adapters do not;
    LoRA gradients stay close to float32's; the rollout engine's copy carries no trainer patch and
    decodes the same tokens as an engine built from the unpatched policy."""
    from alignkit.config import SFTConfig
    from alignkit.training import load_trainable

    def load(dtype):
        cfg = SFTConfig.model_validate({"model": str(tiny_model_dir), "dtype": dtype,
                                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                        "data": {"train": "unused.jsonl"}})
        torch.manual_seed(0)
        return load_trainable(cfg, torch.device("cpu"))

    (fast, tok), (exact, _) = load("bfloat16"), load("float32")
    patched = [n for n, m in fast.named_modules() if cpu_linear.is_frozen_product_patch(m)]
    assert patched and all("lora_" not in n for n in patched) and any("base_layer" in n for n in patched)
    assert not any(cpu_linear.is_frozen_product_patch(m) for m in exact.modules())
    ids = torch.tensor([tok("Where is my order? I paid last week and nothing came.")["input_ids"]])
    grads = []
    for model in (fast, exact):
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape and not torch.equal(grads[0], grads[1])
    assert (grads[0] - grads[1]).norm() <= 0.05 * grads[1].norm()
    engine = RolloutEngine(fast, tok)
    assert not any(cpu_linear.is_frozen_product_patch(m) for m in engine.model.modules())
    prompts = [f"Where is order {i}?" for i in range(3)]
    same = RolloutEngine(exact, tok).generate(prompts, max_new_tokens=6, temperature=0.0)
    assert engine.generate(prompts, max_new_tokens=6, temperature=0.0).tokens == same.tokens


def test_auto_training_dtype_is_bfloat16_only_on_amx_cpus(tiny_model_dir, monkeypatch):
    """`dtype: auto` (the default) on a CPU: the frozen products in bfloat16 where the CPU has AMX,
    float32 elsewhere; ALIGNKIT_TRAIN_PRECISION overrides "auto" only, and a bad value is an error."""
    from alignkit.config import SFTConfig
    from alignkit.errors import AlignkitError
    from alignkit.training import cpu_train_precision, load_trainable

    def patched(dtype="auto"):
        cfg = SFTConfig.model_validate({"model": str(tiny_model_dir), "dtype": dtype,
                                        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                        "data": {"train": "unused.jsonl"}})
        model, _ = load_trainable(cfg, torch.device("cpu"))
        return any(cpu_linear.is_frozen_product_patch(m) for m in model.modules())

    monkeypatch.setenv("ALIGNKIT_TRAIN_PRECISION", "auto")
    for amx in (True, False):
        monkeypatch.setattr(cpu_linear, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert cpu_train_precision("auto") == ("bfloat16" if amx else "float32")
        assert patched() is amx
        assert cpu_train_precision("float32") == "float32" and not patched("float32")
    monkeypatch.setattr(cpu_linear, "cpu_has_amx_bf16", lambda: True)
    monkeypatch.setenv("ALIGNKIT_TRAIN_PRECISION", "float32")
    assert cpu_train_precision("auto") == "float32" and not patched()
    assert cpu_train_precision("bfloat16") == "bfloat16"  # the override leaves an explicit dtype alone
    monkeypatch.setenv("ALIGNKIT_TRAIN_PRECISION", "half")
    with pytest.raises(AlignkitError, match="ALIGNKIT_TRAIN_PRECISION"):
        cpu_train_precision("auto")
