"""The `alignkit export` commands: a model as one GGUF file for llama.cpp, Ollama and LM Studio."""

from __future__ import annotations

from pathlib import Path

import typer

export_app = typer.Typer(
    help="Export a model for other runtimes.\n\n"
         "`alignkit export gguf runs/ppo1/final --out ppo1.gguf --quant q8_0` writes one file with the weights "
         "(an adapter merged into its base), the tokenizer and the chat template; llama.cpp, Ollama and "
         "LM Studio read it, and so does `--model ppo1.gguf` here.",
    no_args_is_help=True)


@export_app.command("gguf")
def gguf_cmd(
    model: str = typer.Argument(..., help="'embedded', a Hugging Face model directory, an adapter directory "
                                          "saved by alignkit (merged into its base on export), a merged or "
                                          "quantized directory, or a .gguf file. Llama architecture only."),
    out: Path = typer.Option(..., "--out", "-o", help="The .gguf file to write (replaced if it exists)."),
    quant: str = typer.Option("f16", help="f16 (half precision), q8_0 (8-bit blocks of 32) or q4_0 (4-bit blocks "
                                          "of 32; the embedding stays q8_0)."),
):
    """Write MODEL as a GGUF file with its tokenizer and chat template.

    Example: alignkit export gguf embedded --out smollm2-q8.gguf --quant q8_0
    Then: llama-cli -m smollm2-q8.gguf -cnv, or an Ollama Modelfile with `FROM ./smollm2-q8.gguf`.
    """
    from alignkit.export.to_gguf import QUANTS, export_gguf

    if quant not in QUANTS:
        raise typer.BadParameter(f"must be one of {', '.join(QUANTS)}, got {quant!r}", param_hint="--quant")
    info = export_gguf(model, out, quant=quant)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(info["tensors"].items()))
    print(f"wrote {out}: {info['bytes'] / 1e6:.1f} MB, {info['parameters'] / 1e6:.1f}M parameters ({kinds})"
          f"{', tied embeddings' if info['tied_embeddings'] else ''}"
          f"{', chat template' if info['chat_template'] else ', no chat template'}")
