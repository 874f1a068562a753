"""Decode-step matrix multiplies in the orientation this CPU's BLAS runs faster.

A decode step multiplies a few rows (one per sequence) by every weight matrix: y = x W^T with x of
(rows, in) and W of (out, in). MKL computes the same product as (W x^T)^T, with the weight as the
tall left operand, faster than `F.linear`'s x W^T on this project's 2-core AVX2 machine for some
row counts (`bench/bench_generate.py --linear`): the 49152 x 576 LM head 2.3x at 4 rows, 1.45x at
32 (28.5 -> 19.2 ms at 32 rows); the 576 <-> 1536 projections 1.1-1.3x at 16-64 rows. Below 16 rows
the projections are slower that way (0.76-0.87x at 8 rows), and prefill-sized inputs gain nothing,
so a projection takes (W x^T)^T from 16 to 512 rows and a vocabulary-sized head (8192 outputs or
more) from 2 rows; everything else keeps `F.linear`. The result is the same product summed in
another order: equal up to float rounding, like any change of BLAS kernel.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

MIN_ROWS, MAX_ROWS = 16, 512  # for a projection; a vocabulary-sized head from HEAD_MIN_ROWS rows
HEAD_MIN_ROWS, HEAD_OUTPUTS = 2, 8192
ENABLED = True  # False: rows_first_linears changes nothing (benchmarks compare both)


def rows_first_linear(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x), computed as (W x^T)^T when x has MIN_ROWS..MAX_ROWS rows on a CPU (HEAD_MIN_ROWS..
    for a layer of at least HEAD_OUTPUTS outputs)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    low = HEAD_MIN_ROWS if module.out_features >= HEAD_OUTPUTS else MIN_ROWS
    if not (low <= rows <= MAX_ROWS) or x.device.type != "cpu" or x.dtype != module.weight.dtype:
        return F.linear(x, module.weight, module.bias)
    y = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


@contextmanager
def rows_first_linears(model: torch.nn.Module):
    """Within the block, every plain nn.Linear of `model` computes through `rows_first_linear`;
    afterwards the modules are as they were. Subclasses (LoRA layers) and weights that are not plain
    tensors (torchao's quantized weights) are left alone."""
    patched = []
    if ENABLED and next(model.parameters()).device.type == "cpu":
        for m in model.modules():
            if type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and "forward" not in m.__dict__:
                m.forward = rows_first_linear.__get__(m)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
