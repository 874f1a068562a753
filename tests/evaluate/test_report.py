"""The report of `alignkit eval`: a PPO run and a DPO run of the tiny model side by side with the
base, their curves plotted, the PPO monitor's warnings carried into the report, and the PPO run's
held-out probe (proxy reward and a rubric gold judge) logged per step and plotted."""

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config import DPOConfig, PPOConfig, load_config
from alignkit.evaluate.judges import load_judge
from alignkit.models import ScalarHeadModel, generate, load_model
from alignkit.recipes import dpo, ppo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A gold judge the tiny model's random text passes now and then: short replies, and no letter 'x'.
GOLD = """components:
  - name: rubric
    judge: rubric
    criteria:
      - {name: short, words: [0, 3]}
      - {name: no_x, none: ["x"]}
"""


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
               "kl_estimator": "k3",  # never negative, so every step after the first exceeds the ceiling
               "monitors": {"max_kl": 1e-9, "judge": str(tmp / "gold.yaml")},
               "probe": {"prompts": str(prompts), "every": 2, "n": 3}}
    (tmp / "gold.yaml").write_text(GOLD)
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
    for png in ("reward_kl.png", "length.png", "dpo.png", "toxicity.png", "gold_proxy.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["name"] for m in metrics["models"]] == ["base", "ppo", "dpo"]
    ppo_run, dpo_run = metrics["training_runs"]["ppo"], metrics["training_runs"]["dpo"]
    assert ppo_run["recipe"] == "ppo" and ppo_run["steps"] == 3 and dpo_run["recipe"] == "dpo" and dpo_run["steps"] == 2
    # step 1 samples from the reference (KL 0); later steps exceed the 1e-9 ceiling and warn
    kl_warnings = [w["step"] for w in ppo_run["warnings"] if w["warning"].startswith("KL to the reference")]
    assert kl_warnings == [2, 3] and ppo_run["monitor_warnings"] == len(ppo_run["warnings"])
    md = (out / "report.md").read_text()
    assert "| reward_mean |" in md and "## Training runs" in md and "**ppo**, step 2: KL to the reference" in md
    assert md.count("\n| Where is my order? |") == 1 and "Can I return shoes?" in md.split("## Samples")[1]
    assert "How long does a refund take?" not in md.split("## Samples")[1]  # --samples 2
    page = (out / "report.html").read_text()
    assert "<img src='reward_kl.png'" in page and "class='warn'" in page and "<img src='gold_proxy.png'" in page
    assert ppo_run["probe_gold_last"] is not None and ppo_run["probe_proxy_last"] is not None


def test_probe_logs_gold_and_proxy_of_the_policys_greedy_replies(tmp_path, tiny_model_dir):
    """3 PPO steps with probe.every 2: probes before step 1 (step 0), at step 2 and after the last
    (step 3). The last probe_gold is the rubric's mean over the final policy's greedy replies to the
    first 3 prompts, and probe_proxy the reward model's: recomputed here from the saved adapter."""
    prompts, ppo_dir, _ = _ppo_and_dpo(tmp_path, tiny_model_dir)
    records = [json.loads(l) for l in (ppo_dir / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in records if "probe_proxy" in r]
    assert [r["step"] for r in probes] == [0, 2, 3] and all("probe_gold" in r for r in probes)
    policy, tok = load_model(str(ppo_dir / "final"), device="cpu")
    first3 = prompts.read_text().splitlines()[:3]
    texts = generate(policy, tok, first3, max_new_tokens=6).texts
    gold = load_judge(tmp_path / "gold.yaml").score(first3, texts)
    assert probes[-1]["probe_gold"] == pytest.approx(sum(gold) / 3, abs=1e-6)
    rm, rm_tok = ScalarHeadModel.from_pretrained(tmp_path / "rm" / "final", device="cpu")
    proxy = rm.score_texts(rm_tok, first3, texts)
    assert probes[-1]["probe_proxy"] == pytest.approx(sum(proxy) / 3, abs=1e-4)


def test_report_without_training_runs_says_no_monitor_ran(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi <b>there</b>\n")
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["eval", "--models", f"a={tiny_model_dir}", "--prompts", str(prompts),
                                      "--max-new-tokens", "4", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "report.html", "report.md", "toxicity.png"]
    assert "No PPO or GRPO run among the models" in (out / "report.md").read_text()
    assert "Hi &lt;b&gt;there&lt;/b&gt;" in (out / "report.html").read_text()  # model and user text is escaped


def test_report_shows_the_reward_models_held_out_accuracy(tmp_path, tiny_model_dir):
    """A reward model given as its run directory brings its held-out pair accuracy into the report.
    The run directory is written by hand here (a config and two eval records), not trained."""
    rm_dir = tmp_path / "rm"
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    ScalarHeadModel(base).save_pretrained(rm_dir / "final", tok)
    (rm_dir / "config.yaml").write_text(yaml.safe_dump({"center_coef": 0.01, "model": str(tiny_model_dir)}))
    (rm_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_accuracy": 0.5}) + "\n"
                                          + json.dumps({"step": 9, "eval_accuracy": 0.8125}) + "\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["eval", "--models", f"a={tiny_model_dir}", "--prompts", str(prompts),
                                      "--reward", str(rm_dir), "--max-new-tokens", "4", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "The reward model's held-out pair accuracy: 0.812" in report and "weak proxy" not in report  # >= 0.8
    runs = json.loads((out / "metrics.json").read_text())["training_runs"]
    assert runs["reward model"]["eval_accuracy_first"] == 0.5 and runs["reward model"]["eval_accuracy_last"] == 0.8125
