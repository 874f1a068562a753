"""Post-training quantization of a causal LM: torchao kernels, our round-to-nearest reference, calibration, save/load.

Three methods, each a torchao config applied with `quantize_` (torch.ao.quantization is deprecated):

    int8-weight    int8 weights, one symmetric scale per output channel; activations stay float
    int8-dynamic   int8 weights as above, plus int8 activations with a scale per token computed at run time
    int4-weight    int4 weights, one symmetric scale per group of `group_size` input columns

`quantize_rtn` / `dequantize` are our own round-to-nearest implementation of the same schemes. They
are the reference in the parity tests and a column of the calibration report, so a regression in
either implementation shows up as the two drifting apart.

Calibration runs text through the float model with a forward hook on every quantized nn.Linear.
Each hook records the layer's input range (min/max, or a percentile of |x|) and feeds the same input
to the quantized twin of the layer, accumulating the relative output error ||W_q x - W x|| / ||W x||.
Feeding the float input to every quantized layer measures each layer's own error, not errors that
earlier layers passed on.

The output embedding (lm_head) is not quantized with torchao: in tied models it is the input
embedding too, and it is the layer whose error reaches the logits undamped. With `embedding="int8"`
the (tied) embedding is rounded to int8 with one scale per row (our RTN) and stored that way on
disk; it is dequantized to float when loaded, so it saves bytes on disk but not memory. With
`embedding="int4"` it becomes asymmetric int4 in groups (bf16 scales, int8 zero points on disk)
and stays packed in memory: the LM head
runs on the int4 kernel and the input embedding looks its rows up in the same packed matrix. In
SmolLM2-135M the embedding is 28.3M of 134.5M parameters, so this decides whether an int8 file is
about 40% or 25% of the float32 one, and whether an int4 file is about half of int8's.

A saved directory holds config.json, the tokenizer, `quantized.pt` (the state dict with torchao's
quantized tensors, loadable with torch.load(weights_only=True)) and `quantize.json` (method, group
size, observer, calibration stats, per-layer errors), plus `embedding_int8.pt` with an int8 embedding.

int4-weight: torchao chooses the int4 values and scales (`IntxWeightOnlyConfig`, which keeps one
value per int8 byte), then every such layer becomes an `Int4Linear` (int4.py) that keeps two values
per byte with bf16 scales and runs on torch's CPU int4 kernel. On disk, `int4_packed.pt` holds per
layer the packed nibbles, the bf16 scales (zero points only when not all zero) and the group size;
`load_quantized` builds the same modules from it, so what runs after loading is bit-for-bit what ran
before saving, and the weights stay packed in memory.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alignkit.compress.int4 import KERNEL_GROUP_SIZES, Int4Embedding, Int4Error, Int4Linear, pack_int4, unpack_int4
from alignkit.errors import AlignkitError, DataError, ModelLoadError
from alignkit.io import atomic_dir, read_jsonl

METHODS = ("int8-weight", "int8-dynamic", "int4-weight")
OBSERVERS = ("minmax", "percentile")
EMBEDDINGS = ("float", "int8", "int4")
WEIGHTS_FILE = "quantized.pt"
EMBEDDING_FILE = "embedding_int8.pt"
PACKED_FILE = "int4_packed.pt"
PACKED_FORMAT = 2  # 2: bf16 scales, Int4Linear layers and an optional int4 embedding
REPORT_FILE = "quantize.json"
META_FILE = "alignkit.json"  # the same name loading.py reads: it tells a quantized directory apart
DEFAULT_CALIB = Path(__file__).resolve().parents[1] / "data" / "examples" / "shop_sft.jsonl"
PERCENTILE_SAMPLES = 4096  # |x| values kept per layer per calibration text for the percentile observer


class QuantizeError(AlignkitError):
    """A quantization option does not fit the model or is unknown."""


# ---------------------------------------------------------------------------------------------
# Round-to-nearest reference


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True,
                 scale_dtype: torch.dtype | None = None):
    """Round-to-nearest quantization of a (out, in) weight: returns (q, scale, zero).

    Groups are `group_size` consecutive input columns of one output row; None means the whole row
    (per-output-channel). scale and zero have shape (out, in // group_size).
    Symmetric: scale = max|w| / (2^(bits-1) - 1), zero = 0, q in [-(2^(bits-1) - 1), 2^(bits-1) - 1].
    Asymmetric: scale = (max - min) / (2^bits - 1), zero = round(-min / scale), q in [0, 2^bits - 1].
    In both, w ~= (q - zero) * scale. q and zero are int8 (int4 values sit unpacked in int8).
    scale_dtype: round the scales to it (bf16 for the int4 kernel) before q is chosen, so that q is
    nearest on the grid that will run.
    """
    if w.dim() != 2:
        raise QuantizeError(f"quantize_rtn expects a 2-D weight, got shape {tuple(w.shape)}")
    if bits not in (4, 8):
        raise QuantizeError(f"bits must be 4 or 8, got {bits}")
    out_features, in_features = w.shape
    group = in_features if group_size is None else group_size
    if group <= 0 or in_features % group:
        raise QuantizeError(f"group size {group} does not divide in_features {in_features}")
    g = w.detach().float().reshape(out_features, in_features // group, group)  # (out, groups, group)
    # An all-zero group would give scale 0 and 0/0; any positive scale represents it exactly.
    tiny = torch.finfo(torch.float32).tiny
    rounded = (lambda x: x.to(scale_dtype).float().clamp(min=tiny)) if scale_dtype else (lambda x: x)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = rounded((g.abs().amax(dim=-1) / qmax).clamp(min=tiny))
        zero = torch.zeros_like(scale)
        q = torch.round(g / scale[..., None]).clamp(-qmax, qmax)
    else:
        qmax = 2 ** bits - 1
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)  # keep 0 representable
        scale = rounded(((hi - lo) / qmax).clamp(min=tiny))
        zero = torch.round(-lo / scale).clamp(0, qmax)
        q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, qmax)
        # uint4 fits int8; uint8 does not, so 8-bit asymmetric values are stored shifted by 128.
        if bits == 8:
            q, zero = q - 128, zero - 128
    return q.reshape(out_features, in_features).to(torch.int8), scale, zero.to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Float weights (q - zero) * scale; the group size is in_features // scale.shape[1]."""
    out_features, in_features = q.shape
    groups = scale.shape[1]
    g = q.float().reshape(out_features, groups, in_features // groups)
    return ((g - zero.float()[..., None]) * scale[..., None]).reshape(out_features, in_features)


def rtn_weight(w: torch.Tensor, method: str, group_size: int) -> torch.Tensor:
    """Our RTN reference for `method`'s weights, dequantized to w's dtype."""
    bits, group = (4, group_size) if method == "int4-weight" else (8, None)
    return dequantize(*quantize_rtn(w, bits, group)).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# Which layers, and torchao


def check_method(method: str) -> None:
    if method not in METHODS:
        raise QuantizeError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear except the output embedding, by qualified name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def check_group_size(model: nn.Module, method: str, group_size: int) -> None:
    """int4 groups must tile every quantized layer's input columns exactly."""
    if method != "int4-weight":
        return
    if group_size not in KERNEL_GROUP_SIZES:
        raise QuantizeError(f"--group-size must be one of {', '.join(map(str, KERNEL_GROUP_SIZES))} for "
                            f"int4 (torch's CPU int4 kernel), got {group_size}")
    bad = [f"{name} (in_features {m.in_features})" for name, m in quantizable_linears(model).items()
           if m.in_features % group_size]
    if bad:
        raise QuantizeError(f"--group-size {group_size} does not divide the input size of "
                            f"{len(bad)} layer(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")


def torchao_config(method: str, group_size: int):
    from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                      IntxWeightOnlyConfig)
    from torchao.quantization.granularity import PerGroup

    check_method(method)
    if method == "int8-weight":
        return Int8WeightOnlyConfig()
    if method == "int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def quantize_model(model: nn.Module, method: str, group_size: int = 32, embedding: str = "float") -> nn.Module:
    """Quantize a copy of `model` with torchao; the float model is left as it was.

    int4-weight layers become Int4Linear (two values per byte, torch's int4 kernel). embedding="int8"
    also rounds the input embedding (and a tied lm_head) to per-row int8, kept as float values in
    memory so that what runs is what save_quantized stores; embedding="int4" makes it a packed int4
    table in groups of `group_size` that the tied LM head multiplies with directly.
    """
    from torchao.quantization import quantize_

    check_method(method)
    check_group_size(model, method, group_size)
    if embedding not in EMBEDDINGS:
        raise QuantizeError(f"unknown embedding mode {embedding!r}: choose one of {', '.join(EMBEDDINGS)}")
    if embedding == "int4" and group_size not in KERNEL_GROUP_SIZES:
        raise QuantizeError(f"--embedding int4 needs --group-size in {', '.join(map(str, KERNEL_GROUP_SIZES))}, "
                            f"got {group_size}")
    quantized = copy.deepcopy(model)
    names = set(quantizable_linears(quantized))
    quantize_(quantized, torchao_config(method, group_size), filter_fn=lambda m, fqn: fqn in names)
    if method == "int4-weight":
        quantized = swap_int4_linears(quantized)
    if embedding == "int8":
        weight = quantized.get_input_embeddings().weight
        with torch.no_grad():
            weight.copy_(dequantize(*quantize_rtn(weight, 8)).to(weight.dtype))
    if embedding == "int4":
        emb, head = quantized.get_input_embeddings(), quantized.get_output_embeddings()
        try:
            # Asymmetric: all 16 levels, where the symmetric grid uses 15 around 0. On the embedded
            # model's tied embedding this took perplexity from 98.9 to 89.8 (int4 layers, group 32).
            q, scale, zero = quantize_rtn(emb.weight, 4, group_size, symmetric=False, scale_dtype=torch.bfloat16)
            table = Int4Linear(q - 8, scale, zero - 8, group_size)  # values 0..15 -> the kernel's -8..7
        except (Int4Error, QuantizeError) as e:
            raise QuantizeError(f"--embedding int4: {e}") from None
        tied = head is not None and head.weight is emb.weight
        install_int4_embedding(quantized, table, emb.padding_idx, emb.weight.dtype, tied)
    return quantized.eval()


def swap_int4_linears(model: nn.Module) -> nn.Module:
    """Every nn.Linear holding torchao's int4 tensor replaced by an Int4Linear (the root too, if it is one)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and is_int4_tensor(m.weight):
            if not name:
                return Int4Linear.from_torchao(m)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Int4Linear.from_torchao(m))
    return model


def install_int4_embedding(model: nn.Module, table: Int4Linear, padding_idx, dtype, tied: bool) -> None:
    """The input embedding looks rows up in `table`; a tied LM head becomes `table` itself."""
    model.set_input_embeddings(Int4Embedding(table, padding_idx, dtype))
    if tied:
        model.set_output_embeddings(table)


def embedding_keys(model: nn.Module) -> list[str]:
    """State-dict keys holding the input embedding's tensor (two when lm_head is tied to it)."""
    weight = model.get_input_embeddings().weight
    return [k for k, v in model.state_dict(keep_vars=True).items() if v is weight]


def apply_rtn(model: nn.Module, method: str, group_size: int = 32) -> nn.Module:
    """A copy of `model` with every quantizable weight replaced by our RTN reference (fake-quantized)."""
    check_method(method)
    check_group_size(model, method, group_size)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in quantizable_linears(ref).values():
            m.weight.copy_(rtn_weight(m.weight, method, group_size))
    return ref.eval()


# ---------------------------------------------------------------------------------------------
# Calibration


class RangeObserver:
    """The range of one layer's inputs over calibration: min and max, or a percentile of |x|.

    The percentile observer keeps all |x| values of an update up to PERCENTILE_SAMPLES and a seeded
    uniform sample beyond that, so memory stays bounded on real models; small inputs are exact.
    """

    def __init__(self, kind: str = "minmax", percentile: float = 99.9, seed: int = 0):
        if kind not in OBSERVERS:
            raise QuantizeError(f"unknown observer {kind!r}: choose one of {', '.join(OBSERVERS)}")
        if kind == "percentile" and not 0 < percentile <= 100:
            raise QuantizeError(f"--percentile must be in (0, 100], got {percentile}")
        self.kind, self.percentile = kind, percentile
        self.min, self.max, self.count = math.inf, -math.inf, 0
        self._samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float().flatten()
        self.count += x.numel()
        self.min = min(self.min, x.min().item())
        self.max = max(self.max, x.max().item())
        if self.kind == "percentile":
            if x.numel() > PERCENTILE_SAMPLES:
                x = x[torch.randint(x.numel(), (PERCENTILE_SAMPLES,), generator=self._gen)]
            self._samples.append(x.abs().cpu())

    def absmax(self) -> float:
        """The clipping range this observer proposes: max|x|, or the percentile of |x|."""
        if self.kind == "minmax":
            return max(abs(self.min), abs(self.max))
        return torch.quantile(torch.cat(self._samples), self.percentile / 100).item()

    def stats(self) -> dict:
        return {"min": self.min, "max": self.max, "absmax": self.absmax(), "values": self.count}


@dataclass
class LayerError:
    """One quantized layer's calibration result."""

    name: str
    in_features: int
    out_features: int
    rel_error: float      # ||W_q x - W x|| / ||W x|| of the torchao layer over all calibration tokens
    rtn_rel_error: float  # the same for our RTN reference weights (weights only, activations float)
    act_min: float
    act_max: float
    act_absmax: float     # observer's range: max|x| (minmax) or the percentile of |x|


def load_calibration_texts(path: Path | None = None, limit: int = 32) -> list[str]:
    """Calibration texts: JSONL (prompt + completion, or text, or messages) or one text per line."""
    path = Path(path) if path is not None else DEFAULT_CALIB
    if limit <= 0:
        raise QuantizeError(f"--calib-samples must be positive, got {limit}")
    texts, problems = [], []
    if path.suffix == ".jsonl":
        for lineno, rec in read_jsonl(path):
            if isinstance(rec.get("prompt"), str):
                text = rec["prompt"] + (" " + rec["completion"] if isinstance(rec.get("completion"), str) else "")
            elif isinstance(rec.get("text"), str):
                text = rec["text"]
            elif isinstance(rec.get("messages"), list):
                text = "\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))
            else:
                problems.append(f"line {lineno}: no 'prompt', 'text' or 'messages' field")
                continue
            if text.strip():
                texts.append(text)
        if problems:
            raise DataError(path, problems)
    else:
        from alignkit.data.prompts import load_prompts

        texts = load_prompts(path)
    if not texts:
        raise DataError(path, ["no calibration text"])
    return texts[:limit]


@torch.no_grad()
def calibrate(model: nn.Module, quantized: nn.Module, tokenizer, texts: list[str], *, method: str,
              group_size: int = 32, observer: str = "minmax", percentile: float = 99.9,
              max_length: int = 256, progress=None) -> list[LayerError]:
    """Run `texts` through the float model; per quantized layer, observe its input and measure errors.

    Texts go one at a time, so no padding enters the activation statistics. Returns layers sorted
    worst-first by rel_error.
    """
    float_layers = quantizable_linears(model)
    quant_layers = dict(quantized.named_modules())
    observers = {name: RangeObserver(observer, percentile) for name in float_layers}
    rtn = {name: rtn_weight(m.weight, method, group_size) for name, m in float_layers.items()}
    # Sums of squares in float64: one text's contribution is small next to the running total.
    sums = {name: [0.0, 0.0, 0.0] for name in float_layers}  # ||Wq x - Wx||^2, ||Wr x - Wx||^2, ||Wx||^2

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0]
            observers[name].update(x)
            ref = output.double()
            s = sums[name]
            s[0] += (quant_layers[name](x).double() - ref).pow(2).sum().item()
            s[1] += (F.linear(x, rtn[name], module.bias).double() - ref).pow(2).sum().item()
            s[2] += ref.pow(2).sum().item()
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in float_layers.items()]
    device = next(model.parameters()).device
    try:
        for i, text in enumerate(texts):
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids.to(device))
            if progress:
                progress(i + 1, len(texts))
    finally:
        for h in handles:
            h.remove()

    layers = []
    for name, m in float_layers.items():
        q_err, r_err, norm = sums[name]
        st = observers[name].stats()
        denom = math.sqrt(norm) if norm > 0 else 1.0
        layers.append(LayerError(name, m.in_features, m.out_features, math.sqrt(q_err) / denom,
                                 math.sqrt(r_err) / denom, st["min"], st["max"], st["absmax"]))
    return sorted(layers, key=lambda l: l.rel_error, reverse=True)


def format_error_table(layers: list[LayerError], limit: int | None = None) -> str:
    """Per-layer errors as a fixed-width table, in the order given (worst-first from calibrate)."""
    width = max([len("layer")] + [len(l.name) for l in layers])
    lines = [f"{'layer':<{width}}  {'in':>5}  {'out':>5}  {'rel_err':>9}  {'rtn_err':>9}  {'act_absmax':>10}"]
    for l in layers[:limit]:
        lines.append(f"{l.name:<{width}}  {l.in_features:>5}  {l.out_features:>5}  {l.rel_error:>9.5f}  "
                     f"{l.rtn_rel_error:>9.5f}  {l.act_absmax:>10.4g}")
    if limit is not None and len(layers) > limit:
        lines.append(f"... {len(layers) - limit} more in {REPORT_FILE}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Save and load


def is_int4_tensor(t) -> bool:
    """A torchao int4 weight that keeps one value per int8 byte (IntxUnpackedToInt8Tensor of int4)."""
    return type(t).__name__ == "IntxUnpackedToInt8Tensor" and t.target_dtype == torch.int4


def int4_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Int4Linear and Int4Embedding modules by name, shared ones under every name they have."""
    return {name: m for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (Int4Linear, Int4Embedding))}


def save_quantized(quantized: nn.Module, tokenizer, out_dir: Path, report: dict) -> Path:
    """Write config, tokenizer, quantized state dict and the report; the directory appears whole or not at all."""
    with atomic_dir(Path(out_dir)) as tmp:
        quantized.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        state = quantized.state_dict()
        if report.get("embedding") == "int8":
            keys = embedding_keys(quantized)
            q, scale, _ = quantize_rtn(state[keys[0]], 8)  # exact: the weight is already on this grid
            torch.save({"keys": keys, "q": q, "scale": scale}, tmp / EMBEDDING_FILE)
            state = {k: v for k, v in state.items() if k not in keys}
        packed = int4_modules(quantized)
        if packed:
            # named_modules (deduplicated) names a tied table once; the embedding entry says where it goes.
            layers = {name: m.disk_entry() for name, m in quantized.named_modules() if isinstance(m, Int4Linear)}
            emb = quantized.get_input_embeddings()
            embedding = None
            if isinstance(emb, Int4Embedding):
                embedding = {"table": next(n for n, m in quantized.named_modules() if m is emb.table),
                             "padding_idx": emb.padding_idx, "dtype": str(emb.dtype).removeprefix("torch."),
                             "tied": quantized.get_output_embeddings() is emb.table}
            torch.save({"format": PACKED_FORMAT, "layers": layers, "embedding": embedding}, tmp / PACKED_FILE)
            state = {k: v for k, v in state.items() if not any(k.startswith(n + ".") for n in packed)}
        torch.save(state, tmp / WEIGHTS_FILE)
        report["weights_file_bytes"] = sum((tmp / f).stat().st_size
                                           for f in (WEIGHTS_FILE, EMBEDDING_FILE, PACKED_FILE)
                                           if (tmp / f).is_file())
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        (tmp / META_FILE).write_text(json.dumps({"kind": "quantized", "method": report["method"],
                                                 "base_model": report.get("base_model")}, indent=2))
    return Path(out_dir)


def install_int4_layers(model: nn.Module, packed: dict) -> None:
    """Put the Int4Linear layers of an int4_packed.pt into `model` (built with empty weights)."""
    if packed.get("format") != PACKED_FORMAT:
        raise ModelLoadError(f"{PACKED_FILE} was written by an older alignkit (float32 scales, unpacked at "
                             "load): quantize the model again")
    layers = {name: Int4Linear.from_disk_entry(entry) for name, entry in packed["layers"].items()}
    emb = packed["embedding"]
    for name, layer in layers.items():
        if emb is None or name != emb["table"]:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    if emb is not None:
        install_int4_embedding(model, layers[emb["table"]], emb["padding_idx"], getattr(torch, emb["dtype"]),
                               emb["tied"])


def load_quantized(path: Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a directory written by save_quantized; the model is in eval mode.

    The model is built with empty (meta) parameters, so no float copy of the weights is ever made:
    memory after loading is the quantized tensors plus the float norms (and embedding, unless int4).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignkit.models.loading import load_tokenizer

    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file() or not (path / REPORT_FILE).is_file():
        raise ModelLoadError(f"{path}: not a quantized model directory (needs {WEIGHTS_FILE} and {REPORT_FILE})")
    if (path / PACKED_FILE).is_file() and torch.device(device).type != "cpu":
        raise ModelLoadError(f"{path}: int4 weights run on torch's CPU int4 kernel; load with --device cpu")
    import torchao  # noqa: F401  (registers torchao's tensor types as safe for weights_only loading)

    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=config.dtype)
    try:
        state = torch.load(path / WEIGHTS_FILE, map_location=device, weights_only=True)
        if (path / EMBEDDING_FILE).is_file():
            emb = torch.load(path / EMBEDDING_FILE, map_location=device, weights_only=True)
            weight = dequantize(emb["q"], emb["scale"], torch.zeros_like(emb["q"][:, :1]))
            state.update({k: weight for k in emb["keys"]})
        if (path / PACKED_FILE).is_file():
            install_int4_layers(model, torch.load(path / PACKED_FILE, map_location=device, weights_only=True))
    except (ModelLoadError, Int4Error):
        raise
    except Exception as e:
        raise ModelLoadError(f"{path / WEIGHTS_FILE}: cannot load: {e}") from None
    # assign=True puts the loaded tensors (torchao's among them) in place of the empty parameters as they are.
    model.load_state_dict(state, assign=True, strict=False)
    if not isinstance(model.get_input_embeddings(), Int4Embedding):
        model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise ModelLoadError(f"{path}: no weights for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.to(device)
    model.eval()
    return model, load_tokenizer(path)


def quantize(model_spec: str, out_dir: Path, *, method: str, group_size: int = 32, calib: Path | None = None,
             calib_samples: int = 32, observer: str = "minmax", percentile: float = 99.9,
             embedding: str = "float", device: str = "cpu", progress=None) -> dict:
    """Load, quantize, calibrate and save; returns the report written to quantize.json."""
    from alignkit.models import load_model

    check_method(method)
    RangeObserver(observer, percentile)  # rejects a bad observer before the model loads
    texts = load_calibration_texts(calib, calib_samples)
    model, tokenizer = load_model(model_spec, device=device)
    if hasattr(model, "merge_and_unload"):  # an adapter directory: quantize base plus adapter
        model = model.merge_and_unload()
    start = time.perf_counter()
    quantized = quantize_model(model, method, group_size, embedding)
    layers = calibrate(model, quantized, tokenizer, texts, method=method, group_size=group_size,
                       observer=observer, percentile=percentile, progress=progress)
    seconds = time.perf_counter() - start
    float_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report = {
        "method": method,
        "group_size": group_size if method == "int4-weight" else None,
        "observer": observer,
        "percentile": percentile if observer == "percentile" else None,
        "base_model": model_spec,
        "calibration": {"file": str(calib) if calib else "shipped shop_sft.jsonl", "texts": len(texts),
                        "tokens": sum(len(tokenizer(t, truncation=True, max_length=256)["input_ids"])
                                      for t in texts)},
        "layers_quantized": len(layers),
        "embedding": embedding,
        "kept_float": {"float": "norms; the (tied) embedding and lm_head: their error reaches the logits undamped",
                       "int8": "norms; the embedding is int8 on disk, float in memory",
                       "int4": "norms only"}[embedding],
        "mean_rel_error": sum(l.rel_error for l in layers) / max(len(layers), 1),
        "max_rel_error": max((l.rel_error for l in layers), default=0.0),
        "seconds": round(seconds, 2),
        "float_parameter_bytes": float_bytes,
        "layers": [asdict(l) for l in layers],
    }
    save_quantized(quantized, tokenizer, out_dir, report)
    return report
