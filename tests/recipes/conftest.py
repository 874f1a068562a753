"""Fixtures the online RL recipe tests share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kill_and_resume():
    """kill_and_resume(recipe, full_yaml, killed_yaml, killed_dir): run `alignkit train RECIPE` on
    full_yaml to the end; run it on killed_yaml, SIGKILL it (no clean-up) once its step-2 checkpoint
    exists, and resume killed_dir with --resume. Each run is a fresh process."""

    def run(recipe: str, full_yaml: Path, killed_yaml: Path, killed_dir: Path) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
        cmd = [sys.executable, "-m", "alignkit.cli", "train", recipe]
        done = subprocess.run(cmd + ["--config", str(full_yaml)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        proc = subprocess.Popen(cmd + ["--config", str(killed_yaml)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt = killed_dir / "checkpoints" / "step-000002" / "trainer_state.json"
        deadline = time.time() + 240
        while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL and ckpt.exists()  # killed mid-run, not after finishing
        resumed = subprocess.run(cmd + ["--resume", str(killed_dir)], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "resuming at step" in resumed.stdout

    return run


@pytest.fixture(scope="session")
def peaky_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with its (tied) embeddings scaled up 4x. At the default init its logits all lie
    within about +-0.6 of each other, so no adapter could move its output distribution far enough for
    a reward to show; scaled up, sampling is still diverse but learnable."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(4.0)
    out = tmp_path_factory.mktemp("peaky") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture()
def reward_config(tmp_path, tiny_model_dir, pair_files):
    """make(recipe_keys, **overrides) -> RewardConfig on the tiny model and the synthetic pair files,
    written to YAML and loaded back as a user's config file is."""
    import yaml

    from alignkit.config import RewardConfig, load_config

    def make(recipe: dict, **over):
        train, held = pair_files
        cfg = {"model": str(tiny_model_dir), "data": {"train": str(train), "eval": str(held), "max_length": 64},
               "output_dir": str(tmp_path / "runs"), "device": "cpu", "seed": 0, **recipe, **over}
        path = tmp_path / "reward.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return load_config(RewardConfig, path)
    return make
