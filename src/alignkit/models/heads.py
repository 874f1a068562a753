"""A scalar head (value or reward) on a causal-LM backbone, saved and loaded with safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignkit.io import atomic_dir
from alignkit.models.loading import load_model
from alignkit.models.shared_prefix import PrefixSplit, forward_shared, split_shared_prefix

HEAD_FILE = "scalar_head.safetensors"


def scalar_head(hidden: int) -> nn.Linear:
    """A fresh hidden -> 1 linear head; small init so first scores are near zero and do not swamp
    the first updates."""
    head = nn.Linear(hidden, 1)
    nn.init.normal_(head.weight, std=1.0 / (hidden + 1) ** 0.5)
    nn.init.zeros_(head.bias)
    return head


class ScalarHeadModel(nn.Module):
    """Backbone hidden states -> one scalar per token (`forward`) or per sequence (`score`).

    The backbone is the causal LM's decoder (no vocabulary projection is computed); it may carry a
    LoRA adapter, so a value head and a policy can share one set of base weights.
    """

    def __init__(self, causal_lm, head: nn.Linear | None = None):
        super().__init__()
        self.causal_lm = causal_lm
        hidden = causal_lm.config.hidden_size
        if head is None:
            head = scalar_head(hidden)
        param = next(causal_lm.parameters())
        self.head = head.to(device=param.device, dtype=torch.float32)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, per_token: bool = True,
                split: PrefixSplit | None = None) -> torch.Tensor:
        """Per-token scalars (B, T), or with per_token=False the scalar at each sequence's last real
        token (B,), for left or right padding. (One entry point, so DDP-wrapped training works.)
        With `split` (rows cut by models.shared_prefix.split_shared_prefix) the rows are read with their shared
        prefixes run once, and per_token=False is required: the scalars of the prefix are not computed."""
        decoder = self.causal_lm.get_decoder()
        if split is not None:
            if per_token:
                raise ValueError("a shared-prefix pass gives the scalar at each row's last token only (per_token=False)")
            hidden = forward_shared(decoder, split).last_hidden_state[:, -1]  # tails are left-padded
            return self.head(hidden.float()).squeeze(-1)
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        values = self.head(hidden.float()).squeeze(-1)  # (B, T)
        if per_token:
            return values
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(dim=1)
        return values.gather(1, last[:, None]).squeeze(1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The scalar at each sequence's last real token, shape (B,)."""
        return self(input_ids, attention_mask, per_token=False)

    @torch.no_grad()
    def score_texts(self, tokenizer, prompts: list[str], completions: list[str], *, batch_size: int = 16,
                    max_length: int = 512, progress: bool = False) -> list[float]:
        """Score (prompt, completion) pairs as a policy would produce them (chat template + EOS)."""
        from tqdm.auto import tqdm

        from alignkit.data.prefs import encode_response
        from alignkit.models.generation import left_pad

        device = next(self.parameters()).device
        seqs = [encode_response(tokenizer, p, c, max_length) for p, c in zip(prompts, completions)]
        # Similar lengths batch together, and the replies to one prompt sit side by side, so a batch
        # reads each shared prompt once (models.shared_prefix) when several replies to it are scored.
        mean_len: dict[str, list[int]] = {}
        for p, s in zip(prompts, seqs):
            mean_len.setdefault(p, []).append(len(s))
        order = sorted(range(len(seqs)), key=lambda i: (sum(mean_len[prompts[i]]) / len(mean_len[prompts[i]]),
                                                        prompts[i], len(seqs[i])))
        scores = [0.0] * len(seqs)
        for start in tqdm(range(0, len(seqs), batch_size), desc="scoring", disable=not progress, unit="batch"):
            rows = order[start:start + batch_size]
            batch = [seqs[i] for i in rows]
            split = split_shared_prefix(batch, [prompts[i] for i in rows], [len(s) - 1 for s in batch],
                                        tokenizer.pad_token_id, device)
            if split is not None:
                values = self(None, None, per_token=False, split=split)
            else:
                values = self.score(*left_pad(batch, tokenizer.pad_token_id, device))
            for i, value in zip(rows, values.float().cpu().tolist()):
                scores[i] = value
        return scores

    def save_pretrained(self, out_dir: Path, tokenizer) -> Path:
        """Backbone (adapter or full weights) plus the head in safetensors, atomically."""
        from alignkit.models.lora import write_model

        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            write_model(self.causal_lm, tokenizer, tmp, {"head": {"hidden_size": self.head.in_features}})
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, tmp / HEAD_FILE)
        return out_dir

    @classmethod
    def from_pretrained(cls, path: Path, *, device: str = "auto", dtype: str = "auto",
                        trainable_adapter: bool = False):
        """Load (ScalarHeadModel, tokenizer) saved by `save_pretrained`."""
        path = Path(path)
        causal_lm, tokenizer = load_model(str(path), device=device, dtype=dtype,
                                          trainable_adapter=trainable_adapter)
        state = load_file(path / HEAD_FILE)
        head = nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return cls(causal_lm, head), tokenizer


def is_reward_model(path: Path) -> bool:
    """A directory holding a reward model saved by alignkit: a scalar head, or a frozen backbone's pooled head."""
    from alignkit.models.pooled_head import is_pooled_head

    return (Path(path) / HEAD_FILE).is_file() or is_pooled_head(path)


def load_reward_model(path: Path, *, device: str = "auto"):
    """(model, tokenizer) of either kind of reward model; both score with `score_texts`."""
    from alignkit.models.pooled_head import PooledHeadModel, is_pooled_head

    if is_pooled_head(path):
        return PooledHeadModel.from_pretrained(path, device=device)
    return ScalarHeadModel.from_pretrained(path, device=device)
