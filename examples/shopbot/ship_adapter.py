"""Copy a trained ShopBot adapter into the package (alignkit/data/adapters/shopbot), so that it installs with alignkit.

    make shopbot-train                                   # trains into runs/shopbot/final
    python -m examples.shopbot.evaluate --model runs/shopbot/final --prefix-reuse compare
    python -m examples.shopbot.ship_adapter --eval runs/shopbot/eval.json

Copies the LoRA weights as float16 (half the bytes of the float32 training copy; the largest change
of a weight is printed, about 1e-3 of its size), adapter_config.json with the base model named
"embedded" instead of the path where the trainer found it, alignkit.json, and the run's record:
the config it was trained with (config.yaml), its per-step metrics (metrics.jsonl: loss, learning
rate, gradient norm, seconds), and the evaluation JSON when given. Evaluate the shipped copy
again afterwards (`--model src/alignkit/data/adapters/shopbot`): it is what users run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from alignkit.errors import AlignkitError

from .app import SHIPPED_ADAPTER, run_script

WEIGHTS = "adapter_model.safetensors"


def ship(run_dir: Path, out: Path, evaluation: Path | None = None) -> float:
    """Write the shipped adapter into `out`; the largest absolute change of a weight by the float16 cast."""
    from safetensors.torch import load_file, save_file

    final = run_dir / "final"
    for name in (WEIGHTS, "adapter_config.json", "alignkit.json"):
        if not (final / name).is_file():
            raise AlignkitError(f"{final / name}: no such file; train the adapter first (make shopbot-train)")
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise AlignkitError(f"{run_dir / name}: no such file; is {run_dir} a run directory of alignkit train sft?")
    if evaluation is not None and not evaluation.is_file():
        raise AlignkitError(f"--eval {evaluation}: no such file")

    tensors = load_file(final / WEIGHTS)
    half = {name: t.half().contiguous() for name, t in tensors.items()}
    change = max(float((t - half[name].float()).abs().max()) for name, t in tensors.items())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(half, out / WEIGHTS, metadata={"format": "pt"})
    config = json.loads((final / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = json.loads((final / "alignkit.json").read_text())["base_model"]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy(final / "alignkit.json", out / "alignkit.json")
    shutil.copy(run_dir / "config.yaml", out / "train_config.yaml")
    shutil.copy(run_dir / "metrics.jsonl", out / "train_metrics.jsonl")
    if evaluation is not None:
        shutil.copy(evaluation, out / "eval.json")
    return change


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/shopbot"),
                        help="The training run directory (it holds final/, config.yaml and metrics.jsonl).")
    parser.add_argument("--eval", type=Path, default=None, help="An evaluate.py result to ship beside it.")
    parser.add_argument("--out", type=Path, default=SHIPPED_ADAPTER, help="Where the shipped adapter goes.")
    args = parser.parse_args(argv)
    change = ship(args.run, args.out, args.eval)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"shipped {args.run / 'final'} to {args.out} ({size / 1e6:.1f} MB; float16 changed a weight by "
          f"at most {change:.2e})")


if __name__ == "__main__":
    run_script(main)
