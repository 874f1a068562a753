"""One decode step of a Llama-architecture model, written out for the CPU engine.

A decode step feeds one new token per row. Through transformers' modules it costs about 70 small
tensor operations per layer plus the Python of every module call, mask and cache update: on the
2-core AMX Xeon this project is measured on, a step of the embedded model took 40-50 ms at 8 rows,
of which the matrix products were under 25 ms. This step computes the same function with fewer,
larger operations:

- the products that read the same input run as one: the query, key and value projections, and the
  MLP's gate and up projections. Where the engine multiplies in bfloat16 (`models.cpu_linear`), the
  fused bfloat16 weight is built once, and each projection's kept bfloat16 copy becomes a view of it,
  so the fused weight costs no memory beside them. In float32 the products stay separate (a fused
  float32 weight would be a second copy of most of the model) and share their input;
- rotary embedding on the queries and keys together, with cos/sin computed once per step;
- the new key and value written straight into the static cache's next column; attention over the
  filled columns (one query position per row; the query heads of a key/value head attend as one
  group);
- the residual stream, norms, softmax and everything outside the products in float32, as in
  transformers.

In float32 its logits are bit for bit transformers' (tested); in bfloat16 the fused products sum in a
different blocking, which moves logits by bfloat16 rounding, as any change of kernel does.
`supports(model)` says whether a model is one this step computes exactly; any other model (other
architectures, attention or MLP biases, scaled rotary embeddings, quantized weights, a GPU), and a
model with forward hooks (which expect their modules to be called), keeps transformers' forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignkit.models.cpu_linear import (LOWP_MIN_ROWS, decode_precision, fused_low_precision_weight,
                                        low_precision_product, rows_first_linear)


def supports(model) -> bool:
    """True when `model` is a transformers LlamaForCausalLM on the CPU that `decode_step` computes as
    transformers does: no attention or MLP bias, SiLU MLP, unscaled ("default") rotary embedding, one
    head dimension for all heads, plain float32 nn.Linear projections."""
    if type(model).__name__ != "LlamaForCausalLM":
        return False
    cfg, inner = model.config, model.model
    rotary = getattr(inner, "rotary_emb", None)
    if (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False) or cfg.hidden_act != "silu"
            or getattr(cfg, "pretraining_tp", 1) != 1 or rotary is None
            or getattr(rotary, "rope_type", "default") != "default" or rotary.attention_scaling != 1.0):
        return False
    layer = inner.layers[0]
    attn = layer.self_attn
    if attn.head_dim * cfg.num_attention_heads != attn.q_proj.out_features:
        return False
    linears = [model.lm_head] + [m for lyr in inner.layers for m in (
        lyr.self_attn.q_proj, lyr.self_attn.k_proj, lyr.self_attn.v_proj, lyr.self_attn.o_proj,
        lyr.mlp.gate_proj, lyr.mlp.up_proj, lyr.mlp.down_proj)]
    if not all(type(m) is torch.nn.Linear and type(m.weight.data) is torch.Tensor and m.weight.dtype == torch.float32
               and m.weight.device.type == "cpu" and m.bias is None for m in linears):
        return False
    return not has_hooks(model)  # a hook expects its module to be called; this step calls none


def has_hooks(model) -> bool:
    """True when a forward hook or pre-hook is registered on any module of `model`, or globally.
    transformers' own output-capturing hooks do not count: it installs them, for good, the first time a
    model is asked for its hidden states (as the RL trainers' passes do), and they record nothing unless
    a forward pass asks transformers for those outputs, which a decode step never does."""
    from torch.nn.modules import module as nn_module

    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    return any(m._forward_pre_hooks or any(not _output_capturing(h) for h in m._forward_hooks.values())
               for m in model.modules())


def _output_capturing(hook) -> bool:
    return (getattr(hook, "__name__", "") == "output_capturing_hook"
            and getattr(hook, "__module__", "") == "transformers.utils.output_capturing")


def products(x: torch.Tensor, modules: list[torch.nn.Linear], low: bool) -> torch.Tensor:
    """cat([m(x) for m in modules], -1) for 2-D x: in bfloat16 one product on the fused bfloat16
    weight (`cpu_linear.fused_low_precision_weight`), in float32 each module's own product."""
    if low:
        return low_precision_product(fused_low_precision_weight(modules), x)
    ys = [rows_first_linear(m, x) for m in modules]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm on float32, operation for operation (so its bits)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache,
                precision: str | None = None) -> torch.Tensor:
    """Logits (rows, vocab), float32, for one new token per row, appending its keys and values to
    `cache` (the rollout engine's filled static cache, `rollout.filled_static_cache`) at its next
    column.

    tokens, positions: (rows,) long. mask: (rows, filled + 1) bool over the cache's filled columns and
    the new one (True: attend), or None for all of them. precision: "float32" or "bfloat16" products
    (None: `cpu_linear.decode_precision()`), bfloat16 only from LOWP_MIN_ROWS rows, as cpu_linear."""
    rows = tokens.shape[0]
    # No mask where every row attends to every column (no padding): sdpa runs faster without one.
    attn_mask = None if mask is None or bool(mask.all()) else mask[:, None, None, :]

    def attend(q, k, v, cached, attn):  # q (rows, heads, dim); k, v (rows, kv_heads, dim)
        keys, values = cached.append_block(k[:, :, None], v[:, :, None])
        kv_heads, dim = k.shape[1], k.shape[2]
        # The query heads that share a key/value head attend as one group of queries: no repeated keys.
        out = F.scaled_dot_product_attention(q.reshape(rows, kv_heads, -1, dim), keys, values, attn_mask=attn_mask,
                                             scale=attn.scaling)
        return out.reshape(rows, -1)

    return _forward(model, tokens, positions, cache, attend, rows, precision)


@torch.inference_mode()
def read_block(model, tokens: torch.Tensor, cache, keep: int = 1, precision: str | None = None) -> torch.Tensor:
    """Logits (keep, vocab), float32, of the last `keep` of `tokens` (k,), the next k tokens of a
    single-row cache read in one pass (each attends to the cache and to the block's tokens before it),
    their keys and values appended to `cache`. For a batch of one (models.prefix_cache: a prompt's
    unread rest, tokens a grammar forces, drafted tokens)."""
    k = tokens.shape[0]
    filled = cache.layers[0].filled
    positions = torch.arange(filled, filled + k, device=tokens.device)
    causal = None  # one token attends to every filled column: no mask (cheaper for sdpa over a long cache)
    if k > 1:
        causal = torch.arange(filled + k, device=tokens.device)[None, :] <= positions[:, None]  # (k, filled + k)

    def attend(q, key, value, cached, attn):  # q (k, heads, dim); key, value (k, kv_heads, dim)
        keys, values = cached.append_block(key.transpose(0, 1)[None], value.transpose(0, 1)[None])
        kv_heads, dim = key.shape[1], key.shape[2]
        group = q.shape[1] // kv_heads
        # (k, kv_heads, group, dim) -> (1, kv_heads, group * k, dim): a key/value head's queries, group-major
        grouped = q.view(k, kv_heads, group, dim).permute(1, 2, 0, 3).reshape(1, kv_heads, group * k, dim)
        mask = None if causal is None else causal.repeat(group, 1)[None, None]
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=attn.scaling)
        return out.view(kv_heads, group, k, dim).permute(2, 0, 1, 3).reshape(k, -1)

    return _forward(model, tokens, positions, cache, attend, k, precision, keep=keep)


def _forward(model, tokens: torch.Tensor, positions: torch.Tensor, cache, attend, rows: int,
             precision: str | None, keep: int | None = None) -> torch.Tensor:
    """The layers over `rows` token rows (2-D throughout); `attend(q, k, v, cache_layer, attn_module)`
    rotates nothing: it gets rotated queries and keys, caches keys and values, and returns the attention
    output (rows, heads * dim). Logits of the last `keep` rows (all when None)."""
    inner, cfg = model.model, model.config
    bfloat16 = (precision or decode_precision()) == "bfloat16"
    low = bfloat16 and rows >= LOWP_MIN_ROWS
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, inner.layers[0].self_attn.head_dim
    qk = (heads + kv_heads) * dim
    x = inner.embed_tokens(tokens)
    freqs = positions[:, None].float() * inner.rotary_emb.inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]  # (rows, 1, dim): one row of each for every head
    for layer, cached in zip(inner.layers, cache.layers):
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        qkv = products(h, [attn.q_proj, attn.k_proj, attn.v_proj], low)
        rotated = rotate(qkv[:, :qk].view(rows, heads + kv_heads, dim), cos, sin)
        out = attend(rotated[:, :heads], rotated[:, heads:], qkv[:, qk:].view(rows, kv_heads, dim), cached, attn)
        x = x + products(out, [attn.o_proj], low)
        h = rms_norm(x, layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        gate_up = products(h, [mlp.gate_proj, mlp.up_proj], low)
        inter = mlp.gate_proj.out_features
        x = x + products(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], [mlp.down_proj], low)
    if keep is not None:
        x = x[-keep:]
        low = bfloat16 and keep >= LOWP_MIN_ROWS
    x = rms_norm(x, inner.norm.weight, inner.norm.variance_epsilon)
    return products(x, [model.lm_head], low)
