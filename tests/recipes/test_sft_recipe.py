"""SFT recipe invariances: training changes exactly the trainable weights, accumulation equals a
bigger batch, a SIGKILLed run resumes onto the uninterrupted trajectory, and two processes equal
one with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.config import SFTConfig, load_config
from alignkit.models import attach_lora, load_model
from alignkit.recipes import sft

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp_path, model_dir, data, name="cfg.yaml", **over):
    cfg = {"model": str(model_dir), "data": {"train": str(data), "max_length": 64},
           "output_dir": str(tmp_path / "runs"), "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "learning_rate": 0.01, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 4,
           "save_every": 2, "device": "cpu", "seed": 0}
    for key, value in over.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run_dir):
    recs = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


def cli(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], env=env, capture_output=True,
                          text=True, **kw)


def test_lora_run_changes_every_adapter_weight_and_nothing_else(tmp_path, tiny_model_dir, sft_file):
    cfg = load_config(SFTConfig, write_config(tmp_path, tiny_model_dir, sft_file, run_name="smoke",
                                              lora__dropout=0.1, data__eval=str(sft_file)))
    run_dir = sft.main(cfg)
    trained = load_file(run_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert trained and all("lora_" in k for k in trained)  # only adapter weights were trainable
    torch.manual_seed(cfg.seed)  # the recipe's initialisation, replayed
    base, _ = load_model(str(tiny_model_dir), device="cpu")
    init = {n: p.detach() for n, p in attach_lora(base, r=4, alpha=8, dropout=0.1).named_parameters()
            if p.requires_grad}
    assert set(init) == set(trained)
    unchanged = [k for k in trained if torch.equal(trained[k], init[k])]
    assert unchanged == []
    final, _ = load_model(str(run_dir / "final"), device="cpu")
    assert final.alignkit_base == str(tiny_model_dir)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert records[0] == {"step": 0, "eval_loss": records[0]["eval_loss"]}  # eval before training
    assert records[-1]["eval_loss"] < records[0]["eval_loss"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["lora"]["dropout"] == 0.1 and saved["max_steps"] == 4


def test_full_finetuning_changes_every_weight(tmp_path, tiny_model_dir, sft_file):
    cfg = load_config(SFTConfig, write_config(tmp_path, tiny_model_dir, sft_file, run_name="full",
                                              lora__enabled=False, max_steps=2, learning_rate=1e-3))
    run_dir = sft.main(cfg)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run_dir / "final" / "model.safetensors")
    assert set(before) == set(after)
    assert [k for k in before if torch.equal(before[k], after[k])] == []


def test_accumulation_equals_bigger_batch(tmp_path, tiny_model_dir, sft_file):
    one = sft.main(load_config(SFTConfig, write_config(tmp_path, tiny_model_dir, sft_file, run_name="b4")))
    two = sft.main(load_config(SFTConfig, write_config(tmp_path, tiny_model_dir, sft_file, run_name="b2x2",
                                                       micro_batch_size=2, grad_accum=2)))
    assert losses(one) == pytest.approx(losses(two), rel=1e-5)
    a = load_file(one / "final" / "adapter_model.safetensors")
    b = load_file(two / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_sigkill_and_resume_reproduces_uninterrupted_run(tmp_path, tiny_model_dir, sft_file):
    # Dropout > 0 so that an RNG state not restored on resume would show up in the losses.
    common = dict(max_steps=40, save_every=5, lora__dropout=0.1, micro_batch_size=8, data__max_length=128)
    full = write_config(tmp_path, tiny_model_dir, sft_file, "full.yaml", run_name="full", **common)
    killed = write_config(tmp_path, tiny_model_dir, sft_file, "killed.yaml", run_name="killed", **common)
    done = cli("train", "sft", "--config", str(full))
    assert done.returncode == 0, done.stderr

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", "train", "sft", "--config", str(killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step-000010").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "runs" / "killed" / "final").exists()
    interrupted_at = len(losses(tmp_path / "runs" / "killed"))
    assert interrupted_at < 40

    resumed = cli("train", "sft", "--resume", str(tmp_path / "runs" / "killed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    assert losses(tmp_path / "runs" / "killed") == losses(tmp_path / "runs" / "full")
    a = load_file(tmp_path / "runs" / "full" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "killed" / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one_with_same_global_batch(tmp_path, tiny_model_dir, sft_file, launch_two):
    one = write_config(tmp_path, tiny_model_dir, sft_file, "one.yaml", run_name="one",
                       micro_batch_size=2, grad_accum=2, max_steps=3)
    two = write_config(tmp_path, tiny_model_dir, sft_file, "two.yaml", run_name="two",
                       micro_batch_size=2, grad_accum=1, max_steps=3)
    r1 = cli("train", "sft", "--config", str(one))
    assert r1.returncode == 0, r1.stderr
    r2 = launch_two("train", "sft", "--config", str(two))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "(2 process(es))" in r2.stdout
    assert losses(tmp_path / "runs" / "one") == pytest.approx(losses(tmp_path / "runs" / "two"), rel=1e-5)
    a = load_file(tmp_path / "runs" / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "two" / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
