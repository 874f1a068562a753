"""The report of `alignkit eval`: a PPO run and a DPO run of the tiny model side by side with the
base, their curves plotted, the PPO monitor's warnings carried into the report."""

import json

import torch
import yaml
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config import DPOConfig, PPOConfig, load_config
from alignkit.models import ScalarHeadModel, load_model
from alignkit.recipes import dpo, ppo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ppo_and_dpo(tmp, model_dir):
    base, tok = load_model(str(model_dir), device="cpu")
    torch.manual_seed(1)
    rm = ScalarHeadModel(base)
    torch.nn.init.normal_(rm.head.weight, std=1.0)
    rm.save_pretrained(tmp / "rm" / "final", tok)
    prompts = tmp / "prompts.txt"
    prompts.write_text("Where is my order?\nCan I return shoes?\nHow long does a refund take?\nHi\n")
    common = {"model": str(model_dir), "output_dir": str(tmp / "runs"), "device": "cpu", "seed": 0,
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "learning_rate": 1e-2, "lr_scheduler": "constant"}
    ppo_cfg = {**common, "run_name": "ppo", "data": {"prompts": str(prompts)}, "reward": str(tmp / "rm"),
               "rollout_batch": 4, "minibatch_size": 2, "max_new_tokens": 6, "max_steps": 3, "save_every": 3,
               "monitors": {"max_kl": 1e-9}}
    (tmp / "ppo.yaml").write_text(yaml.safe_dump(ppo_cfg))
    ppo_dir = ppo.main(load_config(PPOConfig, tmp / "ppo.yaml"))
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": "Happy to help with that.", "rejected": "No."}) + "\n"
                             for p in prompts.read_text().splitlines()))
    dpo_cfg = {**common, "run_name": "dpo", "data": {"train": str(pairs), "max_length": 64}, "micro_batch_size": 2,
               "max_steps": 2, "save_every": 2}
    (tmp / "dpo.yaml").write_text(yaml.safe_dump(dpo_cfg))
    dpo_dir = dpo.main(load_config(DPOConfig, tmp / "dpo.yaml"))
    return prompts, ppo_dir, dpo_dir


def test_report_puts_ppo_and_dpo_beside_the_base(tmp_path, tiny_model_dir):
    prompts, ppo_dir, dpo_dir = _ppo_and_dpo(tmp_path, tiny_model_dir)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["eval", "--models", f"base={tiny_model_dir},ppo={ppo_dir / 'final'},"
                                                          f"dpo={dpo_dir / 'final'}",
                                      "--prompts", str(prompts), "--reward", str(tmp_path / "rm"),
                                      "--max-new-tokens", "6", "--samples", "2", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "report.html" in result.output
    for png in ("reward_kl.png", "length.png", "dpo.png", "toxicity.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in metrics["models"]] == ["base", "ppo", "dpo"]
    ppo_run, dpo_run = metrics["training_runs"]["ppo"], metrics["training_runs"]["dpo"]
    assert ppo_run["recipe"] == "ppo" and ppo_run["steps"] == 3 and dpo_run["recipe"] == "dpo" and dpo_run["steps"] == 2
    # step 1 samples from the reference (KL 0); later steps exceed the 1e-9 ceiling and warn
    assert [w["step"] for w in ppo_run["warnings"]] == [2, 3] and ppo_run["monitor_warnings"] == 2
    md = (out / "report.md").read_text()
    assert "| reward_mean |" in md and "## Training runs" in md and "**ppo**, step 2: KL to the reference" in md
    assert md.count("\n| Where is my order? |") == 1 and "Can I return shoes?" in md.split("## Samples")[1]
    assert "How long does a refund take?" not in md.split("## Samples")[1]  # --samples 2
    page = (out / "report.html").read_text()
    assert "<img src='reward_kl.png'" in page and "class='warn'" in page


def test_report_without_training_runs_says_no_monitor_ran(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi <b>there</b>\n")
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["eval", "--models", f"a={tiny_model_dir}", "--prompts", str(prompts),
                                      "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.md", "toxicity.png"]
    assert "No PPO run among the models" in (out / "report.md").read_text()
    assert "Hi &lt;b&gt;there&lt;/b&gt;" in (out / "report.html").read_text()  # model and user text is escaped
