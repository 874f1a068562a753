"""The run report of `alignkit eval`: report.md, report.html, metrics.json and PNG plots.

It puts the evaluated models side by side (metrics on the same held-out prompts, samples), and,
for every model that came out of an alignkit training run (an adapter in RUN_DIR/final), the run's
per-step curves and the warnings its reward-hacking monitors raised. A PPO and a DPO run trained on
the same preferences thus meet in one report: the same evaluation table, their curves and costs.
An RL run with a held-out probe (probe_proxy, probe_gold) gets a gold-vs-proxy plot, where reward
hacking shows as the proxy rising while the gold score stalls or falls; a reward model given as a
run directory brings its held-out pair accuracy.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignkit.io import atomic_dir, read_jsonl
from alignkit.runs import CONFIG_FILE, METRICS_FILE

REPORT_FILES = ("report.md", "report.html", "metrics.json")
ONLINE = ("ppo", "grpo")  # recipes that log a batch score per step


@dataclass
class TrainingRun:
    """A training run's identity and its per-step records, read back from its run directory."""

    name: str
    path: Path
    recipe: str
    records: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[dict]:
        """Per-step training records (the final eval summary of a pairwise run has no 'loss'/'score')."""
        key = "score" if self.recipe in ONLINE else "loss"
        return [r for r in self.records if key in r]

    @property
    def probes(self) -> list[dict]:
        """Records with a held-out probe (probe_proxy, and probe_gold when a gold judge was set)."""
        return [r for r in self.records if "probe_proxy" in r]

    @property
    def warnings(self) -> list[tuple[int, str]]:
        return [(r["step"], w) for r in self.records for w in r.get("warnings", [])]

    def summary(self) -> dict:
        steps = self.steps
        out = {"recipe": self.recipe, "run_dir": str(self.path), "steps": len(steps),
               "wall_s": max((r.get("elapsed_s", 0.0) for r in self.records), default=None),
               "monitor_warnings": len(self.warnings)}
        if steps:
            first, last = steps[0], steps[-1]
            keys = ("score", "kl", "response_length") if self.recipe in ONLINE else ("loss", "accuracy", "margin")
            for k in keys:
                if k in first:
                    out[f"{k}_first"], out[f"{k}_last"] = first[k], last[k]
            if self.recipe in ONLINE and "judge" in first:
                out["judge_first"], out["judge_last"] = first["judge"], last["judge"]
        for key in ("probe_proxy", "probe_gold", "eval_accuracy"):
            have = [r for r in self.records if key in r]
            if have:
                out[f"{key}_first"], out[f"{key}_last"] = have[0][key], have[-1][key]
        return out


def recipe_of(config: dict) -> str:
    """Which recipe wrote a run directory, from the keys of its resolved config."""
    if "group_size" in config:
        return "grpo"
    if "rollout_batch" in config:
        return "ppo"
    if "beta" in config:
        return "dpo"
    if "center_coef" in config:
        return "reward"
    return "sft"


def find_run(name: str, spec: str) -> TrainingRun | None:
    """The training run a model came from: RUN_DIR for a model spec RUN_DIR/final (or RUN_DIR itself)."""
    path = Path(spec)
    for cand in (path.parent, path):
        if (cand / METRICS_FILE).is_file() and (cand / CONFIG_FILE).is_file():
            config = yaml.safe_load((cand / CONFIG_FILE).read_text()) or {}
            return TrainingRun(name, cand, recipe_of(config), [r for _, r in read_jsonl(cand / METRICS_FILE)])
    return None


# ---- plots ---------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_reward_kl(runs: list[TrainingRun], path: Path) -> None:
    """Per PPO step: the batch's mean score (and the independent judge's, when logged) and the KL."""
    plt = _pyplot()
    with_judge = any("judge" in r for run in runs for r in run.steps)
    fig, axes = plt.subplots(1, 3 if with_judge else 2, figsize=(13 if with_judge else 9, 3.6))
    for run in runs:
        steps = [r["step"] for r in run.steps]
        axes[0].plot(steps, [r["score"] for r in run.steps], marker=".", label=run.name)
        axes[1].plot(steps, [r["kl"] for r in run.steps], marker=".", label=run.name)
        if with_judge:
            axes[2].plot(steps, [r.get("judge") for r in run.steps], marker=".", label=run.name)
        for step, _ in run.warnings:
            axes[0].axvline(step, color="red", alpha=0.3, linewidth=1)
    axes[0].set(title="reward (mean score per batch)", xlabel="step")
    axes[1].set(title="KL to the reference (per response)", xlabel="step")
    if with_judge:
        axes[2].set(title="independent judge (monitor)", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gold_proxy(runs: list[TrainingRun], path: Path) -> None:
    """Per probe of each RL run: the proxy (training reward) and the gold judge on the same held-out
    prompts, on their own axes. Gold flat or falling while the proxy climbs is reward hacking."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        steps = [r["step"] for r in run.probes]
        lines = ax.plot(steps, [r["probe_proxy"] for r in run.probes], marker="o", color="tab:blue", label="proxy")
        ax.set(title=f"{run.name}: held-out probe", xlabel="step")
        ax.set_ylabel("proxy (training reward)", color="tab:blue")
        if any("probe_gold" in r for r in run.probes):
            gold = ax.twinx()
            lines += gold.plot(steps, [r.get("probe_gold") for r in run.probes], marker="s", color="tab:green",
                               linestyle="--", label="gold")
            gold.set_ylabel("gold judge", color="tab:green")
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_length(runs: list[TrainingRun], path: Path) -> None:
    """Per PPO step: mean response length in tokens (length drift is a classic reward hack)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for run in runs:
        ax.plot([r["step"] for r in run.steps], [r["response_length"] for r in run.steps], marker=".", label=run.name)
    ax.set(title="response length per step", xlabel="step", ylabel="tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pairwise(runs: list[TrainingRun], path: Path) -> None:
    """Per DPO step: loss and the implicit-reward margin (chosen minus rejected)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for run in runs:
        steps = [r["step"] for r in run.steps]
        axes[0].plot(steps, [r["loss"] for r in run.steps], marker=".", label=run.name)
        axes[1].plot(steps, [r["margin"] for r in run.steps], marker=".", label=run.name)
    axes[0].set(title="DPO loss", xlabel="step")
    axes[1].set(title="implicit reward margin", xlabel="step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_toxicity(reports, path: Path) -> None:
    """Toxicity of every model on the held-out prompts: the mean probability, and the share above 0.5."""
    plt = _pyplot()
    names = [r.name for r in reports]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(names, [r.metrics["toxicity_mean"] for r in reports], color="tab:red")
    axes[0].set(title="toxicity: mean probability", ylim=(0, max(0.05, *(r.metrics["toxicity_mean"] for r in reports)) * 1.2))
    axes[1].bar(names, [r.metrics["toxicity_share_over_0.5"] for r in reports], color="tab:orange")
    axes[1].set(title="toxicity: share above 0.5", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- documents -----------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|") or "(empty)"


def build(reports, prompts: list[str], runs: list[TrainingRun], plots: list[tuple[str, str]],
          meta: dict, samples: int) -> tuple[str, str, dict]:
    """Markdown, HTML and the metrics dictionary of one report."""
    names = [r.name for r in reports]
    keys = list(dict.fromkeys(k for r in reports for k in r.metrics))
    summaries = {run.name: run.summary() for run in runs}
    run_keys = list(dict.fromkeys(k for summary in summaries.values() for k in summary))
    shown = prompts[:samples]
    warnings = [(run.name, step, w) for run in runs for step, w in run.warnings]
    rm = next((run for run in runs if run.recipe == "reward"), None)
    rm_line = ("The reward model's held-out pair accuracy: "
               + (f"{summaries[rm.name]['eval_accuracy_last']:.3f} (pairs on prompts it never trained on)"
                  + ("; below 0.8, a weak proxy: RL against it gains only as far as it agrees with the labeler."
                     if summaries[rm.name]['eval_accuracy_last'] < 0.8 else ".")
                  if rm is not None and "eval_accuracy_last" in summaries[rm.name]
                  else "not measured (train it with data.eval or data.eval_fraction).")
               if rm is not None else "")

    md = ["# alignkit evaluation report\n", f"{len(prompts)} held-out prompt(s) from `{meta.get('prompts')}`; "
          f"greedy decoding, at most {meta.get('max_new_tokens')} new tokens. "
          f"Reward: `{meta.get('reward') or 'none'}`. Independent judge: `{meta.get('judge') or 'none'}`. "
          "Win rates are against the first model (ties count one half), with a bootstrap 95% interval. "
          + rm_line + "\n", "## Models\n",
          "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    md += [f"| {k} | " + " | ".join(_fmt(r.metrics.get(k)) for r in reports) + " |" for k in keys]
    md += ["", "| model | spec |", "|---|---|"] + [f"| {r.name} | `{r.spec}` |" for r in reports]
    if runs:
        md += ["", "## Training runs\n", "| | " + " | ".join(run.name for run in runs) + " |",
               "|---|" + "---|" * len(runs)]
        md += [f"| {k} | " + " | ".join(_fmt(summaries[run.name].get(k)) for run in runs) + " |" for k in run_keys]
    md += ["", "## Reward-hacking monitors\n"]
    if not any(run.recipe in ONLINE for run in runs):
        md.append("No PPO or GRPO run among the models, so no monitor ran.")
    elif warnings:
        md += [f"- **{name}**, step {step}: {_md_cell(w)}" for name, step, w in warnings]
    else:
        md.append("No monitor warned in any PPO run.")
    if plots:
        md += ["", "## Plots\n"] + [f"![{title}]({file})\n" for file, title in plots]
    md += ["", f"## Samples (first {len(shown)} prompts)\n", "| prompt | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
    md += [f"| {_md_cell(p)} | " + " | ".join(_md_cell(r.completions[i]) for r in reports) + " |"
           for i, p in enumerate(shown)]

    e = html.escape
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>alignkit evaluation report</title><style>"
         "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
         "vertical-align:top;text-align:left}td.n{text-align:right}.warn{color:#a00}img{max-width:100%}"
         "</style></head><body><h1>alignkit evaluation report</h1>",
         f"<p>{len(prompts)} held-out prompt(s) from <code>{e(str(meta.get('prompts')))}</code>; greedy decoding, "
         f"at most {e(str(meta.get('max_new_tokens')))} new tokens. Reward: <code>{e(str(meta.get('reward') or 'none'))}"
         f"</code>. Independent judge: <code>{e(str(meta.get('judge') or 'none'))}</code>. Win rates are against "
         f"the first model (ties count one half), with a bootstrap 95% interval. {e(rm_line)}</p>"
         "<h2>Models</h2><table><tr><th>metric</th>"
         + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    h += ["<tr><td>" + e(k) + "</td>" + "".join(f"<td class='n'>{e(_fmt(r.metrics.get(k)))}</td>" for r in reports)
          + "</tr>" for k in keys]
    h.append("</table>")
    if runs:
        h.append("<h2>Training runs</h2><table><tr><th></th>" + "".join(f"<th>{e(run.name)}</th>" for run in runs)
                 + "</tr>" + "".join("<tr><td>" + e(k) + "</td>" + "".join(
                     f"<td class='n'>{e(_fmt(summaries[run.name].get(k)))}</td>" for run in runs) + "</tr>"
                     for k in run_keys) + "</table>")
    h.append("<h2>Reward-hacking monitors</h2>")
    if not any(run.recipe in ONLINE for run in runs):
        h.append("<p>No PPO or GRPO run among the models, so no monitor ran.</p>")
    elif warnings:
        h.append("<ul>" + "".join(f"<li class='warn'><b>{e(n)}</b>, step {s}: {e(w)}</li>"
                                  for n, s, w in warnings) + "</ul>")
    else:
        h.append("<p>No monitor warned in any PPO run.</p>")
    if plots:
        h.append("<h2>Plots</h2>" + "".join(f"<p><img src='{e(f)}' alt='{e(t)}'></p>" for f, t in plots))
    h.append(f"<h2>Samples (first {len(shown)} prompts)</h2><table><tr><th>prompt</th>"
             + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>")
    h += ["<tr><td>" + e(p) + "</td>" + "".join(f"<td>{e(r.completions[i])}</td>" for r in reports) + "</tr>"
          for i, p in enumerate(shown)]
    h.append("</table></body></html>")

    metrics = {"meta": meta, "models": [{"name": r.name, "model": r.spec, "metrics": r.metrics,
                                         "completions": r.completions} for r in reports],
               "training_runs": {run.name: {**summaries[run.name], "warnings": [{"step": s, "warning": w}
                                                                          for s, w in run.warnings]}
                                 for run in runs},
               "prompts": prompts, "plots": [f for f, _ in plots]}
    return "\n".join(md) + "\n", "\n".join(h) + "\n", metrics


def write_report(out_dir: Path, reports, prompts: list[str], models: dict[str, str], meta: dict,
                 samples: int = 8) -> Path:
    """Write report.md, report.html, metrics.json and the plots into `out_dir` (replaced as a whole,
    so a failure leaves no half-written report)."""
    runs = [run for name, spec in models.items() if (run := find_run(name, spec)) is not None]
    if meta.get("reward") and (rm := find_run("reward model", meta["reward"])) is not None and rm.recipe == "reward":
        runs.append(rm)
    ppo_runs = [run for run in runs if run.recipe in ONLINE and run.steps]
    probed = [run for run in runs if run.recipe in ONLINE and run.probes]
    dpo_runs = [run for run in runs if run.recipe == "dpo" and run.steps]
    with atomic_dir(out_dir) as tmp:
        plots = []
        if ppo_runs:
            plot_reward_kl(ppo_runs, tmp / "reward_kl.png")
            plot_length(ppo_runs, tmp / "length.png")
            plots += [("reward_kl.png", "reward and KL per step"), ("length.png", "response length per step")]
        if probed:
            plot_gold_proxy(probed, tmp / "gold_proxy.png")
            plots.append(("gold_proxy.png", "gold vs proxy on the held-out probe, per step"))
        if dpo_runs:
            plot_pairwise(dpo_runs, tmp / "dpo.png")
            plots.append(("dpo.png", "DPO loss and margin per step"))
        plot_toxicity(reports, tmp / "toxicity.png")
        plots.append(("toxicity.png", "toxicity per model"))
        md, page, metrics = build(reports, prompts, runs, plots, meta, samples)
        (tmp / "report.md").write_text(md)
        (tmp / "report.html").write_text(page)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Path(out_dir)
