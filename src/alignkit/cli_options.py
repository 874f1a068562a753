"""Option help texts and options that several command groups share."""

import typer

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit (e.g. runs/NAME/final), or a .gguf file")
DEVICE_HELP = "auto (CUDA when present), cpu or cuda"
RESTART_OPT = typer.Option(False, help="Start over instead of continuing an unfinished output of this command.")
