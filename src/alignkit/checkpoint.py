"""Training checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG, data position."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.io import atomic_dir

STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once, so the file holds each tensor once.
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_dir: Path, *, model, optimizer, scheduler, rng_states: list[dict],
                    state: dict, keep: int) -> None:
    """Write one checkpoint directory atomically, then delete all but the newest `keep`."""
    with atomic_dir(ckpt_dir) as tmp:
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_states, tmp / "rng_states.pt")  # one per process
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    for old in list_checkpoints(ckpt_dir.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(parent: Path) -> list[Path]:
    """Complete checkpoints, oldest first (incomplete ones never get their final name)."""
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.glob("step-*") if (p / STATE_FILE).is_file())


def load_checkpoint(ckpt_dir: Path, *, model, optimizer, scheduler, rank: int) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the trainer state (step, ...)."""
    weights = load_file(ckpt_dir / "trainable.safetensors")
    expected = set(trainable_state(model))
    if set(weights) != expected:
        missing = sorted(expected - set(weights))[:3]
        raise RuntimeError(f"{ckpt_dir}: checkpoint does not match the model (missing {missing}); "
                           "was the config changed since the run started?")
    model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=False))
    rng_states = torch.load(ckpt_dir / "rng_states.pt", weights_only=False)
    set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    return json.loads((ckpt_dir / STATE_FILE).read_text())
