"""Real 4-bit weights at run time: linear and embedding layers that keep two int4 values per byte.

torch ships group-wise int4 CPU kernels: `aten._convert_weight_to_int4pack_for_cpu` lays out an
(N, K) matrix of 4-bit values as (N, K / 2) bytes, and `aten._weight_int4pack_mm_for_cpu(x, packed,
group_size, scale_and_zero)` multiplies by it, dequantizing each group on the fly as
(q - 8) * scale + zero with q in 0..15. torchao's `Int4WeightOnlyConfig` would be the library way to
get there, but torchao 0.18 on a CPU-only torch offers no int4 layout that runs on CPU: "opaque"
(the format that wrapped this op) is gone ("Unsupported int4 packing format: opaque"), "plain" and
"preshuffled" need the `mslk` package, "plain_int32" says "does not support device 'cpu' yet" and
"tile_packed_to_4d" needs CUDA. So torchao still chooses the int4 values and scales
(`IntxWeightOnlyConfig`, see quantize.py), and the two small modules below run them on torch's op.

Precision choices, measured in bench/bench_int4.py (see the README):
- activations enter the kernel as bfloat16: with float32 activations the same kernel is about 8x
  slower than with bfloat16 on this CPU (no AVX512), and the output goes back to the input's dtype;
- scales (and zero terms) are bfloat16, the kernel's dtype for them, on disk as in memory, so what is
  saved is exactly what runs;
- norms and biases stay float: they are a few thousand values.

The kernel's packed layout (blocks of B output rows, B = 32 on AVX2 and 64 with AVX512: byte
[b, k, j] holds row Bb + j in its low nibble and row Bb + B/2 + j in its high nibble, for input
column k) is decoded here only to look up embedding rows and to dequantize for tests. B is found once
by packing known values (`kernel_block_n`), and `check_layout` verifies the layout on every load, so
a torch that packs differently fails loudly instead of returning wrong embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.errors import AlignkitError

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Output rows per block of the kernel's packed layout (N is padded up to a multiple): torch builds
# its CPU int4 kernel per instruction set, with blocks of 32 rows on AVX2 and of 64 with AVX512.
BLOCK_N_CANDIDATES = (32, 64)
KERNEL_DTYPE = torch.bfloat16


class Int4Error(AlignkitError):
    """An int4 layer cannot be built or run as asked."""


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte: (out, in) int8 in [-8, 7] -> (out, ceil(in / 2)) uint8.

    Each value is stored offset by 8 (so 0..15); column 2j goes to the low nibble of byte j and
    column 2j + 1 to the high nibble. An odd last column is paired with a zero nibble.
    This is the layout on disk; the kernel's own layout is built from it at load.
    """
    if q.dim() != 2 or q.dtype != torch.int8:
        raise Int4Error(f"pack_int4 expects a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise Int4Error("pack_int4: values outside the int4 range [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = F.pad(u, (0, 1), value=8)  # a nibble for value 0, dropped again by unpack_int4
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of pack_int4: (out, ceil(in / 2)) uint8 -> (out, in_features) int8 in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(1)[:, :in_features].contiguous()


def decode_blocks(packed: torch.Tensor, rows: torch.Tensor, in_features: int, block_n: int) -> torch.Tensor:
    """Rows of a packed layout of `block_n`-row blocks as values 0..15: (len(rows), in_features)."""
    blocks = packed.view(-1, in_features, block_n // 2)  # (N / block_n, K, block_n / 2)
    within = rows % block_n
    byte = blocks[rows // block_n, :, within % (block_n // 2)]  # (len, K)
    return torch.where((within < block_n // 2)[:, None], byte & 0x0F, byte >> 4)


_BLOCK_N: list[int] = []


def kernel_block_n() -> int:
    """The block height of this torch build's int4 CPU layout, found once by packing known values and
    decoding them (Int4Error when neither known layout fits)."""
    if not _BLOCK_N:
        probe = torch.arange(128 * 64, dtype=torch.int32).reshape(128, 64) * 7 % 16
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        fits = [b for b in BLOCK_N_CANDIDATES
                if torch.equal(decode_blocks(packed, torch.arange(128), 64, b).to(torch.int32), probe)]
        if not fits:
            raise Int4Error("torch's int4 CPU kernel packs weights in a layout this version of alignkit does not "
                            f"know (torch {torch.__version__}); int4 models cannot be loaded with it")
        _BLOCK_N.append(fits[0])
    return _BLOCK_N[0]


def kernel_rows(packed: torch.Tensor, rows: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows of the kernel's packed layout as int8 values in [-8, 7]: (len(rows), in_features)."""
    return decode_blocks(packed, rows, in_features, kernel_block_n()).to(torch.int8) - 8


class Int4Linear(nn.Module):
    """y = x W^T + b with W kept as packed int4 (two values per byte) and bf16 scales per group.

    W[n, k] = q[n, k] * scale[n, g] - zero[n, g] * scale[n, g] for g = k // group_size, as torchao's
    int4 tensors define it (q in [-8, 7]); the kernel sees q + 8 and the zero term -zero * scale.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = q.shape
        if group_size not in KERNEL_GROUP_SIZES:
            raise Int4Error(f"int4 group size must be one of {', '.join(map(str, KERNEL_GROUP_SIZES))} "
                            f"(torch's CPU int4 kernel), got {group_size}")
        if in_features % group_size or scale.shape != (out_features, in_features // group_size):
            raise Int4Error(f"int4 weight of shape {tuple(q.shape)} does not fit scales of shape "
                            f"{tuple(scale.shape)} with group size {group_size}")
        if q.device.type != "cpu":
            raise Int4Error("int4 weights run on torch's CPU kernel: load the model with --device cpu")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        pad = -out_features % kernel_block_n()  # the kernel packs blocks of rows; padded rows are all zero
        u = F.pad(q.to(torch.int32) + 8, (0, 0, 0, pad), value=8)
        scale = F.pad(scale.to(KERNEL_DTYPE), (0, 0, 0, pad))
        zero_term = torch.zeros_like(scale) if zero is None else F.pad(-(zero.float() * scale[:out_features].float())
                                                                         .to(KERNEL_DTYPE), (0, 0, 0, pad))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1))
        # (K / group, N, 2): scale and zero term per group, the kernel's argument as it wants it.
        self.register_buffer("scale_and_zero", torch.stack([scale.t(), zero_term.t()], dim=-1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        check_layout(self, q)

    @classmethod
    def from_torchao(cls, linear: nn.Linear) -> "Int4Linear":
        """From an nn.Linear whose weight is torchao's IntxUnpackedToInt8Tensor of int4."""
        w = linear.weight
        zero = w.zero_point if w.zero_point.any() else None
        return cls(w.qdata, w.scale, zero, int(w.block_size[-1]), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_and_zero)
        y = y[:, :self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def int4_values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The int4 values q (int8 in [-8, 7]) of `rows` (all rows if None), decoded from the kernel layout."""
        rows = torch.arange(self.out_features) if rows is None else rows
        return kernel_rows(self.packed, rows, self.in_features)

    def scales(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero term) per group, float32, shape (len(rows), in_features // group_size)."""
        sz = self.scale_and_zero[:, :self.out_features] if rows is None else self.scale_and_zero[:, rows]
        return sz[..., 0].t().float(), sz[..., 1].t().float()

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 weights of `rows` (all if None) exactly as the kernel defines them."""
        q = self.int4_values(rows).float()
        scale, zero_term = self.scales(rows)
        g = q.reshape(q.shape[0], -1, self.group_size)
        return (g * scale[..., None] + zero_term[..., None]).reshape(q.shape[0], self.in_features)

    def disk_entry(self) -> dict:
        """What int4_packed.pt keeps of this layer: two values per byte in pack_int4's layout, bf16 scales."""
        scale, zero_term = self.scales()
        zero = None
        if zero_term.any():  # stored as torchao's zero point: zero_term = -zero * scale
            zero = torch.round(-zero_term / scale.clamp(min=torch.finfo(torch.float32).tiny)).to(torch.int8)
        return {"packed": pack_int4(self.int4_values()), "in_features": self.in_features,
                "scale": scale.to(KERNEL_DTYPE), "zero_point": zero, "group_size": self.group_size,
                "bias": self.bias.detach() if self.bias is not None else None}

    @classmethod
    def from_disk_entry(cls, entry: dict) -> "Int4Linear":
        q = unpack_int4(entry["packed"], entry["in_features"])
        return cls(q, entry["scale"], entry["zero_point"], entry["group_size"], entry["bias"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Seen from outside (state_dict, GGUF export, save_pretrained) this is an nn.Linear: its state is
        # the float weight it computes with. The packed form is saved by compress.quantize.save_quantized.
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")


class Int4Embedding(nn.Module):
    """Embedding lookup from an Int4Linear's packed rows: with tied weights the LM head and the input
    embedding share one packed matrix, as they share one float matrix in the original model."""

    def __init__(self, table: Int4Linear, padding_idx: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table, self.padding_idx, self.dtype = table, padding_idx, dtype
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # Like nn.Embedding's: one float `weight`, not the table's own entries.
        destination = {} if destination is None else destination
        destination[prefix + "weight"] = self.table.dequantize().to(self.dtype)
        return destination

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.table.dequantize(flat).to(self.dtype).reshape(*ids.shape, self.embedding_dim)


def check_layout(layer: Int4Linear, q: torch.Tensor) -> None:
    """The kernel layout decodes back to the values it was built from (a few rows, every block edge)."""
    n = layer.out_features
    rows = torch.unique(torch.tensor([0, 15, 16, 31, 32, 63, n // 2, n - 1]).clamp(0, n - 1))
    if not torch.equal(layer.int4_values(rows), q[rows].to(torch.int8)):
        raise Int4Error("torch's int4 CPU kernel packs weights in a layout this version of alignkit does not "
                        f"know (torch {torch.__version__}); int4 models cannot be loaded with it")
