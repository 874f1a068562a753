"""Rows-first linears: the same product as F.linear, applied only inside the block, and the engine's
greedy tokens unchanged with them on a batch large enough to use them."""

import pytest
import torch
import torch.nn.functional as F

from alignkit.models import cpu_linear
from alignkit.models.cpu_linear import rows_first_linear, rows_first_linears
from alignkit.models.rollout import RolloutEngine


@pytest.mark.parametrize("shape", [(1, 24), (3, 24), (16, 24), (4, 5, 24), (600, 24)])
@pytest.mark.parametrize("out_features", [40, 9000])
def test_rows_first_equals_f_linear(shape, out_features):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, out_features)
    x = torch.randn(*shape)
    y = rows_first_linear(layer, x)
    assert y.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


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

    def spy(module, x):
        calls.append(module)
        return original(module, x)

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
