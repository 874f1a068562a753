"""PPO recipe: a run updates only the adapter and value head, logs its monitors, stops at a reward
threshold, and a resumed run repeats the uninterrupted one exactly."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.config import PPOConfig, load_config
from alignkit.models import ScalarHeadModel, load_model
from alignkit.recipes import ppo


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory, tiny_model_dir):
    """A reward model on the tiny backbone with a random head: any fixed scoring function will do."""
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(1)
    rm = ScalarHeadModel(base)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    out = tmp_path_factory.mktemp("rm") / "final"
    rm.save_pretrained(out, tok)
    return out


def config(tmp_path, model_dir, reward, name, **over):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Where is my order?\nCan I return shoes?\nHow long does a refund take?\nHi\n"
                       "Do you ship abroad?\nMy parcel is late\nCan I cancel?\nI was charged twice\n")
    cfg = {"model": str(model_dir), "data": {"prompts": str(prompts)}, "reward": str(reward),
           "output_dir": str(tmp_path / "runs"), "run_name": name, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "learning_rate": 1e-3, "lr_scheduler": "constant", "rollout_batch": 4, "minibatch_size": 2,
           "max_new_tokens": 6, "max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "device": "cpu",
           "seed": 0, "kl_target": 1.0, "kl_horizon": 100}
    cfg.update(over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(PPOConfig, path)


def test_ppo_run_trains_adapter_and_value_head_only(tmp_path, tiny_model_dir, reward_dir):
    run_dir = ppo.main(config(tmp_path, tiny_model_dir, reward_dir, "smoke"))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("score", "kl", "kl_coef", "response_length", "distinct_2", "pg_loss", "vf_loss", "clipfrac"):
        assert all(key in r for r in records)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference itself
    assert records[-1]["kl"] != 0.0
    assert records[-1]["kl_coef"] != records[0]["kl_coef"]  # the adaptive controller moved
    state = load_file(run_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert all("lora_" in k or k.startswith("value_head.") for k in state)
    assert any(k.startswith("value_head.") for k in state)
    policy, _ = load_model(str(run_dir / "final"), device="cpu")
    assert hasattr(policy, "peft_config") and (run_dir / "final" / "value_head.safetensors").is_file()


def test_reward_threshold_stops_early(tmp_path, tiny_model_dir, reward_dir):
    run_dir = ppo.main(config(tmp_path, tiny_model_dir, reward_dir, "stop", reward_threshold=-1e9))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    assert (run_dir / "checkpoints" / "step-000001").is_dir() and (run_dir / "final").is_dir()


def test_resume_repeats_the_uninterrupted_run(tmp_path, tiny_model_dir, reward_dir):
    full = ppo.main(config(tmp_path, tiny_model_dir, reward_dir, "full"))
    cut = tmp_path / "runs" / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.yaml", cut / "config.yaml")
    shutil.copytree(full / "checkpoints" / "step-000002", cut / "checkpoints" / "step-000002")
    lines = (full / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # logged step 3, then died
    ppo.main(load_config(PPOConfig, cut / "config.yaml"), resume=cut)
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"} for l in ls]
    assert strip((cut / "metrics.jsonl").read_text().splitlines()) == strip(lines)
    a = load_file(full / "checkpoints" / "step-000004" / "trainable.safetensors")
    b = load_file(cut / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ta = json.loads((full / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    tb = json.loads((cut / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert ta["kl_controller"] == tb["kl_controller"]


def test_monitors_log_an_independent_judge_and_can_stop_the_run(tmp_path, tiny_model_dir, reward_dir):
    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: tox, judge: toxicity, weight: -1.0}\n")
    run_dir = ppo.main(config(tmp_path, tiny_model_dir, reward_dir, "mon",
                              monitors={"judge": str(judge), "max_kl": 1e-9, "stop_on_warning": True}))
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(-1.0 <= r["judge"] <= 0.0 for r in records)
    assert "warnings" not in records[0]  # step 1 is the reference itself: KL 0
    assert records[-1]["warnings"][0].startswith("KL to the reference") and len(records) < 4
    assert (run_dir / "final").is_dir()
