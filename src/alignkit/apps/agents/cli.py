"""Command-line entry points for reasoning apps: `alignkit cot` (chain of thought) and `alignkit pal` (program-aided).

`register(app)` adds both commands to the main typer app. Both run on a local model (`--model`,
default the embedded SmolLM2-135M-Instruct) or, with `--base-url`, on any OpenAI-compatible server.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

MODEL_HELP = ("'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit, or a .gguf file; with --base-url, the served model's name")
BASE_URL_HELP = ("Use an OpenAI-compatible server instead of a local model, e.g. http://127.0.0.1:8000/v1 "
                 "(POST {base-url}/chat/completions).")
API_KEY_ENV_HELP = "Environment variable holding the server's API key (sent as a Bearer token; never printed)."


def make_backend(model: str, base_url: Optional[str], api_key_env: str, device: str):
    from alignkit.apps.agents.backends import LocalBackend, OpenAIBackend

    if base_url:
        return OpenAIBackend(base_url, model, api_key_env=api_key_env)
    return LocalBackend(model, device=device)


def cot(
    question: str = typer.Argument(..., help="The question to reason about, in quotes."),
    few_shot: bool = typer.Option(False, "--few-shot", help="Show worked examples first (Wei et al. 2022) "
                                  "instead of only saying \"Let's think step by step\" (Kojima et al. 2022)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    base_url: Optional[str] = typer.Option(None, help=BASE_URL_HELP),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=API_KEY_ENV_HELP),
    max_tokens: int = typer.Option(256, help="Most tokens of reasoning."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; >0 samples."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: question, reasoning, answer, method."),
):
    """Answer a question with chain-of-thought reasoning, then extract the final answer.

    The model is asked to reason step by step and to end with "The answer is X."; the answer is
    read from that line, else from a \\boxed{X}, else it is the last number in the reasoning (the
    method used is shown). Prompts: alignkit/prompts/cot_zero_shot.yaml and cot_few_shot.yaml.

    Example: alignkit cot "A pen costs 3 dollars. How much do 7 pens cost?" --few-shot
    """
    from alignkit.apps.agents.cot import run_cot

    result = run_cot(make_backend(model, base_url, api_key_env, device), question, few_shot=few_shot,
                     max_tokens=max_tokens, temperature=temperature)
    if as_json:
        print(json.dumps(result.to_dict()))
        if result.answer is None:
            raise typer.Exit(1)
        return
    print(result.reasoning)
    print(f"\nanswer: {result.answer if result.answer is not None else '(none found)'}  (method: {result.method})")
    if result.answer is None:
        raise typer.Exit(1)


def pal(
    question: str = typer.Argument(..., help="The question, in quotes; best for arithmetic and word problems."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    base_url: Optional[str] = typer.Option(None, help=BASE_URL_HELP),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=API_KEY_ENV_HELP),
    max_retries: int = typer.Option(2, help="How many times a failed program (no code, syntax error, "
                                    "exception, timeout, no `answer`) goes back to the model with the error."),
    constrained: bool = typer.Option(False, "--constrained", help="Decode the program under a grammar built "
                                     "from the question: one `name = <number>` line per number in the question, in "
                                     "order, then `answer = ...`; local models only."),
    timeout: float = typer.Option(5.0, help="Wall-clock limit per program run, in seconds."),
    max_tokens: int = typer.Option(256, help="Most tokens per model reply."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; >0 samples."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: code, attempts with their "
                                 "errors, sandbox result, answer and final answer."),
):
    """Answer a question by having the model write Python that runs in the sandbox (PAL, Gao et al. 2022).

    The model writes a program (reasoning as # comments, arithmetic as code, the result in a
    variable `answer`); the program runs behind the OS sandbox (see `alignkit sandbox run --help`);
    the model then states the computed result as a sentence. A program that does not set `answer`
    has failed and is retried; exit status 1 when no attempt produced an answer.
    Prompt: alignkit/prompts/pal_few_shot.yaml.

    Example: alignkit pal "What is 17 * 23?"   (the model alone says 381; the program computes 391)
    """
    from alignkit.apps.agents.pal import run_pal

    result = run_pal(make_backend(model, base_url, api_key_env, device), question, max_retries=max_retries,
                     max_tokens=max_tokens, temperature=temperature, timeout_s=timeout, constrained=constrained)
    if as_json:
        print(json.dumps(result.to_dict(), default=str))
    else:
        for number, attempt in enumerate(result.attempts, 1):
            print(f"--- program (attempt {number}) ---\n{attempt.code or attempt.reply}")
            if attempt.error:
                print(f"--- failed ({attempt.error_kind}): {attempt.error}")
        if result.ok:
            print(f"--- computed: answer = {json.dumps(result.answer, default=str)}")
            print(result.final_answer)
        else:
            print(f"error: {result.error}")
    if not result.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add the `cot` and `pal` commands to `app`."""
    app.command("cot")(cot)
    app.command("pal")(pal)
