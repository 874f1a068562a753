"""Forward passes that read a shared prefix once: rows that begin with the same tokens (a GRPO group's
completions of one prompt; the chosen and rejected replies of a pair) run the prefix as one row,
its key/value cache is copied to every row of the group, and only each row's own tail is run.

The outputs at the tail positions equal a plain forward pass over the whole rows (same positions,
same attention) up to float rounding, and gradients flow through the copied cache into the prefix
pass, so training may use it. On the demo's GRPO batches (8 prompts x 4 completions, prompts of about
65 tokens and replies of 30 to 48) it removes about half of the tokens a forward pass reads.

    split = split_shared_prefix(rows, groups, need_from, pad_id, device)  # None: nothing to share
    out = forward_shared(model, split, logits_to_keep=k)                  # outputs over split.tail_ids
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.models.generation import left_pad
from alignkit.models.rollout import common_prefix_length


NO_LOGITS = torch.empty(0, dtype=torch.long)  # logits_to_keep selecting no position


@dataclass
class PrefixSplit:
    """Rows cut into a per-group prefix and a per-row tail, both left-padded."""

    prefix_ids: torch.Tensor   # (G, Wp)
    prefix_mask: torch.Tensor  # (G, Wp)
    prefix_len: torch.Tensor   # (G,)
    row_group: torch.Tensor    # (B,) index into the G prefixes
    tail_ids: torch.Tensor     # (B, Wt); a row's last token is in the last column
    tail_mask: torch.Tensor    # (B, Wt)
    tail_pos: torch.Tensor     # (B, Wt) each tail column's position in its whole row; -1 on padding

    def select(self, rows: torch.Tensor) -> PrefixSplit:
        """The split of a subset of the rows (a minibatch), keeping only the prefixes they use."""
        used, row_group = torch.unique(self.row_group[rows], return_inverse=True)
        return PrefixSplit(self.prefix_ids[used], self.prefix_mask[used], self.prefix_len[used], row_group,
                           self.tail_ids[rows], self.tail_mask[rows], self.tail_pos[rows])


def split_shared_prefix(rows: list[list[int]], groups: list, need_from: list[int], pad_id: int, device,
                        min_saving: float = 0.1) -> PrefixSplit | None:
    """Cut `rows` (token lists) so that rows with the same `groups` key share one prefix: their common
    leading tokens, but never past `need_from[i]`, the first position of row i whose output the caller
    needs (e.g. the last prompt token, whose logits predict the first reply token). None when sharing
    would save less than `min_saving` of the tokens (every group a single row, or short prefixes)."""
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    keys = list(members)
    cut = {g: min(common_prefix_length([rows[i] for i in members[g]]),
               *(min(need_from[i], len(rows[i]) - 1) for i in members[g])) for g in keys}
    saved = sum(cut[g] * (len(members[g]) - 1) for g in keys)
    if any(cut[g] < 1 for g in keys) or saved < min_saving * sum(map(len, rows)):
        return None
    prefix_ids, prefix_mask = left_pad([rows[members[g][0]][:cut[g]] for g in keys], pad_id, device)
    index = {g: k for k, g in enumerate(keys)}
    row_group = torch.tensor([index[g] for g in groups], device=device)
    tails = [row[cut[g]:] for row, g in zip(rows, groups)]
    tail_ids, tail_mask = left_pad(tails, pad_id, device)
    width = tail_ids.shape[1]
    tail_pos = torch.tensor([[-1] * (width - len(t)) + list(range(cut[g], cut[g] + len(t)))
                             for t, g in zip(tails, groups)], device=device)
    prefix_len = torch.tensor([cut[g] for g in keys], device=device)
    return PrefixSplit(prefix_ids, prefix_mask, prefix_len, row_group, tail_ids, tail_mask, tail_pos)


def forward_shared(model, split: PrefixSplit, **kwargs):
    """`model` (a causal LM, or its decoder) over the tails of `split`, after one pass over the prefixes
    whose key/value cache every row of a group reads. Returns the tail pass's output; `kwargs` go to
    it (logits_to_keep, output_hidden_states)."""
    prefix_pos = (split.prefix_mask.cumsum(dim=1) - 1).clamp(min=0)
    prefix_kwargs = {"logits_to_keep": NO_LOGITS} if "logits_to_keep" in kwargs else {}  # prefix logits are unused
    cache = model(input_ids=split.prefix_ids, attention_mask=split.prefix_mask, position_ids=prefix_pos,
                  use_cache=True, **prefix_kwargs).past_key_values
    repeat_cache_rows(cache, split.row_group)  # each row reads its group's prefix (differentiable)
    mask = torch.cat([split.prefix_mask[split.row_group], split.tail_mask], dim=1)
    return model(input_ids=split.tail_ids, attention_mask=mask, position_ids=split.tail_pos.clamp(min=0),
                 past_key_values=cache, use_cache=True, **kwargs)


def repeat_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along the first dimension, as a product with a one-hot matrix: the same values (each
    output row is one input row times 1, plus zeros), with a backward that sums each group's rows in
    the same order every time. Advanced indexing's backward (index_put_ with accumulate) adds rows in
    an order that varies from run to run across CPU threads, so two runs of one seed had gradients
    that parted in their sixth digit and training trajectories that parted after a few steps."""
    onehot = torch.nn.functional.one_hot(index, x.shape[0]).to(x.dtype)
    return (onehot @ x.reshape(x.shape[0], -1)).reshape(len(index), *x.shape[1:])


def repeat_cache_rows(cache, index: torch.Tensor) -> None:
    """`cache.batch_select_indices(index)` with `repeat_rows`, for transformers' dynamic cache layers
    (full and sliding-window attention); any other kind of layer keeps its own selection."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in cache.layers:
        if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.get_seq_length() > 0:
            layer.keys, layer.values = repeat_rows(layer.keys, index), repeat_rows(layer.values, index)
        else:
            layer.batch_select_indices(index)
