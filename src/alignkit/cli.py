"""The alignkit command line: one typer app, a sub-command per recipe.

Recipes take `--config FILE.yaml` plus `key.sub=value` overrides; every long step shows progress;
bad input gives a message naming the file, line and field, and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional

import typer

from alignkit.config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig, field_help
from alignkit.cli_options import DEVICE_HELP, MODEL_HELP, RESTART_OPT
from alignkit.errors import AlignkitError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model loads from local files
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _exit_3_when_input_was_skipped(*_results, **_params) -> None:
    """After a command that used what it could of a damaged input, say so in the exit code (3)."""
    from alignkit.io import take_skipped

    skipped = take_skipped()
    if skipped:
        places = list(dict.fromkeys(where.split(": ", 1)[0] for where in skipped))  # file:line, once each
        named = ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")
        print(f"warning: finished with what was usable, but {len(skipped)} bad input part(s) were skipped "
              f"({named}; each named above); exit code 3", file=sys.stderr)
        raise typer.Exit(3)


app = typer.Typer(
    result_callback=_exit_3_when_input_was_skipped,
    help="alignkit: align, evaluate, compress and apply language models.\n\n"
         "Start with `alignkit generate --prompt 'Hello'` (the embedded SmolLM2-135M-Instruct is the "
         "default model), then `alignkit train sft --config configs/sft.yaml`. Every command has --help; "
         "`alignkit train RECIPE --help` lists every config key with its default.",
    no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]})


@app.callback()
def _start() -> None:
    # Skips recorded before this command started (in an earlier one of this process) are not its own.
    from alignkit.io import take_skipped

    take_skipped()


train_app = typer.Typer(help="Train a model: sft, reward, dpo, ppo, grpo.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect and convert models.", no_args_is_help=True)
reward_app = typer.Typer(help="Use a trained reward model.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Run untrusted Python behind an OS boundary (bubblewrap).", no_args_is_help=True)
def _rag_app():
    from alignkit.apps.rag.cli import rag_app

    return rag_app


def _compress_app():
    from alignkit.compress.cli import compress_app

    return compress_app


def _cai_app():
    from alignkit.cai.cli import cai_app

    return cai_app


from alignkit.feedback.cli import label_app, prefs_app  # noqa: E402  (after `app`, like the groups above)

for sub, name in ((train_app, "train"), (models_app, "models"), (prefs_app, "prefs"), (label_app, "label"),
                  (reward_app, "reward"), (_compress_app(), "compress"), (_rag_app(), "rag"),
                  (sandbox_app, "sandbox"), (_cai_app(), "cai")):
    app.add_typer(sub, name=name)


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
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="A JSON schema file: every "
                                               "completion is JSON valid under it (decoded under the schema)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Every completion fully matches this regular "
                                        "expression, e.g. '(yes|no)' or '[0-9]{1,4}'."),
):
    """Generate completions for one or more prompts.

    Example: alignkit generate -p "Name three fruits." -p "What is 2+2?" --json
    Structured: alignkit generate -p "A user record for Ann, 31" --json-schema user.schema.json
    """
    from alignkit.models import generate as gen, load_model
    from alignkit.models.constrained import GrammarLogitsProcessor, json_schema_grammar, regex_grammar
    from alignkit.models.generation import eos_ids

    if json_schema is not None and regex is not None:
        raise AlignkitError("give --json-schema or --regex, not both")
    grammar = None
    if json_schema is not None:
        if not json_schema.is_file():
            raise AlignkitError(f"--json-schema {json_schema}: no such file")
        grammar = json_schema_grammar(json_schema.read_text())
    elif regex is not None:
        grammar = regex_grammar(regex)
    m, tok = load_model(model, device=device)
    processor = GrammarLogitsProcessor(tok, grammar, eos_token_ids=eos_ids(tok, m)) if grammar else None
    out = gen(m, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              top_k=top_k, seed=seed, return_logprobs=logprobs, logits_processor=processor)
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


def _epilog(cls) -> str:
    return "Config keys (set in the YAML file or as key=value):\n\n" + "\n\n".join(field_help(cls))


def _train(cls, recipe_main, config, overrides, resume, overwrite):
    from alignkit.config import load_config
    from alignkit.runs import resume_config_path

    if resume is not None:
        if config is not None:
            raise AlignkitError("--resume takes the config saved in the run directory; drop --config "
                                "(key=value overrides still apply)")
        config = resume_config_path(resume)
    recipe_main(load_config(cls, config, overrides), resume=resume, overwrite=overwrite)


OVERRIDES_HELP = "key.sub=value overrides, e.g. lora.r=16 max_steps=20"
CONFIG_OPT = typer.Option(None, "--config", "-c", help="YAML config file.")
RESUME_OPT = typer.Option(None, help="Continue a run directory from its newest checkpoint.")
OVERWRITE_OPT = typer.Option(False, help="Delete an existing run directory of the same name first.")


@train_app.command("sft", epilog=_epilog(SFTConfig))
def train_sft(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = CONFIG_OPT, resume: Optional[Path] = RESUME_OPT, overwrite: bool = OVERWRITE_OPT,
):
    """Supervised fine-tuning (LoRA or full) on {"prompt","completion"} or {"messages"} JSONL.

    Example: alignkit train sft --config configs/sft.yaml max_steps=20 run_name=try1
    """
    from alignkit.recipes import sft

    _train(SFTConfig, sft.main, config, overrides, resume, overwrite)


@train_app.command("reward", epilog=_epilog(RewardConfig))
def train_reward(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = CONFIG_OPT, resume: Optional[Path] = RESUME_OPT, overwrite: bool = OVERWRITE_OPT,
):
    """Pairwise reward model (Bradley-Terry, optional margin and centering) on pairs JSONL.

    Example: alignkit train reward --config configs/reward.yaml run_name=rm1
    """
    from alignkit.recipes import reward

    _train(RewardConfig, reward.main, config, overrides, resume, overwrite)


@train_app.command("dpo", epilog=_epilog(DPOConfig))
def train_dpo(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = CONFIG_OPT, resume: Optional[Path] = RESUME_OPT, overwrite: bool = OVERWRITE_OPT,
):
    """Direct preference optimisation on pairs JSONL; the reference is the model as loaded.

    Start from an SFT adapter (model: runs/NAME/final) to make that SFT model the reference.
    Example: alignkit train dpo --config configs/dpo.yaml run_name=dpo1
    """
    from alignkit.recipes import dpo

    _train(DPOConfig, dpo.main, config, overrides, resume, overwrite)


@train_app.command("ppo", epilog=_epilog(PPOConfig))
def train_ppo(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = CONFIG_OPT, resume: Optional[Path] = RESUME_OPT, overwrite: bool = OVERWRITE_OPT,
):
    """RLHF with PPO: LoRA policy, KL penalty against the adapter-disabled base, value head, GAE.

    The reward is a reward-model run (alignkit train reward) or a judge YAML. PPO uses rollout_batch
    and minibatch_size; micro_batch_size, grad_accum and epochs do not apply.
    Example: alignkit train ppo --config configs/ppo.yaml reward=runs/rm max_steps=20
    """
    from alignkit.recipes import ppo

    _train(PPOConfig, ppo.main, config, overrides, resume, overwrite)


@train_app.command("grpo", epilog=_epilog(GRPOConfig))
def train_grpo(
    overrides: Optional[List[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[Path] = CONFIG_OPT, resume: Optional[Path] = RESUME_OPT, overwrite: bool = OVERWRITE_OPT,
):
    """Critic-free RL: GRPO, Dr. GRPO or RLOO (advantage=...), group_size completions per prompt.

    No value head: each completion's baseline is its group. The reward is a reward-model run, a judge
    YAML or a Python function, as for PPO; KL to the adapter-disabled base in the loss (k3) or in the reward.
    Example: alignkit train grpo --config configs/grpo.yaml reward=configs/judge_safety.yaml max_steps=20
    """
    from alignkit.recipes import grpo

    _train(GRPOConfig, grpo.main, config, overrides, resume, overwrite)


@app.command("eval")
def eval_models(
    models: str = typer.Option(..., help="Comma-separated name=model pairs, e.g. before=embedded,after=runs/ppo1/final; "
                                         "win rates are against the first."),
    prompts: Path = typer.Option(..., help="Held-out prompts: JSONL with a 'prompt' field, or one per line."),
    reward: Optional[Path] = typer.Option(None, help="Reward-model run or directory, or a judge YAML, for mean reward."),
    judge: Optional[Path] = typer.Option(None, help="Independent judge YAML for judge scores and win rates "
                                                    "(one not used as the training reward)."),
    max_new_tokens: int = typer.Option(48, help="Most tokens per completion (greedy decoding)."),
    tie_margin: float = typer.Option(0.0, help="Judge scores closer than this count as a tie in win rates."),
    out: Optional[Path] = typer.Option(None, help="Report directory (replaced if it exists): report.md, report.html, "
                                                  "metrics.json and PNG plots. Default runs/eval-DATE-TIME."),
    samples: int = typer.Option(8, help="Prompts whose completions the report shows side by side."),
    batch_size: int = typer.Option(32, min=1, help="Prompts generated at once: larger is faster on CPU up to "
                                                   "about 64, and holds more memory."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    restart: bool = RESTART_OPT,
    expect: Optional[List[str]] = typer.Option(
        None, help="A figure the run must reach, e.g. 'after.win_rate_vs_before>=0.7' or "
                   "'after.toxicity_mean<=before.toxicity_mean' (repeatable). The report is written either way; "
                   "a missed expectation exits with status 1."),
):
    """Compare models on held-out prompts: reward, KL to the base (adapters), toxicity (mean and share
    above 0.5), sentiment, length, distinct-2, and win rate by an independent judge; write a report.

    A model given as RUN_DIR/final of an alignkit training run brings its run into the report: PPO
    runs plot reward, KL, judge and length per step and list their monitor warnings; DPO runs plot
    loss and margin per step. Give a PPO and a DPO run trained on the same pairs to compare them.

    Completions are kept batch by batch in OUT.completions.jsonl beside the report directory: a
    killed evaluation, run again with the same --out, continues, and a rerun generates nothing again.

    Example: alignkit eval --models before=embedded,ppo=runs/ppo1/final,dpo=runs/dpo1/final \\
             --prompts held_out.txt --reward runs/rm --judge configs/judge_safety.yaml --out runs/report
    """
    from alignkit.data.prompts import load_prompts
    from alignkit.evaluate import expect as expectations
    from alignkit.evaluate.compare import evaluate_models
    from alignkit.evaluate.completion_cache import CompletionCache
    from alignkit.evaluate.rewards import load_reward
    from alignkit.evaluate.report import write_report

    pairs = [item.split("=", 1) for item in models.split(",") if item]
    if not pairs or any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise AlignkitError(f"--models: expected name=model[,name=model...], got {models!r}")
    wanted = [expectations.parse(e) for e in expect or []]  # bad syntax fails before any generation
    expectations.check(wanted, {name: {} for name, _ in pairs})  # and so does an unknown model name
    reward_fn = load_reward(reward, device)[0] if reward else None
    judge_fn = None
    if judge is not None:
        from alignkit.evaluate.judges import load_judge

        judge_fn = load_judge(judge).score
    prompt_list = load_prompts(prompts)
    out = out or Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    cache = CompletionCache(out.with_name(out.name + ".completions.jsonl"), dict(pairs), prompt_list,
                            max_new_tokens=max_new_tokens, batch_size=batch_size, restart=restart)
    reports = evaluate_models(dict(pairs), prompt_list, reward=reward_fn, judge=judge_fn,
                              max_new_tokens=max_new_tokens, device=device, tie_margin=tie_margin, cache=cache)
    keys = list(dict.fromkeys(k for r in reports for k in r.metrics))
    print(f"{'metric':<28}" + "".join(f"{r.name:>14}" for r in reports))
    for k in keys:
        cells = [r.metrics.get(k) for r in reports]
        print(f"{k:<28}" + "".join(f"{'-' if c is None else round(c, 4):>14}" for c in cells))
    meta = {"prompts": str(prompts), "reward": str(reward) if reward else None,
            "judge": str(judge) if judge else None, "max_new_tokens": max_new_tokens, "tie_margin": tie_margin}
    write_report(out, reports, prompt_list, dict(pairs), meta, samples=samples)
    print(f"report: {out / 'report.html'} (also report.md, metrics.json and plots)")
    results = expectations.check(wanted, {r.name: r.metrics for r in reports})
    for e, met, compared in results:
        print(f"expect {e.text}: {compared}: {'met' if met else 'MISSED'}")
    missed = [e.text for e, met, _ in results if not met]
    if missed:
        print(f"{len(missed)} of {len(results)} expectation(s) missed: {'; '.join(missed)}", file=sys.stderr)
        raise typer.Exit(1)


def _reward_dir(model: Path) -> Path:
    """Accept a run directory (uses its final/) or a saved reward-model directory."""
    from alignkit.models.heads import HEAD_FILE, is_reward_model
    from alignkit.models.pooled_head import POOLED_HEAD_FILE

    for cand in (model, model / "final"):
        if is_reward_model(cand):
            return cand
    raise AlignkitError(f"{model}: not a reward model (no {HEAD_FILE} or {POOLED_HEAD_FILE} in it or in its final/)")


@reward_app.command("score")
def reward_score(
    model: Path = typer.Option(..., "--model", "-m", help="Reward run directory or its final/ directory."),
    prompt: Optional[str] = typer.Option(None, help="Prompt to score a completion for."),
    completion: Optional[str] = typer.Option(None, help="Completion to score."),
    file: Optional[Path] = typer.Option(None, help="JSONL of {prompt, completion} or pairs {prompt, chosen, rejected}."),
    out: Optional[Path] = typer.Option(None, help="With --file: write records plus scores here (default: stdout)."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
):
    """Score completions with a trained reward model: one (--prompt, --completion) or a whole --file.

    Example: alignkit reward score -m runs/rm1 --prompt "Where is my order?" --completion "Not my problem."
    """
    from alignkit.io import read_jsonl, write_jsonl
    from alignkit.models.heads import load_reward_model

    if (prompt is None) != (completion is None) or (file is None) == (prompt is None):
        raise AlignkitError("give either --prompt and --completion, or --file")
    rm, tok = load_reward_model(_reward_dir(model), device=device)
    if file is None:
        print(f"{rm.score_texts(tok, [prompt], [completion])[0]:.6f}")
        return
    records = [rec for _, rec in read_jsonl(file)]
    problems = [f"line {i + 1}: needs 'prompt' and 'completion', or 'prompt', 'chosen' and 'rejected'"
                for i, r in enumerate(records) if "prompt" not in r or not ({"completion"} <= r.keys()
                                                                            or {"chosen", "rejected"} <= r.keys())]
    if problems:
        from alignkit.errors import DataError

        raise DataError(file, problems)
    jobs = [(i, key) for i, r in enumerate(records) for key in ("completion", "chosen", "rejected") if key in r]
    scores = rm.score_texts(tok, [records[i]["prompt"] for i, _ in jobs], [records[i][k] for i, k in jobs],
                            batch_size=batch_size, progress=True)
    for (i, key), s in zip(jobs, scores):
        records[i]["reward" if key == "completion" else f"reward_{key}"] = round(s, 6)
    if out is None:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))
    else:
        write_jsonl(out, records)
        pairs = [r for r in records if "reward_chosen" in r]
        acc = f"; chosen scored higher in {sum(r['reward_chosen'] > r['reward_rejected'] for r in pairs)}/{len(pairs)} pairs" if pairs else ""
        print(f"scored {len(scores)} completions into {out}{acc}")


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


def _register_agent_commands():
    from alignkit.apps.agents.agent_cli import register_agent
    from alignkit.apps.agents.cli import register

    register(app)  # cot, pal
    register_agent(app)  # agent run, agent trace


_register_agent_commands()


def _export_app():
    from alignkit.export.cli import export_app

    return export_app


app.add_typer(_export_app(), name="export")


def _register_serve():
    from alignkit.serve.cli import register_serve

    register_serve(app)


_register_serve()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # torchao (imported by peft and transformers when installed) logs that its CUDA kernels failed to
    # load on CPU-only machines: harmless, and nothing a user can act on.
    # The same import makes torch warn about torchao's Enum registrations (a deprecation inside torchao).
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
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
