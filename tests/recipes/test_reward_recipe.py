"""Reward-model recipe: learns a held-out preference, and resumes exactly from a checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import RewardConfig, load_config
from alignkit.models import ScalarHeadModel
from alignkit.recipes import reward

LORA = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "learning_rate": 3e-3, "micro_batch_size": 8,
        "max_steps": 36, "save_every": 12, "keep_checkpoints": 5, "lr_scheduler": "constant"}


def test_reward_model_reaches_held_out_accuracy(pair_files, reward_config):
    run_dir = reward.main(reward_config(LORA, run_name="rm"))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], records[-1]
    assert before["step"] == 0 and after["step"] == 36
    assert after["eval_accuracy"] >= 0.9, after
    assert after["eval_loss"] < before["eval_loss"]
    # The saved model gives the same held-out ranking when loaded back.
    model, tok = ScalarHeadModel.from_pretrained(run_dir / "final", device="cpu")
    from alignkit.data.prefs import encode_response
    from alignkit.models.generation import left_pad

    held = [json.loads(l) for l in pair_files[1].read_text().splitlines()]
    seqs = [encode_response(tok, p["prompt"], p["chosen"], 64) for p in held] + \
           [encode_response(tok, p["prompt"], p["rejected"], 64) for p in held]
    ids, mask = left_pad(seqs, tok.pad_token_id, "cpu")
    with torch.no_grad():
        s = model.score(ids, mask)
    acc = (s[:len(held)] > s[len(held):]).float().mean().item()
    assert acc == pytest.approx(after["eval_accuracy"])


def test_resume_from_checkpoint_repeats_the_run(tmp_path, reward_config):
    full = reward.main(reward_config(LORA, run_name="full", max_steps=6,
                              save_every=3, lora={"r": 4, "alpha": 8, "dropout": 0.1}))
    # A run that died after step 3: its config, its step-3 checkpoint and metrics up to step 3.
    cut = tmp_path / "runs" / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    shutil.copytree(full / "checkpoints" / "step-000003", cut / "checkpoints" / "step-000003")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n{\"step\": 4, \"lo")  # torn last line
    cfg = load_config(RewardConfig, cut / "config.yaml")
    reward.main(cfg, resume=cut)
    assert (cut / "metrics.jsonl").read_text() .count("\n") == len(lines)
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in ls]
    assert strip((cut / "metrics.jsonl").read_text().splitlines()) == strip(lines)
    a = load_file(full / "checkpoints" / "step-000006" / "trainable.safetensors")
    b = load_file(cut / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert set(a) == set(b) and any(k.startswith("head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_soft_labels_use_each_pairs_probability(tiny):
    """With soft_labels the per-pair loss is the soft Bradley-Terry loss at the pair's p_chosen (a
    pair without one counts as p = 1, the hard loss); without, p_chosen is ignored."""
    from alignkit.losses.reward import bradley_terry_loss, soft_bradley_terry_loss

    base, tok = tiny
    torch.manual_seed(0)
    rm = ScalarHeadModel(base)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    pairs = [{"prompt": "Hi", "chosen": "Hello, how can I help?", "rejected": "Go away.", "p_chosen": 0.7},
             {"prompt": "Where is my order?", "chosen": "It ships today.", "rejected": "No idea."}]
    batch = reward.encode_pairs(tok, pairs, 64, use_margin=True)
    with torch.no_grad():
        rc, rr = reward.pair_scores(rm, batch, tok.pad_token_id, "cpu")
        soft, margin = reward.pair_terms(rm, batch, tok.pad_token_id, "cpu", 0.0, soft_labels=True)
        hard, _ = reward.pair_terms(rm, batch, tok.pad_token_id, "cpu", 0.0)
    assert torch.allclose(soft, soft_bradley_terry_loss(rc, rr, torch.tensor([0.7, 1.0])))
    assert torch.allclose(hard, bradley_terry_loss(rc, rr)) and torch.allclose(margin, rc - rr)
    assert soft[1] == pytest.approx(hard[1].item()) and soft[0] != pytest.approx(hard[0].item())


def test_split_by_prompt_holds_out_whole_prompts():
    """10 prompts x 3 pairs, fraction 0.2: 2 prompts (6 pairs) held out, none of them in training."""
    pairs = [{"prompt": f"p{i}", "chosen": f"c{j}", "rejected": "r"} for i in range(10) for j in range(3)]
    train, held = reward.split_by_prompt(pairs, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not {p["prompt"] for p in held} & {p["prompt"] for p in train}
    assert reward.split_by_prompt(pairs, 0.2, seed=0) == (train, held)  # seeded: the same split again
    assert reward.split_by_prompt(pairs, 0.2, seed=1)[1] != held
    with pytest.raises(Exception, match="at least 2 prompts"):
        reward.split_by_prompt(pairs[:3], 0.5, seed=0)


def test_eval_fraction_gives_a_held_out_accuracy(reward_config, capsys):
    cfg = reward_config(LORA, run_name="rm_split", max_steps=2, save_every=2)
    cfg.data.eval, cfg.data.eval_fraction = None, 0.25
    run_dir = reward.main(cfg)
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in records[0] and "eval_accuracy" in records[-1]
    out = capsys.readouterr().out
    assert f"held-out pair accuracy {records[-1]['eval_accuracy']:.3f} on " in out
    assert "train / 0 eval pairs" not in out
