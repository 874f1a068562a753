"""Which examples each process trains on at each optimizer step, fixed by (seed, step) alone.

Because the global batch of a step never depends on the number of processes or on where a run
was resumed, 1 process x k accumulation steps and k processes x 1 step see the same examples,
and a resumed run sees what the uninterrupted one saw.
"""

from __future__ import annotations

import torch


def global_batch(step: int, n_examples: int, global_size: int, steps_per_epoch: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: a fresh permutation per epoch, seeded by seed + epoch."""
    epoch, k = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[k * global_size:(k + 1) * global_size].tolist()


def my_micro_batches(indices: list[int], micro: int, accum: int, rank: int) -> list[list[int]]:
    """This process's `accum` micro-batches of the global batch (process r takes chunks r*accum ...)."""
    chunks = [indices[i:i + micro] for i in range(0, len(indices), micro)]
    return chunks[rank * accum:(rank + 1) * accum]
