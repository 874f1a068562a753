"""The alignkit command line: one typer app, a sub-command per recipe.

Recipes take `--config FILE.yaml` plus `key.sub=value` overrides; every long step shows progress;
bad input gives a message naming the file, line and field, and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from alignkit.errors import AlignkitError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model loads from local files
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    help="alignkit: align, evaluate, compress and apply language models.\n\n"
         "Start with `alignkit generate --prompt 'Hello'` (the embedded SmolLM2-135M-Instruct is the "
         "default model), then `alignkit train sft --config configs/sft.yaml`.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]})
train_app = typer.Typer(help="Train a model: sft (more recipes arrive as they land).", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and convert models.", no_args_is_help=True)
app.add_typer(train_app, name="train")
sandbox_app = typer.Typer(help="Run untrusted Python behind an OS boundary (bubblewrap).", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(sandbox_app, name="sandbox")

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit (e.g. runs/NAME/final), or a .gguf file")
DEVICE_HELP = "auto (CUDA when present), cpu or cuda"


@app.command()
def generate(
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="A prompt; repeat for a batch."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(64, help="Most tokens to generate per prompt."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; >0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
    top_k: int = typer.Option(0, help="Top-k sampling (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for repeatable sampling."),
    chat: bool = typer.Option(True, help="Wrap prompts in the model's chat template."),
    logprobs: bool = typer.Option(False, help="Include per-token log-probs (with --json)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Generate completions for one or more prompts.

    Example: alignkit generate -p "Name three fruits." -p "What is 2+2?" --json
    """
    from alignkit.models import generate as gen, load_model

    m, tok = load_model(model, device=device)
    out = gen(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              top_k=top_k, seed=seed, return_logprobs=logprobs)
    for i, p in enumerate(prompt):
        if as_json:
            rec = {"prompt": p, "completion": out.texts[i], "tokens": out.tokens[i],
                   "finished": out.finished[i]}
            if logprobs:
                rec["logprobs"] = [round(x, 6) for x in out.logprobs[i].tolist()]
            print(json.dumps(rec))
        else:
            if len(prompt) > 1:
                print(f"### {p}")
            print(out.texts[i])


@app.command()
def chat(
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, help="System message for the conversation."),
    max_new_tokens: int = typer.Option(128, help="Most tokens per reply."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; >0 samples."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Chat with a model. Reads one message per line from the terminal or from piped input.

    Type /reset to forget the conversation, /exit (or Ctrl-D) to leave.
    """
    from transformers import TextStreamer

    from alignkit.models import generate as gen, load_model

    m, tok = load_model(model, device=device)
    interactive = sys.stdin.isatty()
    history = [{"role": "system", "content": system}] if system else []
    if interactive:
        print(f"chatting with {model}; /reset forgets, /exit leaves", file=sys.stderr)
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            print(f"you> {line}")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        history.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        out = gen(m, tok, [history], max_new_tokens=max_new_tokens, temperature=temperature,
                  streamer=streamer)
        history.append({"role": "assistant", "content": out.texts[0]})


@models_app.command("info")
def models_info(
    model: str = typer.Argument("embedded", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Parameters, dtype, adapters and context length of a model."""
    from alignkit.models import load_model
    from alignkit.models.loading import describe

    m, tok = load_model(model, device="cpu")
    info = describe(m, tok)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key in ("parameters", "trainable_parameters", "parameters_adapter"):
            value = f"{value:,}"
        print(f"{key:>22}: {value}")


@models_app.command("merge")
def models_merge(
    adapter: Path = typer.Argument(..., help="An adapter directory saved by alignkit."),
    out: Path = typer.Argument(..., help="Where to write the merged full model."),
):
    """Fold a LoRA adapter into its base weights and save a plain Hugging Face model directory."""
    from alignkit.models import load_model, merge_lora, save_model

    m, tok = load_model(str(adapter), device="cpu")
    if not hasattr(m, "peft_config"):
        raise AlignkitError(f"{adapter}: not an adapter directory (no adapter_config.json)")
    save_model(merge_lora(m), tok, out)
    print(f"merged {adapter} into {out}")


def _sft_epilog() -> str:
    from alignkit.config import SFTConfig, field_help

    return "Config keys (set in the YAML file or as key=value):\n\n" + "\n\n".join(field_help(SFTConfig))


@train_app.command("sft", epilog=_sft_epilog())
def train_sft(
    overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. lora.r=16 max_steps=20"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    resume: Optional[Path] = typer.Option(None, help="Continue a run directory from its newest checkpoint."),
    overwrite: bool = typer.Option(False, help="Delete an existing run directory of the same name first."),
):
    """Supervised fine-tuning (LoRA or full) on {"prompt","completion"} or {"messages"} JSONL.

    Example: alignkit train sft --config configs/sft.yaml max_steps=20 run_name=try1
    """
    from alignkit.config import SFTConfig, load_config
    from alignkit.recipes import sft
    from alignkit.runs import resume_config_path

    if resume is not None:
        if config is not None:
            raise AlignkitError("--resume takes the config saved in the run directory; drop --config "
                                "(key=value overrides still apply)")
        config = resume_config_path(resume)
    cfg = load_config(SFTConfig, config, overrides)
    sft.main(cfg, resume=resume, overwrite=overwrite)


@sandbox_app.command("run")
def sandbox_run(
    timeout: float = typer.Option(5.0, help="Wall-clock limit in seconds."),
    memory_mb: int = typer.Option(256, help="Address-space limit per process, in MiB."),
    unsafe_no_sandbox: bool = typer.Option(False, help="Trusted code only: run without the OS boundary."),
):
    """Run Python code read on stdin in the sandbox; print {"ok","stdout","stderr","result","error","limit"}.

    The code's `answer` variable comes back as "result". No network, a private /tmp, a read-only
    file system without the home or project directories, and CPU, memory, process and output limits.
    Example: echo 'answer = 17 * 23' | alignkit sandbox run
    """
    from alignkit.apps.agents.sandbox import cli_run

    raise typer.Exit(cli_run(timeout=timeout, memory_mb=memory_mb, unsafe_no_sandbox=unsafe_no_sandbox))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # peft calls a transformers API that transformers itself deprecates; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        app()
    except AlignkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
