"""DPO recipe: the reference is the starting policy, and training learns a held-out preference."""

import json

import pytest
import torch
import yaml

from alignkit.config import DPOConfig, load_config
from alignkit.data.prefs import encode_split
from alignkit.models import load_model
from alignkit.recipes import dpo


def test_sequence_logprob_matches_unpadded_forward(tiny):
    """Summed completion log-probs from a left-padded batch equal those of each sequence alone."""
    model, tok = tiny
    rows = [encode_split(tok, "Where is my order?", "It ships tomorrow.", 64),
            encode_split(tok, "Hi", "Hello there, how can I help?", 64)]
    batch = [{"chosen": ids, "chosen_prompt": n, "rejected": ids, "rejected_prompt": n} for ids, n in rows]
    with torch.no_grad():
        got, _ = dpo.batch_logprobs(model, batch, tok.pad_token_id, "cpu")
        for (ids, n_prompt), value in zip(rows, got):
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            assert value.item() == pytest.approx(logp[n_prompt - 1:].sum().item(), abs=1e-4)


def test_dpo_learns_held_out_preference(tmp_path, tiny_model_dir, pair_files):
    train, held = pair_files
    cfg = {"model": str(tiny_model_dir), "data": {"train": str(train), "eval": str(held), "max_length": 64},
           "output_dir": str(tmp_path / "runs"), "run_name": "dpo", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "learning_rate": 3e-3, "beta": 0.5, "micro_batch_size": 8, "max_steps": 24, "save_every": 12,
           "device": "cpu", "seed": 0, "lr_scheduler": "constant"}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = dpo.main(load_config(DPOConfig, path))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = records[0], records[-1]
    # Before any update the policy is the reference: loss log 2, no margin.
    assert before["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert before["eval_margin"] == pytest.approx(0.0, abs=1e-5)
    assert after["eval_loss"] < 0.6 and after["eval_accuracy"] >= 0.8, after
    policy, tok = load_model(str(run_dir / "final"), device="cpu")
    assert hasattr(policy, "peft_config")  # an adapter on the unchanged base


def test_two_processes_equal_one_with_same_global_batch(tmp_path, tiny_model_dir, pair_files, launch_two):
    """DPO under accelerate launch with 2 CPU processes x micro-batch 4 equals 1 process x 2
    accumulated micro-batches of 4: the same per-step losses and the same adapter."""
    from safetensors.torch import load_file

    train, held = pair_files
    for name, accum in (("one", 2), ("two", 1)):
        cfg = {"model": str(tiny_model_dir), "data": {"train": str(train), "max_length": 64},
               "output_dir": str(tmp_path / "runs"), "run_name": name, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
               "learning_rate": 3e-3, "micro_batch_size": 4, "grad_accum": accum, "max_steps": 3,
               "device": "cpu", "seed": 0, "lr_scheduler": "constant"}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    dpo.main(load_config(DPOConfig, tmp_path / "one.yaml"))
    r = launch_two("train", "dpo", "--config", str(tmp_path / "two.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 process(es))" in r.stdout
    losses = lambda n: [json.loads(l)["loss"] for l in (tmp_path / "runs" / n / "metrics.jsonl").read_text().splitlines()]
    assert len(losses("one")) == 3 and losses("one") == pytest.approx(losses("two"), rel=1e-5)
    a = load_file(tmp_path / "runs" / "one" / "final" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "two" / "final" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_reference_pass_covers_only_the_pairs_the_steps_draw(tmp_path, tiny_model_dir, pair_files, monkeypatch):
    """A 2-step run with global batch 4 draws 8 pairs: the reference log-probs are computed for
    those 8 (plus the eval pairs), not for the whole file, and every drawn pair has them."""
    from alignkit.data.batching import global_batch

    train, held = pair_files
    n_train = len(train.read_text().splitlines())
    assert n_train > 8
    seen = []
    real = dpo.reference_logprobs

    def spy(model, data, *args):  # the real computation, recording which examples it covered
        seen.append(len(data))
        real(model, data, *args)

    monkeypatch.setattr(dpo, "reference_logprobs", spy)
    cfg = {"model": str(tiny_model_dir), "data": {"train": str(train), "eval": str(held), "max_length": 64},
           "output_dir": str(tmp_path / "runs"), "run_name": "short", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "learning_rate": 1e-3, "micro_batch_size": 4, "max_steps": 2, "device": "cpu", "seed": 0}
    (tmp_path / "short.yaml").write_text(yaml.safe_dump(cfg))
    dpo.main(load_config(DPOConfig, tmp_path / "short.yaml"))
    drawn = {i for step in range(2) for i in global_batch(step, n_train, 4, n_train // 4, 0)}
    assert seen == [len(drawn) + len(held.read_text().splitlines())] and len(drawn) == 8
