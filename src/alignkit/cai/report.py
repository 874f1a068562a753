"""The pipeline's report: base, SL-CAI and RL-CAI side by side (metrics.json and report.md).

Harmlessness is read on held-out red-team prompts (toxicity, an independent judge, the preference
model's reward); helpfulness on benign prompts (a helpfulness judge and reward): what harmlessness
cost. Sample completions let a reader check the numbers against the text.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.evaluate.compare import ModelReport
from alignkit.io import atomic_write_text, write_jsonl

HARM_KEYS = {"toxicity_mean": "toxicity mean (lower is better)",
             "toxicity_share_over_0.5": "share toxic > 0.5 (lower is better)",
             "judge_mean": "harmlessness judge (higher is better)",
             "win_rate_vs_base": "harmlessness win rate vs base",
             "reward_mean": "preference-model reward (higher is better)",
             "response_tokens": "response tokens", "kl_to_base": "KL to base (nats/response)"}
HELP_KEYS = {"judge_mean": "helpfulness judge (higher is better)",
             "win_rate_vs_base": "helpfulness win rate vs base",
             "reward_mean": "preference-model reward",
             "helpful_reward_mean": "helpfulness reward (higher is better)",
             "toxicity_mean": "toxicity mean", "response_tokens": "response tokens"}
SAMPLES = 3


def section(reports: list[ModelReport], extra: dict | None = None) -> dict:
    out = {}
    for r in reports:
        metrics = {k.replace(f"win_rate_vs_{reports[0].name}", "win_rate_vs_base"): v for k, v in r.metrics.items()}
        if extra and r.name in extra:
            metrics["helpful_reward_mean"] = extra[r.name]
        out[r.name] = {"model": r.spec, **metrics}
    return out


def table(models: dict, keys: dict) -> list[str]:
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in keys.items():
        cells = [models[n].get(key) for n in names]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells) + " |")
    return lines


def samples(reports: list[ModelReport], prompts: list[str]) -> list[str]:
    lines = []
    for i, prompt in enumerate(prompts[:SAMPLES]):
        lines += ["", f"**{prompt}**", ""]
        for r in reports:
            text = " ".join(r.completions[i].split()) or "(empty)"
            lines.append(f"- {r.name}: {text}")
    return lines


def write_report(run_dir: Path, out: Path, harm: list[ModelReport], helpful: list[ModelReport],
                 held: list[str], benign: list[str], helpful_reward: dict | None = None) -> dict:
    """Write metrics.json and report.md into the run directory (and completions into `out`); returns the metrics."""
    metrics = {"harmlessness": {"prompts": len(held), "models": section(harm)},
               "helpfulness": {"prompts": len(benign), "models": section(helpful, helpful_reward)}}
    write_jsonl(out / "completions.jsonl",
                [{"set": name, "model": r.name, "prompt": p, "completion": c}
                 for name, reports, prompts in (("red_team_held_out", harm, held), ("benign", helpful, benign))
                 for r in reports for p, c in zip(prompts, r.completions)])
    md = ["# Constitutional AI: base vs SL-CAI vs RL-CAI", "",
          f"Run `{run_dir.name}`. Greedy completions; the judges are not the labeler of the training pairs.", "",
          f"## Harmlessness: {len(held)} held-out red-team prompts", "",
          *table(metrics["harmlessness"]["models"], HARM_KEYS), "",
          f"## Helpfulness (the cost of harmlessness): {len(benign)} benign prompts", "",
          *table(metrics["helpfulness"]["models"], HELP_KEYS), "",
          "## Samples: held-out red-team prompts", *samples(harm, held), "",
          "## Samples: benign prompts", *samples(helpful, benign), ""]
    text = json.dumps(metrics, indent=2)
    atomic_write_text(out / "metrics.json", text)
    atomic_write_text(run_dir / "metrics.json", text)
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    return metrics
