"""Token sampling for the rollout engine: per-row counter-based randomness and an inverse-CDF draw.

A row's random numbers come from its own seed and the step number only (splitmix64 on int64
tensors), so a row samples the same tokens whichever rows share its batch, and drawing costs one
uniform per row instead of `torch.multinomial`'s exponential noise over the whole vocabulary.
"""

from __future__ import annotations

import torch

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)
MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """The int64 whose two's-complement bits are the unsigned 64-bit `x`."""
    x &= MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


MIX1, MIX2, GOLDEN_S = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(GOLDEN)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors; `>>` is arithmetic in torch, so the high bits are masked
    to make it the logical shift; int64 multiplication wraps around."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * MIX1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_seeds(seed: int | list[int] | None, rows: int) -> torch.Tensor:
    """One int64 seed per row: a list is taken as is; an int seeds row r with splitmix64(seed, r);
    None draws them from torch's global generator (so `torch.manual_seed` still repeats a run)."""
    if seed is None:
        return torch.randint(-(1 << 62), 1 << 62, (rows,), dtype=torch.long)
    if isinstance(seed, int):
        base = torch.tensor(_signed(seed), dtype=torch.long)
        return _mix(base + (torch.arange(rows, dtype=torch.long) + 1) * GOLDEN_S)
    if len(seed) != rows:
        raise ValueError(f"seed has {len(seed)} entries for {rows} rows (one per row, n per prompt)")
    return torch.tensor([_signed(int(s)) for s in seed], dtype=torch.long)


def uniforms(seeds: torch.Tensor, step: int) -> torch.Tensor:
    """Uniform [0, 1) float64 per row: output `step` of the splitmix64 stream seeded with each row's seed."""
    x = _mix(seeds + _signed((step + 1) * GOLDEN))
    return ((x >> 11) & ((1 << 53) - 1)).double() * 2.0 ** -53


BLOCK = 256  # vocabulary entries per block of the two-level inverse CDF


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row the first index whose cumulative probability exceeds u * total.

    `probs` (B, V) need not be normalised; zero-probability entries are never chosen. Two levels, so
    no cumulative sum runs over the whole vocabulary: the sums of blocks of BLOCK entries pick a
    block (cumulated in float64), then a cumulative sum inside that block alone picks the entry.
    """
    rows, vocab = probs.shape
    n_blocks = -(-vocab // BLOCK)
    if n_blocks * BLOCK != vocab:
        probs = torch.nn.functional.pad(probs, (0, n_blocks * BLOCK - vocab))
    blocks = probs.view(rows, n_blocks, BLOCK)
    cdf = blocks.sum(dim=-1).double().cumsum(dim=-1)
    # u < 1, but u * total may round up to the total: stay strictly below it, so that the chosen
    # block (and below, the chosen entry) has a positive probability.
    total = cdf[:, -1]
    target = torch.minimum(u.double() * total, total * (1 - 2.0 ** -40))
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=n_blocks - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    inner = blocks[torch.arange(rows, device=probs.device), block].double().cumsum(dim=-1)
    rest = torch.minimum(target - before, inner[:, -1] * (1 - 2.0 ** -40))
    entry = torch.searchsorted(inner, rest[:, None], right=True).squeeze(1).clamp_(max=BLOCK - 1)
    return (block * BLOCK + entry).clamp_(max=vocab - 1)


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> torch.Tensor:
    """Token ids (B,) from raw `logits` (B, V): argmax at temperature 0, otherwise softmax(logits / T)
    restricted to the top_k tokens, then to the smallest set of most likely tokens holding top_p of the
    mass (the same filters, in the same order, as transformers' warpers), drawn with the uniforms `u`."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p >= 1.0:  # no sort of the vocabulary, and no normalisation: draw() takes unnormalised weights
        return draw((scores - scores.amax(dim=-1, keepdim=True)).exp_(), u)
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_scores, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p, 0.0)  # the first token always stays (mass before it is 0)
    return order.gather(1, draw(probs, u).unsqueeze(1)).squeeze(1)
