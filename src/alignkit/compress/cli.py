"""The `alignkit compress` commands: quantize a model and report how much each layer lost.

Parsing and printing only; the work is in quantize.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


compress_app = typer.Typer(
    help="Compress models: post-training quantization with a per-layer error report.\n\n"
         "Start with `alignkit compress quantize --method int8-weight --out quantized/`; load the result "
         "with alignkit.compress.quantize.load_quantized.",
    no_args_is_help=True)

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit (merged before quantizing), or a .gguf file")


@compress_app.command("quantize")
def quantize_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced if it exists)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    method: str = typer.Option(..., help="int8-weight (int8 weights, per-channel), int8-dynamic (int8 weights "
                                         "and per-token int8 activations) or int4-weight (group-wise int4 weights)."),
    group_size: int = typer.Option(32, help="int4-weight only: input columns sharing one scale; must divide "
                                            "every layer's input size."),
    calib: Optional[Path] = typer.Option(None, help="Calibration text: JSONL (prompt + completion, text, or "
                                                     "messages) or one text per line. Default: the shipped "
                                                     "shop_sft.jsonl."),
    calib_samples: int = typer.Option(32, help="How many calibration texts to run."),
    observer: str = typer.Option("minmax", help="Activation range per layer: minmax (max |x|) or percentile "
                                                "(--percentile of |x|, which ignores rare outliers)."),
    percentile: float = typer.Option(99.9, help="Percentile of |x| for --observer percentile."),
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
                      observer=observer, percentile=percentile, device=device, progress=progress)
    print(format_error_table([LayerError(**l) for l in report["layers"]], limit=top))
    print(f"{report['layers_quantized']} layers quantized ({method}); mean relative error "
          f"{report['mean_rel_error']:.5f}, worst {report['max_rel_error']:.5f}; "
          f"weights {report['weights_file_bytes'] / 1e6:.2f} MB "
          f"(float {report['float_parameter_bytes'] / 1e6:.2f} MB)")
    print(f"saved {out} (report: {out / REPORT_FILE})")

