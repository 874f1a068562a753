"""Decode-step matrix multiplies in the form this CPU runs fastest.

A decode step multiplies a few rows (one per sequence) by every weight matrix: y = x W^T with x of
(rows, in) and W of (out, in). Two things make it faster than `F.linear`, each measured with
`bench/bench_generate.py --linear`:

- Orientation. MKL computes the same product as (W x^T)^T, with the weight as the tall left operand,
  faster than x W^T for some row counts. On the 2-core AVX2 EPYC this project was first measured on:
  the 49152 x 576 LM head 2.3x at 4 rows, 1.45x at 32 (28.5 -> 19.2 ms at 32 rows); the 576 <-> 1536
  projections 1.1-1.3x at 16-64 rows, but slower below 16 (0.76-0.87x at 8 rows). So, in float32, a
  projection takes (W x^T)^T from 16 to 512 rows and a vocabulary-sized head (8192 outputs or more)
  from 2 rows; everything else keeps `F.linear`. Equal up to float rounding, like any change of kernel.
- bfloat16 on CPUs with AMX (Intel Xeon Sapphire Rapids and later). AMX multiplies bfloat16 tiles
  and accumulates in float32: on a 2-core Xeon with AMX, (W x^T)^T in bfloat16 ran the 576 <-> 1536
  projections 2-4x and the LM head 2-6x faster than float32 from 4 rows up (8 rows: 0.26 -> 0.08 ms,
  20.7 -> 3.1 ms), while at 1-2 rows bfloat16 was slower (no AMX tile to fill). With `PRECISION`
  "auto" (the default), such a CPU multiplies in bfloat16 from LOWP_MIN_ROWS rows (small projections,
  under 512 outputs, from LOWP_SMALL_MIN_ROWS), on a bfloat16 copy of the weight made once and kept
  beside it; inputs are rounded to bfloat16, products summed in float32, the result rounded to
  bfloat16 (what a CPU bfloat16 matmul writes) and handed back in float32. CPUs without AMX stay in float32 (their bfloat16 products run no faster). This rounds
  the generation model's weights to bfloat16's 8 bits of mantissa, as GPU engines sampling for RL
  do: the RL recipes recompute every log-prob with the float32 trainer and log the gap
  (`sampler_logprob_gap`). "float32" keeps every product exact to float32 (the tests set it, so they
  give the same tokens on every CPU); "bfloat16" forces the bfloat16 products on any CPU.
  The environment variable ALIGNKIT_DECODE_PRECISION sets it for a process and its children.

The result is handed back row-major, as F.linear's is (a copy of a few rows). Left transposed, it
made the query projection's heads strided, which sends torch's CPU attention from its flash kernel
to the math one, and made every reduction over a row of logits stride through memory: on the AMX
Xeon that cost about a quarter of an 8-row, 32-token generation (2.0 -> 1.5 s).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

MIN_ROWS, MAX_ROWS = 16, 512  # for a projection; a vocabulary-sized head from HEAD_MIN_ROWS rows
HEAD_MIN_ROWS, HEAD_OUTPUTS = 2, 8192
LOWP_MIN_ROWS, LOWP_SMALL_MIN_ROWS, LOWP_SMALL_OUTPUTS = 4, 64, 512
ENABLED = True  # False: rows_first_linears changes nothing (benchmarks compare both)
PRECISIONS = ("auto", "float32", "bfloat16")


@lru_cache(maxsize=1)
def cpu_has_amx_bf16() -> bool:
    """True when this CPU multiplies bfloat16 matrices on AMX tiles (and torch may use them)."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # a torch without these probes
        return False


def decode_precision() -> str:
    """The precision decode products run in now: "float32" or "bfloat16" ("auto" resolved for this CPU)."""
    return precision_from_env("ALIGNKIT_DECODE_PRECISION")


def precision_from_env(variable: str) -> str:
    """The precision an environment variable asks for ("auto", the default, "float32" or "bfloat16"),
    "auto" resolved for this CPU: bfloat16 where it multiplies bfloat16 on AMX tiles, else float32.
    A value that is none of these raises ValueError naming the variable."""
    wanted = os.environ.get(variable, "auto").strip().lower() or "auto"
    if wanted not in PRECISIONS:
        raise ValueError(f"{variable}={wanted!r}: choose one of {', '.join(PRECISIONS)}")
    if wanted == "auto":
        return "bfloat16" if cpu_has_amx_bf16() else "float32"
    return wanted


def low_precision_weight(module: torch.nn.Linear) -> torch.Tensor:
    """A bfloat16 copy of `module.weight`, made once and kept on the module while the weight is the
    same tensor, unwritten. Inference tensors carry no version counter: whoever writes one in place
    (the rollout engine's `sync`) calls `refresh_low_precision` or `forget_low_precision` on the module."""
    stamp = weight_stamp(module.weight)
    kept = module.__dict__.get("_bf16_weight")
    if kept is None or kept[0] != stamp:
        with torch.inference_mode(False):  # a normal tensor, so a training pass may save it for backward
            kept = module.__dict__["_bf16_weight"] = (stamp, module.weight.detach().to(torch.bfloat16))
    return kept[1]


def weight_stamp(w: torch.Tensor) -> tuple:
    return (w.data_ptr(), None if w.is_inference() else w._version)


def fused_low_precision_weight(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """The bfloat16 weight of the modules' outputs side by side (cat of their weights along the output
    dimension), for one product where they read the same input (models.llama_decode). Made once and
    kept on every module; each module's own kept bfloat16 copy (`low_precision_weight`) becomes a view
    of its rows, so the fused weight costs no memory beside those copies. Rebuilt when any module's
    weight changed or was forgotten (`forget_low_precision`)."""
    if len(modules) == 1:
        return low_precision_weight(modules[0])
    stamps = tuple(weight_stamp(m.weight) for m in modules)
    kept = modules[0].__dict__.get("_bf16_fused")
    if kept is None or kept[0] != stamps or any(m.__dict__.get("_bf16_fused") is not kept for m in modules[1:]):
        with torch.inference_mode(False):
            fused = torch.cat([m.weight.detach().to(torch.bfloat16) for m in modules])
        kept, start = (stamps, fused), 0
        for m, stamp in zip(modules, stamps):
            m.__dict__["_bf16_weight"] = (stamp, fused[start:start + m.out_features])
            m.__dict__["_bf16_fused"] = kept
            start += m.out_features
    return kept[1]


def forget_low_precision(model: torch.nn.Module) -> None:
    """Drop every kept bfloat16 weight copy of `model` (after its weights were written in place)."""
    for m in model.modules():
        m.__dict__.pop("_bf16_weight", None)
        m.__dict__.pop("_bf16_fused", None)


def refresh_low_precision(module: torch.nn.Module) -> None:
    """After `module.weight` was written in place: rewrite its kept bfloat16 copy in place from it, so
    that a copy which is a view of a fused weight (`fused_low_precision_weight`) updates that fused
    weight's rows too and nothing is rebuilt (the rollout engine's `sync`, every RL step). Where the
    copy was made from another tensor, or the weight keeps a version counter (a normal tensor, whose
    write has moved its stamp), the module's copies are forgotten instead, to be made anew on use."""
    kept = module.__dict__.get("_bf16_weight")
    if kept is None:
        return
    w = module.weight
    if w.is_inference() and kept[0] == weight_stamp(w) and kept[1].shape == w.shape:
        kept[1].copy_(w.detach())
    else:
        forget_low_precision(module)


def rows_first_linear(module: torch.nn.Linear, x: torch.Tensor, low_precision: bool = False) -> torch.Tensor:
    """module(x), computed as (W x^T)^T when x has MIN_ROWS..MAX_ROWS rows on a CPU (HEAD_MIN_ROWS..
    for a layer of at least HEAD_OUTPUTS outputs); with `low_precision`, in bfloat16 on a kept bfloat16
    copy of W from LOWP_MIN_ROWS rows (LOWP_SMALL_MIN_ROWS for a layer under LOWP_SMALL_OUTPUTS outputs)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != module.weight.dtype or x.dtype != torch.float32:
        return F.linear(x, module.weight, module.bias)
    small = module.out_features < LOWP_SMALL_OUTPUTS
    if low_precision and rows >= (LOWP_SMALL_MIN_ROWS if small else LOWP_MIN_ROWS):
        y = low_precision_product(low_precision_weight(module), x.reshape(rows, x.shape[-1]))
    else:
        low = HEAD_MIN_ROWS if module.out_features >= HEAD_OUTPUTS else MIN_ROWS
        if not (low <= rows <= MAX_ROWS):
            return F.linear(x, module.weight, module.bias)
        y = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def low_precision_product(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x W^T for 2-D float32 x and a bfloat16 W: x rounded to bfloat16, (W x^T)^T up to MAX_ROWS rows
    (F.linear above), the bfloat16 result handed back row-major in float32."""
    flat = x.to(torch.bfloat16)
    y = torch.mm(w, flat.t()).t() if x.shape[0] <= MAX_ROWS else F.linear(flat, w)
    return y.to(torch.float32, memory_format=torch.contiguous_format)


@contextmanager
def rows_first_linears(model: torch.nn.Module, precision: str | None = None):
    """Within the block, every plain nn.Linear of `model` computes through `rows_first_linear`, in
    `precision` ("float32" or "bfloat16"; None: `decode_precision()`); afterwards the modules are as
    they were (a kept bfloat16 weight copy stays for the next block). Subclasses (LoRA layers) and
    weights that are not plain tensors (torchao's quantized weights) are left alone."""
    patched = []
    if ENABLED and next(model.parameters()).device.type == "cpu":
        low = (precision or decode_precision()) == "bfloat16"
        for m in model.modules():
            if type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and "forward" not in m.__dict__:
                m.forward = partial(rows_first_linear, m, low_precision=low)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def frozen_linear_bf16(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """module(x) for training with a frozen weight: the product in bfloat16 on the kept bfloat16 copy of
    W, summed in float32 and handed back in float32, differentiable in x (the input's gradient is a
    bfloat16 product too). A weight that requires grad, or an input that is not float32 on the CPU,
    takes F.linear."""
    w = module.weight
    if w.requires_grad or x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        return F.linear(x, w, module.bias)
    flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # 2-D: a 3-D bfloat16 input took a batched path
    y = F.linear(flat, low_precision_weight(module)).to(torch.float32)
    if module.bias is not None:
        y = y + module.bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])  # 2-D: y itself, not a view


def frozen_products_in_bf16(model: torch.nn.Module) -> int:
    """From now on, every plain nn.Linear of `model` whose weight is frozen (LoRA's base layers, a tied
    LM head) computes through `frozen_linear_bf16`: a training recipe's `dtype: bfloat16` on a CPU.
    Trainable weights (LoRA's A and B, heads, full fine-tuning), attention, norms and the loss stay
    float32, as with QLoRA's frozen base. Returns how many layers it patched. The rollout engine's
    generation copy drops these patches (models.rollout.generation_copy) and decodes through
    `rows_first_linears` instead."""
    patched = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear and not m.weight.requires_grad and "forward" not in m.__dict__:
            m.forward = partial(frozen_linear_bf16, m)
            patched += 1
    return patched


def is_frozen_product_patch(module: torch.nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is frozen_linear_bf16
