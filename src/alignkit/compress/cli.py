"""The `alignkit compress` commands: quantize, prune, distill, and report every variant beside the original.

Parsing and printing only; the work is in quantize.py, prune.py, distill.py and report.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from alignkit.compress.distill_config import DistillConfig
from alignkit.config import field_help

compress_app = typer.Typer(
    help="Compress models: quantization, pruning and distillation, and a side-by-side report.\n\n"
         "Start with `alignkit compress quantize --method int8-weight --out quantized/`, then "
         "`alignkit compress report quantized/ --baseline embedded --out report/`. Every result loads "
         "with `--model DIR` like any other model.",
    no_args_is_help=True)

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit (merged before quantizing), or a .gguf file")


@compress_app.command("quantize")
def quantize_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced if it exists)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option(..., help="int8-weight (int8 weights, per-channel), int8-dynamic (int8 weights "
                                         "and per-token int8 activations) or int4-weight (group-wise int4 weights)."),
    group_size: int = typer.Option(32, help="int4-weight (and --embedding int4): input columns sharing one bf16 "
                                            "scale: 32, 64, 128 or 256 (torch's CPU int4 kernel); must divide "
                                            "every layer's input size. 32 is closest to float, 64 a little smaller."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text: JSONL (prompt + completion, text, or "
                                                     "messages) or one text per line. Default: the shipped "
                                                     "shop_sft.jsonl."),
    calib_samples: int = typer.Option(32, help="How many calibration texts to run."),
    observer: str = typer.Option("minmax", help="Activation range per layer: minmax (max |x|) or percentile "
                                                "(--percentile of |x|, which ignores rare outliers)."),
    percentile: float = typer.Option(99.9, help="Percentile of |x| for --observer percentile."),
    embedding: str = typer.Option("float", help="The (tied) embedding and LM head: float (kept as is), int8 (one "
                                                "scale per row, stored int8 on disk, dequantized when loaded; "
                                                "shrinks the file, not the memory) or int4 (groups of --group-size, "
                                                "packed on disk and in memory; the smallest, and the largest loss: "
                                                "the head's error reaches the logits undamped)."),
    top: int = typer.Option(20, help="Layers shown in the table (all are in the JSON report)."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
):
    """Quantize a model's linear layers, calibrate, print per-layer errors worst-first, save to --out.

    Example: alignkit compress quantize --method int4-weight --group-size 32 --out smollm2-int4
    """
    # Imported here: torch takes seconds to import, and `alignkit --help` should not wait for it.
    from alignkit.compress.quantize import METHODS, OBSERVERS, REPORT_FILE, LayerError, format_error_table, quantize

    if method not in METHODS:
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}, got {method!r}", param_hint="--method")
    if observer not in OBSERVERS:
        raise typer.BadParameter(f"must be one of {', '.join(OBSERVERS)}, got {observer!r}",
                                 param_hint="--observer")

    def progress(done, total):
        print(f"\rcalibrating {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = quantize(model, out, method=method, group_size=group_size, calib=calib, calib_samples=calib_samples,
                      observer=observer, percentile=percentile, embedding=embedding, device=device,
                      progress=progress)
    print(format_error_table([LayerError(**l) for l in report["layers"]], limit=top))
    print(f"{report['layers_quantized']} layers quantized ({method}); mean relative error "
          f"{report['mean_rel_error']:.5f}, worst {report['max_rel_error']:.5f}; "
          f"weights {report['weights_file_bytes'] / 1e6:.2f} MB "
          f"(float {report['float_parameter_bytes'] / 1e6:.2f} MB)")
    print(f"saved {out} (report: {out / REPORT_FILE})")



@compress_app.command("prune")
def prune_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced if it exists)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option(..., help="magnitude (smallest |W|), wanda (smallest |W| * ||X|| per output row, "
                                         "from calibration activations) or structured (whole MLP channels: "
                                         "real, smaller matrices)."),
    sparsity: float = typer.Option(0.5, help="Fraction of weights (or of MLP channels, for structured) removed, "
                                             "in [0, 1); hit exactly."),
    scope: str = typer.Option("layer", help="magnitude only: layer (the same sparsity in every layer) or global "
                                            "(the smallest weights of the whole model)."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text for wanda, structured and recovery: one "
                                                     "text per line, or JSONL. Default: the shipped held-out "
                                                     "calibration text."),
    calib_samples: int = typer.Option(64, help="How many calibration texts to use."),
    recovery: str = typer.Option("none", help="Recovery fine-tuning on the calibration text: none, lora (merged, "
                                              "then masked again) or full (gradients masked)."),
    recovery_steps: int = typer.Option(20, help="Recovery optimizer steps."),
    learning_rate: float = typer.Option(2e-4, help="Recovery learning rate (AdamW)."),
    batch_size: int = typer.Option(4, help="Recovery texts per step."),
    lora_r: int = typer.Option(8, help="LoRA rank for --recovery lora (alpha is 2r)."),
    seed: int = typer.Option(0, help="Seed for the recovery data order and LoRA initialisation."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
):
    """Prune a model's linear layers to --sparsity, optionally recover with masked fine-tuning, save to --out.

    Example: alignkit compress prune --method wanda --sparsity 0.5 --recovery lora --recovery-steps 30 --out wanda50
    """
    from alignkit.compress.prune import METHODS, RECOVERY, SCOPES, prune

    for value, allowed, hint in ((method, METHODS, "--method"), (scope, SCOPES, "--scope"),
                                 (recovery, RECOVERY, "--recovery")):
        if value not in allowed:
            raise typer.BadParameter(f"must be one of {', '.join(allowed)}, got {value!r}", param_hint=hint)
    info = prune(model, out, method=method, sparsity=sparsity, scope=scope, calib=calib,
                 calib_samples=calib_samples, recovery=recovery, recovery_steps=recovery_steps,
                 learning_rate=learning_rate, batch_size=batch_size, lora_r=lora_r, seed=seed, device=device)
    extra = (f"; MLP {info['intermediate_size_before']} -> {info['intermediate_size_after']} channels"
             if method == "structured" else "")
    losses = info.get("recovery_losses")
    recovered = f"; recovery loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""
    print(f"{method}: {info['parameters'] / 1e6:.2f}M parameters, measured sparsity of the linear layers "
          f"{info['measured_sparsity']:.4f}{extra}{recovered}")
    print(f"saved {out} (details: {out / 'prune.json'})")


def _distill_epilog() -> str:
    return "Config keys (set in the YAML file or as key=value):\n\n" + "\n\n".join(field_help(DistillConfig))


@compress_app.command("distill", epilog=_distill_epilog())
def distill_cmd(
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. temperature=4 "
                                                                "student.intermediate_size=768 max_steps=20"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    resume: Optional[Path] = typer.Option(None, help="Continue a run directory from its newest checkpoint."),
    overwrite: bool = typer.Option(False, help="Delete an existing run directory of the same name first."),
):
    """Distil a teacher into a smaller student (built from the teacher's layers, or another model).

    Example: alignkit compress distill --config configs/distill.yaml max_steps=20 run_name=student1
    """
    from alignkit.compress import distill
    from alignkit.config import load_config
    from alignkit.errors import AlignkitError
    from alignkit.runs import resume_config_path

    if resume is not None:
        if config is not None:
            raise AlignkitError("--resume takes the config saved in the run directory; drop --config "
                                "(key=value overrides still apply)")
        config = resume_config_path(resume)
    distill.main(load_config(DistillConfig, config, overrides), resume=resume, overwrite=overwrite)


@compress_app.command("report")
def report_cmd(
    variants: List[Path] = typer.Argument(..., help="Model directories to compare: quantized, pruned, distilled "
                                                    "(a run's final/), or any model directory."),
    baseline: str = typer.Option("embedded", "--baseline", "-b", help="The original model: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for report.md, metrics.json and "
                                                      "size_vs_quality.png (replaced if it exists)."),
    reward: Optional[Path] = typer.Option(None, help="A reward-model directory (or judge YAML): adds mean reward "
                                                     "and toxicity of greedy replies to shipped prompts."),
    eval_text: Optional[Path] = typer.Option(None, help="Held-out text, one text per line. Default: the shipped "
                                                         "held-out eval text."),
    threads: int = typer.Option(2, help="CPU threads for the speed measurement."),
    new_tokens: int = typer.Option(16, help="Tokens generated per prompt when timing."),
    speed: bool = typer.Option(True, help="Measure peak memory and tokens/s in a fresh process per model "
                                          "(--no-speed skips it: tens of seconds a model)."),
):
    """Measure every variant beside the baseline: size, memory, speed, perplexity, agreement, KL.

    Example: alignkit compress report int8/ wanda50/ runs/student/final --baseline embedded --out report/
    """
    from alignkit.compress.report import report

    results = report(variants, baseline, out, reward=reward, eval_text=eval_text, threads=threads,
                     new_tokens=new_tokens, speed=speed)
    print((out / "report.md").read_text())
    print(f"saved {out / 'report.md'}, {out / 'metrics.json'} and {out / 'size_vs_quality.png'} "
          f"({len(results)} models)")
