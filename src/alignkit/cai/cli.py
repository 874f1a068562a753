"""`alignkit cai ...`: Constitutional AI commands (principles, redteam, revise, label, pipeline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from alignkit.cli_options import DEVICE_HELP, MODEL_HELP, RESTART_OPT
from alignkit.errors import AlignkitError

cai_app = typer.Typer(
    help="Constitutional AI (Bai et al. 2022): constitutions, red teaming, critique-and-revise SFT, "
         "RLAIF labeling, and the whole pipeline with a base / SL-CAI / RL-CAI report.",
    no_args_is_help=True)

PRINCIPLES_HELP = ("Principles: comma-separated shipped constitutions (human_rights, platform_terms, "
                   "dialogue_rules) or YAML files, each optionally narrowed to ids with ':id+id', "
                   "e.g. 'human_rights:privacy,dialogue_rules'.")


@cai_app.command("principles")
def principles_cmd(
    principles: str = typer.Argument("human_rights,platform_terms,dialogue_rules", help=PRINCIPLES_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per principle."),
):
    """Validate and list principles: a constitution file you wrote is checked here first.

    Example: alignkit cai principles my_rules.yaml
    """
    from dataclasses import asdict

    from alignkit.cai.constitution import select_principles

    for p in select_principles(principles):
        print(json.dumps(asdict(p)) if as_json else f"{p.key}: {p.text}")


def _load(model: str, device: str):
    from alignkit.models import load_model

    return load_model(model, device=device)


@cai_app.command("redteam")
def redteam_cmd(
    out: Path = typer.Option(..., help="JSONL to write: prompt, category, origin, response, scores, flagged."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    seeds: Optional[Path] = typer.Option(None, help="Seed prompts JSONL {prompt, category}; default the shipped set."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N seeds."),
    variations: int = typer.Option(1, help="Model-written rephrasings per seed (kept if non-empty and new)."),
    variation_temperature: float = typer.Option(0.8, help="Sampling temperature of the rephrasings."),
    max_new_tokens: int = typer.Option(48, help="Most tokens per response and per rephrasing."),
    temperature: float = typer.Option(0.0, help="Response sampling temperature; 0 is greedy."),
    toxicity_threshold: float = typer.Option(0.5, help="Flag a response whose toxicity (0..1) is above this."),
    judge: Optional[Path] = typer.Option(None, help="Also flag with this judge YAML (higher = better, e.g. an "
                                                    "LLM harmlessness rating) ..."),
    judge_threshold: Optional[float] = typer.Option(None, help="... when its score is below this."),
    seed: int = typer.Option(0, help="Seed for repeatable sampling."),
    batch_size: int = typer.Option(8, help="Sequences generated at once."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    restart: bool = RESTART_OPT,
):
    """Red-team a model: seed prompts plus rephrasings, its responses, and the harmful ones flagged.

    Records are appended batch by batch; after a kill, the same command again continues the file.

    Example: alignkit cai redteam --out redteam.jsonl --variations 1
    """
    from alignkit.cai.redteam import load_seeds, make_variations, redteam_batches, summary
    from alignkit.cai.revise import model_chat
    from alignkit.io import ResumableJsonl, file_digest

    items = load_seeds(seeds)[:limit]
    fingerprint = {"command": "cai redteam", "seeds": file_digest(seeds) if seeds else "shipped", "limit": limit,
                   "model": model, "variations": variations, "variation_temperature": variation_temperature,
                   "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                   "batch_size": batch_size, "toxicity_threshold": toxicity_threshold,
                   "judge": file_digest(judge) if judge else None, "judge_threshold": judge_threshold}
    writer = ResumableJsonl(out, fingerprint, restart=restart)
    if writer.resumed:
        print(f"resuming {out}: {writer.done} prompt(s) already done")
    if not writer.complete:
        judge_fn = None
        if judge is not None:
            from alignkit.evaluate.judges import load_judge

            judge_fn = load_judge(judge)
        m, tok = _load(model, device)
        if "items" not in writer.state:  # the rephrasings are kept, so a resumed run does not redo them
            chat = model_chat(m, tok, max_new_tokens=max_new_tokens, temperature=variation_temperature, seed=seed,
                              batch_size=batch_size)
            writer.save_state(items=make_variations(items, chat, variations))
        batches = redteam_batches(writer.state["items"], m, tok, start=writer.done, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, batch_size=batch_size,
                                  toxicity_threshold=toxicity_threshold, judge=judge_fn,
                                  judge_threshold=judge_threshold)
        for done, records in batches:
            writer.append(records, done=done)
        writer.finish()
    s = summary(writer.records())
    print(f"{s['prompts']} prompt(s) ({s['variations']} variation(s)), {s['flagged']} flagged harmful; "
          f"written to {out}")
    for cat, frac in s["flagged_by_category"].items():
        print(f"  {cat}: {frac} flagged")


@cai_app.command("revise")
def revise_cmd(
    input: Path = typer.Option(..., "--input", "-i", help="JSONL with 'prompt' and, optionally, 'response' "
                                                          "(e.g. from cai redteam); missing responses are generated."),
    out_dir: Path = typer.Option(..., help="Directory for trace.jsonl (every step) and sft.jsonl (prompt, final revision)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    principles: str = typer.Option("human_rights,platform_terms,dialogue_rules", help=PRINCIPLES_HELP),
    rounds: int = typer.Option(1, help="Critique -> revision rounds, each under a freshly sampled principle."),
    max_new_tokens: int = typer.Option(64, help="Most tokens per response, critique and revision."),
    temperature: float = typer.Option(0.0, help="Sampling temperature; 0 is greedy."),
    seed: int = typer.Option(0, help="Seed for principle sampling and generation."),
    batch_size: int = typer.Option(8, help="Sequences generated at once."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    restart: bool = RESTART_OPT,
):
    """Critique and revise responses under sampled principles; write the trace and an SFT dataset.

    Traces are appended batch by batch; after a kill, the same command again continues the file.

    Then `alignkit train sft data.train=OUT_DIR/sft.jsonl ...` gives the SL-CAI model.
    Example: alignkit cai revise -i redteam.jsonl --out-dir revise/ --rounds 2
    """
    from alignkit.cai.constitution import select_principles
    from alignkit.cai.revise import revise_batches, sft_records
    from alignkit.errors import DataError
    from alignkit.io import ResumableJsonl, file_digest, note_skipped, read_jsonl_salvaged, write_jsonl

    if rounds < 1:
        raise AlignkitError("--rounds must be at least 1")
    chosen = select_principles(principles)
    records, bad = [], []
    for lineno, rec in read_jsonl_salvaged(input):
        if isinstance(rec.get("prompt"), str) and rec["prompt"].strip():
            records.append(rec)
        else:
            bad.append(f"line {lineno}: needs a non-empty string 'prompt'")
    if not records:
        raise DataError(input, bad)
    for problem in bad:
        note_skipped(input, problem)
    fingerprint = {"command": "cai revise", "input": file_digest(input), "model": model, "principles": principles,
                   "rounds": rounds, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
                   "batch_size": batch_size}
    writer = ResumableJsonl(out_dir / "trace.jsonl", fingerprint, restart=restart)
    if writer.resumed:
        print(f"resuming {writer.path}: {writer.done} prompt(s) already done")
    if not writer.complete:
        m, tok = _load(model, device)
        responses = [r["response"] if isinstance(r.get("response"), str) else None for r in records]
        for done, traces in revise_batches([r["prompt"] for r in records], responses, chosen, m, tok,
                                           start=writer.done, rounds=rounds, max_new_tokens=max_new_tokens,
                                           temperature=temperature, seed=seed, batch_size=batch_size):
            writer.append(traces, done=done)
        writer.finish()
    traces = writer.records()
    dataset = sft_records(traces)
    write_jsonl(out_dir / "sft.jsonl", dataset)
    print(f"{len(traces)} prompt(s) x {rounds} round(s): trace in {out_dir / 'trace.jsonl'}, "
          f"{len(dataset)} SFT example(s) in {out_dir / 'sft.jsonl'}")


@cai_app.command("label")
def label_cmd(
    prompts: Path = typer.Option(..., help="Prompts: JSONL with a 'prompt' field (e.g. cai redteam output), or one per line."),
    out: Path = typer.Option(..., help="Pairs JSONL to write: prompt, chosen, rejected, p_chosen, principle, labeler."),
    model: str = typer.Option("embedded", "--model", "-m", help="The policy that samples two responses per "
                                                                "prompt (the SL-CAI model). " + MODEL_HELP),
    feedback_model: str = typer.Option("embedded", help="The model asked which response is better (logprob mode)."),
    mode: str = typer.Option("logprob", help="logprob: log-likelihood of (A) vs (B) after a multiple-choice "
                                             "question (the CAI paper); judge: a judge YAML's scores."),
    judge: Optional[Path] = typer.Option(None, help="Judge YAML for --mode judge."),
    principles: str = typer.Option("human_rights,platform_terms,dialogue_rules", help=PRINCIPLES_HELP),
    template: Optional[Path] = typer.Option(None, help="Multiple-choice template YAML (template, answer_prefix, "
                                                       "options); default the shipped one."),
    order_swap: bool = typer.Option(True, help="Ask both orders and average, cancelling a letter preference."),
    margin: str = typer.Option("none", help="none, or log_odds: also write margin = log(p/(1-p)) for the "
                                            "reward model's Bradley-Terry loss with margin."),
    max_new_tokens: int = typer.Option(48, help="Most tokens per sampled response."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the two responses."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling threshold of the two responses."),
    seed: int = typer.Option(0, help="Seed for sampling and principle choice."),
    batch_size: int = typer.Option(8, help="Sequences generated at once."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """RLAIF: sample two responses per prompt and let an AI feedback model choose, into preference pairs.

    The soft label p_chosen (>= 0.5) is kept with every pair; `alignkit train reward
    data.train=OUT` trains the preference model on the pairs.
    Example: alignkit cai label --model runs/cai/sft/final --prompts redteam.jsonl --out pairs.jsonl
    """
    from alignkit.cai.constitution import select_principles
    from alignkit.cai.label import ABLabeler, JudgeLabeler, label_pairs, sample_pairs
    from alignkit.cai.templates import load_template
    from alignkit.data.prompts import load_prompts
    from alignkit.io import write_jsonl

    if mode not in ("logprob", "judge") or (mode == "judge") != (judge is not None):
        raise AlignkitError("--mode logprob (no --judge), or --mode judge with --judge FILE.yaml")
    if margin not in ("none", "log_odds"):
        raise AlignkitError(f"--margin must be none or log_odds, not {margin!r}")
    chosen = select_principles(principles)
    items = load_prompts(prompts)
    t = load_template(template or "compare", ("template", "answer_prefix", "options")) if mode == "logprob" else None
    policy, tok = _load(model, device)
    pairs, skipped = sample_pairs(policy, tok, items, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed, batch_size=batch_size)
    del policy
    if mode == "judge":
        from alignkit.evaluate.judges import load_judge

        j = load_judge(judge)
        labeler, name = JudgeLabeler(j), f"judge:{j.name}"
    else:
        fm, ftok = _load(feedback_model, device)
        labeler = ABLabeler(fm, ftok, t, order_swap=order_swap)
        name = f"ab_logprob:{feedback_model}" + (":order_swap" if order_swap else "")
    records = label_pairs(pairs, chosen, labeler, labeler_name=name, seed=seed, margin=margin)
    write_jsonl(out, records)
    print(f"{len(items)} prompt(s), {skipped} without two distinct responses; {len(records)} pair(s) "
          f"labeled by {name} written to {out}")


@cai_app.command("pipeline")
def pipeline_cmd(
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. revise.rounds=2 "
                                                               "sft.max_steps=40 run_name=cai2"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/cai.yaml)."),
    from_stage: Optional[str] = typer.Option(None, help="Rerun this stage and every later one (redteam, revise, "
                                                        "sft, label, reward, ppo, evaluate)."),
    until: Optional[str] = typer.Option(None, help="Stop after this stage."),
    overwrite: bool = typer.Option(False, help="Delete the run directory first and start over."),
):
    """Run the whole pipeline: redteam -> revise -> SFT (SL-CAI) -> label -> reward model -> PPO (RL-CAI)
    -> evaluate, each stage in its own subdirectory of the run directory and skipped when complete.

    The report (report.md, metrics.json) puts base, SL-CAI and RL-CAI side by side: harmlessness on
    held-out red-team prompts, helpfulness on benign prompts.
    Example: alignkit cai pipeline --config configs/cai.yaml
    """
    from alignkit.cai.config import CAIConfig
    from alignkit.cai.pipeline import run_pipeline
    from alignkit.config import load_config

    run_dir = run_pipeline(load_config(CAIConfig, config, overrides), from_stage=from_stage, until=until,
                           overwrite=overwrite)
    report = run_dir / "report.md"
    print(f"cai: run directory {run_dir}" + (f"; report in {report}" if report.is_file() else ""))
