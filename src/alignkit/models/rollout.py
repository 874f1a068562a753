"""The rollout engine: batched generation from the engine's own copy of a policy's weights.

Every generation in alignkit runs here (RL rollouts, `prefs sample`, `eval`, `generate`, `chat`,
agents, RAG): a forward loop over transformers' `StaticCache` (no per-token growth of the cache),
the LM head on the last position only, finished rows dropped from the batch, decode-sized matrix
products in the form the CPU runs fastest (`alignkit.models.cpu_linear`: the orientation, and
bfloat16 on CPUs with AMX), and a sampler that
draws each row from its own seed (`alignkit.models.sampling`), so a row's tokens do not depend on
which rows share its batch.

The engine's weights are a generation copy of the policy: a LoRA policy is merged (W + (alpha/r) B A)
into new tensors of the copy while the frozen base tensors are shared, never merging the training
weights in place; `sync(policy)` refreshes the copy after an optimizer step.
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable, Sequence

import torch

from alignkit.models import llama_decode
from alignkit.models.cpu_linear import is_frozen_product_patch, refresh_low_precision, rows_first_linears
from alignkit.models.generation import Generation, Prompt, eos_ids, left_pad, render_prompt
from alignkit.models.sampling import row_seeds, sample, uniforms

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OnStep = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def plain_model(model):
    """The transformers model under a peft wrapper (LoRA layers still injected), or the model itself."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def lora_layers(model) -> dict:
    """name -> peft LoRA layer, for every LoRA-wrapped module of `model`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in plain_model(model).named_modules() if isinstance(m, LoraLayer)}


def merged_weight(layer, out: torch.Tensor | None = None) -> torch.Tensor:
    """W + sum over active adapters of (alpha/r) B A, written into `out` (a new tensor when None); W alone
    while adapters are disabled or already merged into W. The layer's own weights are left untouched.
    The same bits as PEFT's own merge (`merge()`: the product B A, scaled, added to W), with one
    temporary of W's size per adapter rather than three, and no copy of W beside it."""
    base = layer.get_base_layer()
    if getattr(layer, "lora_variant", None) and any(a in layer.lora_variant for a in layer.active_adapters):
        raise NotImplementedError("the rollout engine merges plain LoRA only (no DoRA or other variants)")
    weight = base.weight.detach()
    out = torch.empty_like(weight) if out is None else out
    adapters = [] if layer.disable_adapters or layer.merged else [a for a in layer.active_adapters if a in layer.lora_A]
    if not adapters:
        return out.copy_(weight)
    for i, adapter in enumerate(adapters):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if layer.fan_in_fan_out or not (A.dtype == B.dtype == weight.dtype == torch.float32):
            # PEFT's own for other layouts and dtypes (it multiplies half-precision factors in float32 on a
            # CPU); added as PEFT's merge adds it, in the wider of the two dtypes and rounded once into `out`
            delta = layer.get_delta_weight(adapter)
        else:
            delta = torch.mm(B, A)  # get_delta_weight's B @ A * scaling, in place
            if layer.scaling[adapter] != 1:
                delta.mul_(layer.scaling[adapter])
        torch.add(weight if i == 0 else out, delta, out=out)
    return out


@torch.inference_mode()
def generation_copy(policy) -> torch.nn.Module:
    """A plain transformers model for generation: LoRA layers replaced by ordinary layers holding the
    merged weight (new tensors), trainable tensors cloned, frozen tensors and buffers shared."""
    base = plain_model(policy)
    shared = {id(t): t for t in [*base.parameters(), *base.buffers()] if not t.requires_grad}
    for m in base.modules():  # kept bfloat16 weight copies (models.cpu_linear) serve both models
        for key in ("_bf16_weight", "_bf16_fused"):
            if key in m.__dict__:
                shared[id(m.__dict__[key])] = m.__dict__[key]
    gen = copy.deepcopy(base, shared)
    for m in gen.modules():  # a trainer's bfloat16 product patch: the copy decodes through cpu_linear
        if is_frozen_product_patch(m):
            del m.forward
    for name, layer in lora_layers(gen).items():
        parent, _, child = name.rpartition(".")
        plain = layer.get_base_layer()  # the copy's own module, still holding the shared base weight
        plain.weight = torch.nn.Parameter(merged_weight(layer), requires_grad=False)
        setattr(gen.get_submodule(parent) if parent else gen, child, plain)
    gen.requires_grad_(False)
    return gen.eval()


def weights_version(model) -> tuple:
    """Changes whenever a trainable tensor is written in place (optimizer step, load_state_dict) or an
    adapter is switched on or off: the cue for a cached engine to re-sync."""
    layers = lora_layers(model)
    return (tuple(p._version for p in plain_model(model).parameters() if p.requires_grad),
            tuple((m.disable_adapters, m.merged, tuple(m.active_adapters)) for m in layers.values()))


def encode_prompts(tokenizer, prompts: Sequence[Prompt | list[int]], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: lists of ints are taken as already tokenized; strings and chat message
    lists are rendered (chat template when there is one) and tokenized."""
    if isinstance(prompts, (str, dict)):
        raise TypeError("prompts must be a list of prompts")
    out = []
    # A chat template already holds its special tokens; a plain prompt gets the model's usual ones.
    with_template = chat and tokenizer.chat_template is not None
    for p in prompts:
        if isinstance(p, list) and p and isinstance(p[0], int):
            out.append(list(p))
        else:
            out.append(tokenizer(render_prompt(tokenizer, p, chat), add_special_tokens=not with_template)["input_ids"])
    return out


class RolloutEngine:
    """Fast batched generation for a causal LM, from the engine's own copy of the weights.

    engine = RolloutEngine(policy, tokenizer); gen = engine.generate(prompts, n=4, temperature=1.0, seed=...)
    ... optimizer step on the policy ...; engine.sync(policy)

    `copy_weights=False` generates straight from a plain (non-peft) model's own tensors instead of a
    copy, so it always sees the current weights (what `alignkit.models.generate` does for plain models).
    """

    lean_decode = True
    """Decode steps of supported models (Llama architecture on the CPU) through `models.llama_decode`
    rather than transformers' forward; False on an engine (or the class) keeps transformers' forward."""

    def __init__(self, model, tokenizer, *, copy_weights: bool = True):
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.eos = eos_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.owns_copy = copy_weights or isinstance(model, PeftModel)
        self.model = generation_copy(model) if self.owns_copy else model
        self._source = weakref.ref(plain_model(model))
        self.version = weights_version(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()  # the copy may hold inference tensors (built inside inference mode)
    def sync(self, policy) -> None:
        """Copy the policy's current weights (base + LoRA merged) into the engine's generation copy."""
        base = plain_model(policy)
        self.version = weights_version(policy)
        if not self.owns_copy and base is self.model:
            return
        if self._source() is not base:  # another model: build a new copy rather than write into shared tensors
            self.model, self._source = generation_copy(policy), weakref.ref(base)
            return
        modules = dict(self.model.named_modules())
        layers = lora_layers(base)
        for name, layer in layers.items():
            merged_weight(layer, out=modules[name].weight)
            refresh_low_precision(modules[name])  # its bfloat16 copy, if any, held the old weight (cpu_linear)
        source = {n.replace(".base_layer.", "."): p for n, p in base.named_parameters() if ".lora_" not in n}
        merged = {f"{name}.weight" for name in layers}
        for name, p in self.model.named_parameters():
            if name not in merged and p is not source[name]:
                p.copy_(source[name])
                refresh_low_precision(modules[name.rpartition(".")[0]])

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt | list[int]], *, n: int = 1, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | list[int] | None = None, return_logprobs: bool = False, chat: bool = True,
                 batch_size: int | None = None, progress: str | None = None, streamer=None,
                 logits_processor: LogitsProcessor | None = None, on_step: OnStep | None = None,
                 min_new_tokens: int = 0) -> Generation:
        """Complete each prompt `n` times; rows are prompt-major (prompt i's completions are rows
        i*n .. i*n+n-1) and `prompt_ids` has one entry per row.

        prompts: strings, chat message lists, or token id lists. temperature 0 is greedy; otherwise
        softmax(logits / temperature) with optional top-k, then top-p, filtering. seed: an int (row r
        draws from a stream seeded by (seed, r)), one int per row, or None (drawn from torch's global
        generator); a row's tokens depend only on its seed and the weights, never on the other rows.
        return_logprobs: per new token, log p under the engine's weights at the sampling temperature,
        without top-k/top-p or `logits_processor`. batch_size: rows decoded at once (default all),
        grouped by prompt length to limit padding; `progress` names a progress bar over the batches.
        streamer: a transformers streamer (batch of one row only).
        logits_processor(input_ids, scores) -> scores: applied to the raw (B, V) scores before
        sampling; input_ids (B, T) holds each row's prompt and the tokens generated so far, padded with
        the pad token (on the left of each prompt's part after the prefix all rows of the batch share).
        min_new_tokens: EOS is banned (its scores set to -inf) for each row's first `min_new_tokens` new
        tokens, as transformers' `min_new_tokens` does; min_new_tokens = max_new_tokens gives completions
        of a fixed length (benchmarks). Like `logits_processor`, it changes the draw, not `logprobs`.
        on_step(step, tokens, finished): called after every step with each row's new token (B,) (the
        pad token for rows already done) and the finished mask (B,), over the rows of the batch being
        decoded (all rows when batch_size is None); a returned bool mask ends those rows, keeping the
        token of that step (`finished` stays True only for rows that ended with EOS).
        """
        if n < 1 or max_new_tokens < 0 or min_new_tokens < 0:
            raise ValueError("n must be >= 1, max_new_tokens >= 0 and min_new_tokens >= 0")
        unique = encode_prompts(self.tokenizer, prompts, chat)
        prompt_ids = [ids for ids in unique for _ in range(n)]
        seeds = row_seeds(seed, len(prompt_ids))
        out = Generation(prompt_ids=prompt_ids, tokens=[[] for _ in prompt_ids], texts=[""] * len(prompt_ids),
                         finished=[False] * len(prompt_ids), logprobs=[] if return_logprobs else None)
        if not prompt_ids:
            return out
        if streamer is not None and len(prompt_ids) > 1:
            raise ValueError("a streamer needs a batch of one row")
        size = batch_size or len(prompt_ids)
        # Group rows by prompt length so that batches carry little padding; rows are independent.
        order = list(range(len(prompt_ids)))
        if size < len(prompt_ids):
            order.sort(key=lambda r: len(prompt_ids[r]))
        from tqdm.auto import tqdm

        lps: dict[int, torch.Tensor] = {}
        with rows_first_linears(self.model):  # decode-sized products in the CPU's faster orientation
            for start in tqdm(range(0, len(order), size), desc=progress, unit="batch", disable=progress is None):
                rows = order[start:start + size]
                tokens, finished, logprobs = self._decode(
                    [prompt_ids[r] for r in rows], seeds[rows], max_new_tokens, temperature, top_p, top_k,
                    return_logprobs, streamer, logits_processor, on_step, min_new_tokens)
                for i, r in enumerate(rows):
                    out.tokens[r], out.finished[r] = tokens[i], finished[i]
                    if return_logprobs:
                        lps[r] = logprobs[i]
        out.texts = [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in out.tokens]
        if return_logprobs:
            out.logprobs = [lps[r] for r in range(len(prompt_ids))]
        return out

    def _decode(self, prompts: list[list[int]], seeds: torch.Tensor, max_new_tokens: int, temperature: float,
                top_p: float, top_k: int, return_logprobs: bool, streamer, logits_processor, on_step,
                min_new_tokens: int = 0):
        """One batch: prefill the prompts into a static cache, then one token per step for the rows
        still running. The prompts' common prefix (a system prompt, few-shot examples) is computed once
        and each distinct prompt's rest once (rows repeating a prompt, as with n > 1, copy its cache rows).

        Cache columns: [0, k) the common prefix, [k, P) the rest of each prompt, left-padded, then the
        new tokens; positions follow the attention mask, so the padding between changes nothing."""
        model, device = self.model, self.device
        B = len(prompts)
        firsts = [i for i in range(B) if i == 0 or prompts[i] != prompts[i - 1]]
        counts = torch.tensor([b - a for a, b in zip(firsts, firsts[1:] + [B])], device=device)
        unique = [prompts[i] for i in firsts]
        k = common_prefix_length(unique) if len(unique) > 1 else 0
        rest, rest_mask = left_pad([u[k:] for u in unique], self.pad_id, device)
        prefix = torch.tensor([unique[0][:k]], dtype=torch.long, device=device).expand(len(unique), k)
        ids = torch.cat([prefix, rest], dim=1)
        mask = torch.cat([torch.ones_like(prefix), rest_mask], dim=1)
        P = ids.shape[1]
        total = P + max_new_tokens
        attn = torch.zeros((len(unique), total), dtype=torch.long, device=device)
        attn[:, :P] = mask
        if streamer is not None:
            streamer.put(ids.cpu())
        lp = torch.zeros((B, max_new_tokens), dtype=torch.float32)
        if max_new_tokens == 0:
            return [[] for _ in prompts], [False] * B, [lp[i, :0] for i in range(B)]
        cache = filled_static_cache(model.config, total)
        if k:
            model.get_decoder()(input_ids=prefix[:1], position_ids=torch.arange(k, device=device)[None],
                                past_key_values=cache, use_cache=True)  # no LM head: the prefix needs no logits
            select_cache_rows(cache, torch.zeros(len(unique), dtype=torch.long, device=device))
        positions = k + (rest_mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=rest, attention_mask=attn[:, :P], position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if len(firsts) < B:
            expand = torch.repeat_interleave(torch.arange(len(firsts), device=device), counts)
            logits, attn, mask = logits[expand], attn[expand], mask[expand]
            select_cache_rows(cache, expand)
        seq = torch.full((B, total), self.pad_id, dtype=torch.long, device=device)  # prompts + new tokens
        seq[:, :P] = ids if len(firsts) == B else ids[expand]
        next_pos = mask.sum(dim=1)  # each row's position of its first new token
        eos = torch.tensor(self.eos, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        ended_by_eos = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        rows = torch.arange(B, device=device)  # the batch rows held in the cache, in cache order
        lean = self.lean_decode and llama_decode.supports(model)  # one step written out (models.llama_decode)
        scale = temperature if temperature > 0 else 1.0
        for step in range(max_new_tokens):
            raw = logits.float()
            if logits_processor is not None:  # it sees every row of the batch, rows that are done included
                if len(rows) == B:  # no row has left the cache: hand over the scores themselves
                    scores = logits_processor(seq[:, :P + step], raw.clone() if return_logprobs else raw)
                else:
                    full = raw.new_zeros((B, raw.shape[1]))
                    full[rows] = raw
                    scores = logits_processor(seq[:, :P + step], full)[rows]
            else:
                scores = raw
            if step < min_new_tokens:  # ban EOS in place, on a copy when `raw` is still needed for logprobs
                if scores is raw and return_logprobs:
                    scores = raw.clone()
                scores[:, eos] = float("-inf")
            tok = sample(scores, uniforms(seeds[rows.cpu()], step).to(device), temperature, top_k, top_p)
            tok = torch.where(done[rows], self.pad_id, tok)
            if return_logprobs:
                scaled = raw / scale if scale != 1.0 else raw  # no (B, V) log-softmax written out, only its row
                lp[rows.cpu(), step] = (scaled.gather(1, tok[:, None]).squeeze(1) - scaled.logsumexp(dim=-1)).cpu()
            seq[rows, P + step] = tok
            lengths[rows] += (~done[rows]).long()
            hit_eos = torch.zeros_like(done)
            hit_eos[rows] = torch.isin(tok, eos) & ~done[rows]
            ended_by_eos |= hit_eos
            done |= hit_eos
            if streamer is not None:
                streamer.put(tok.cpu())
            if on_step is not None:
                stop = on_step(step, seq[:, P + step].clone(), done.clone())
                if stop is not None:
                    done |= stop.to(device=device, dtype=torch.bool)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            running = ~done[rows]
            if (~running).sum() * 4 >= len(rows):  # a quarter of the cache rows are done: drop them
                keep = running.nonzero().squeeze(1)
                rows, tok, attn, next_pos = rows[keep], tok[keep], attn[keep], next_pos[keep]
                select_cache_rows(cache, keep)
            attn[:, P + step] = 1
            # The decode step's mask over the filled cache columns, built here rather than by transformers
            # at every step.
            mask = attn[:, :P + step + 1].bool()
            if lean:
                logits = llama_decode.decode_step(model, tok, next_pos + step, mask, cache)
            else:
                logits = model(input_ids=tok[:, None], attention_mask=mask[:, None, None, :],
                               position_ids=(next_pos + step)[:, None], past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1]
        if streamer is not None:
            streamer.end()
        new = seq[:, P:].cpu()
        lengths, ended = lengths.tolist(), ended_by_eos.tolist()
        return ([new[i, :lengths[i]].tolist() for i in range(B)], ended,
                [lp[i, :lengths[i]].clone() for i in range(B)])


def filled_static_cache(config, max_len: int):
    """transformers' StaticCache (preallocated, written in place) whose full-attention layers hand
    attention only the columns filled so far, not all `max_len` of them."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    class FilledStaticLayer(StaticLayer):
        filled = 0

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            self.filled += key_states.shape[-2]
            return keys[:, :, :self.filled], values[:, :, :self.filled]

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.filled + query_length, 0

        def append_block(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Write keys and values (rows, heads, positions, dim) into the next columns, as `update`
            would, and return the filled columns (models.llama_decode)."""
            n = key.shape[2]
            self.keys[:, :, self.filled:self.filled + n] = key
            self.values[:, :, self.filled:self.filled + n] = value
            self.cumulative_length.add_(n)
            self.filled += n
            return self.keys[:, :, :self.filled], self.values[:, :, :self.filled]

    cache = StaticCache(config=config, max_cache_len=max_len)
    cache.layers = [FilledStaticLayer(max_cache_len=max_len) if type(layer) is StaticLayer else layer
                    for layer in cache.layers]
    return cache


def common_prefix_length(rows: list[list[int]]) -> int:
    """Tokens every row starts with, leaving at least one token of each row after the prefix."""
    k = min(len(r) for r in rows) - 1
    for i in range(max(k, 0)):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return max(k, 0)


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep (or repeat) the batch rows `index` of every layer of a static cache."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        layer.batch_size = len(index)


_ENGINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def engine_for(model, tokenizer) -> RolloutEngine:
    """The engine `alignkit.models.generate` uses for `model`: a plain model generates from its own
    tensors (a fresh, cheap engine each call); a peft model gets a merged copy, cached per model object
    (weakly) and re-synced whenever its trainable weights or active adapters changed."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return RolloutEngine(model, tokenizer, copy_weights=False)
    engine = _ENGINES.get(model)
    if engine is None or engine.tokenizer is not tokenizer:
        engine = _ENGINES[model] = RolloutEngine(model, tokenizer)
    elif engine.version != weights_version(model):
        engine.sync(model)
    return engine
