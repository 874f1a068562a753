"""The feedback commands: `alignkit prefs` (sample candidates, validate, rankings -> pairs, AI judging)
and `alignkit label` (the human labeling page, its labelers and exports)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alignkit.cli_options import DEVICE_HELP, MODEL_HELP, RESTART_OPT
from alignkit.errors import AlignkitError

prefs_app = typer.Typer(help="Preference data: sample candidates, validate, rankings -> pairs, AI judging.",
                        no_args_is_help=True)
label_app = typer.Typer(help="Human labeling: a web page where labelers rank completions.", no_args_is_help=True)


@prefs_app.command("validate")
def prefs_validate(file: Path = typer.Argument(..., help="A pairs or rankings JSONL file.")):
    """List every problem in a pairs or rankings file with its line number; exit 1 if any."""
    from alignkit.data.prefs import validate

    fmt, valid, problems = validate(file)
    for p in problems:
        print(f"{file}:{p.removeprefix('line ')}" if p.startswith("line ") else f"{file}: {p}")
    print(f"{file}: {fmt}, {len(valid)} valid record(s), {len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@prefs_app.command("from-rankings")
def prefs_from_rankings(
    rankings: Path = typer.Argument(..., help="Rankings JSONL (ranks with ties and \"F\")."),
    out: Path = typer.Argument(..., help="Pairs JSONL to write."),
):
    """Turn rankings into pairs: strict orderings give pairs, ties none, F loses to every non-F.

    Several labelers on one item are aggregated by majority, and their agreement is reported.
    """
    from alignkit.data.prefs import load_rankings, rankings_to_pairs
    from alignkit.io import write_jsonl

    conv = rankings_to_pairs(load_rankings(rankings))
    write_jsonl(out, conv.pairs)
    print(f"{conv.items_in} ranked item line(s) in, {len(conv.pairs)} pair(s) out to {out}")
    for reason in conv.skipped:
        print(f"  skipped {reason}")
    if conv.agreement:
        a = conv.agreement
        print(f"agreement over {a['items']} item(s) with 2+ labelers ({a['units']} completion pairs): "
              f"{a['percent_agreement']:.1%} pairwise, Krippendorff's alpha {a['krippendorff_alpha']:.3f}")


@prefs_app.command("sample")
def prefs_sample(
    prompts: Path = typer.Option(..., help="Prompts: JSONL with a 'prompt' field, or one per line."),
    out: Path = typer.Option(..., help="Rankings JSONL to write, with empty ranks, ready to label."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    n: int = typer.Option(4, help="Completions per prompt."),
    max_new_tokens: int = typer.Option(96, help="Most tokens per completion."),
    temperature: float = typer.Option(0.8, help="Sampling temperature."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling threshold."),
    seed: int = typer.Option(0, help="Seed for repeatable samples."),
    batch_size: int = typer.Option(8, help="Sequences generated at once."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    restart: bool = RESTART_OPT,
):
    """Sample n completions per prompt into a rankings file for labeling.

    Records are appended batch by batch: after a crash or Ctrl-C, the same command again continues
    where it stopped and finishes the file an uninterrupted run would have written.
    Example: alignkit prefs sample --prompts prompts.txt --n 4 --out candidates.jsonl
    """
    from alignkit.data.sampling import sample_candidates

    if n < 2:
        raise AlignkitError("--n must be at least 2: a ranking needs two completions")
    s = sample_candidates(prompts, out, model=model, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seed=seed, batch_size=batch_size, device=device, restart=restart)
    if s["resumed_at"] == s["prompts"]:
        print(f"{out} is already complete: nothing to sample")
    elif s["resumed_at"]:
        print(f"resumed after {s['resumed_at']} of {s['prompts']} prompt(s) already in {out}")
    print(f"wrote {s['written']} prompt(s) with up to {n} completions each to {out}")
    for reason in s["skipped"]:
        print(f"  skipped {reason}")


@prefs_app.command("judge")
def prefs_judge(
    candidates: Path = typer.Option(..., help="Rankings JSONL of candidate completions (from `prefs sample`)."),
    judge: Path = typer.Option(..., help="Judge YAML: components (toxicity, sentiment, reward, classifier, "
                                         "llm) with weights, optional categories. See configs/judge.yaml."),
    out: Path = typer.Option(..., help="JSONL to write."),
    fmt: str = typer.Option("rankings", "--format", help="rankings (ranks from scores, ties share a rank) or "
                                                         "pairs (margin = score difference)."),
    min_margin: float = typer.Option(0.0, help="pairs only: skip pairs whose scores differ by less than this "
                                               "(a judge's near-ties are mostly noise)."),
    restart: bool = RESTART_OPT,
):
    """Label candidates with an AI judge; the judge is recorded as the labeler.

    Judged records are appended chunk by chunk; the same command again continues a killed run.

    Example: alignkit prefs judge --candidates cands.jsonl --judge configs/judge.yaml --out pairs.jsonl --format pairs
    """
    from alignkit.feedback.ai_label import judge_file

    if fmt not in ("rankings", "pairs"):
        raise AlignkitError(f"--format must be rankings or pairs, not {fmt!r}")
    if min_margin < 0:
        raise AlignkitError(f"--min-margin must be >= 0, not {min_margin}")
    s = judge_file(candidates, judge, out, fmt, min_margin=min_margin, restart=restart)
    print(f"{s['records_in']} record(s), {s['completions_scored']} completion(s) scored by {s['labeler']}; "
          f"{s['records_out']} {s['format']} record(s) written to {out}")


@label_app.command("serve")
def label_serve(
    db: Path = typer.Option(..., help="SQLite file holding tasks, labelers and labels (created if missing)."),
    tasks: Optional[Path] = typer.Option(None, help="Rankings JSONL to load as tasks (from `prefs sample`)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; tokens travel in clear, so keep it local "
                                                "or put a TLS proxy in front."),
    instructions: Optional[Path] = typer.Option(None, help="Markdown shown to labelers (default: the shipped "
                                                           "helpful/honest/harmless instructions)."),
):
    """Serve the labeling page. Add labelers first with `alignkit label add-labeler NAME --db DB`.

    Example: alignkit label serve --db labels.sqlite --tasks candidates.jsonl --port 8000
    """
    from alignkit.feedback.label_app import serve

    serve(db, tasks, port=port, host=host, instructions_path=instructions)


@label_app.command("add-labeler")
def label_add_labeler(
    name: str = typer.Argument(..., help="The labeler's name, as it will appear in exports."),
    db: Path = typer.Option(..., help="SQLite labeling database."),
    replace: bool = typer.Option(False, help="Issue a new token for an existing labeler (revokes the old one)."),
):
    """Create a labeler and print their access token (only its hash is stored: keep it safe)."""
    from alignkit.feedback.label_app import add_labeler

    print(add_labeler(db, name, replace=replace))


@label_app.command("export")
def label_export(
    db: Path = typer.Option(..., help="SQLite labeling database."),
    out: Path = typer.Option(..., help="Rankings JSONL to write (one line per task and labeler)."),
):
    """Write every label in the rankings format, ready for `alignkit prefs from-rankings`."""
    from alignkit.feedback.label_app import export

    n = export(db, out)
    print(f"exported {n} label(s) to {out}")
