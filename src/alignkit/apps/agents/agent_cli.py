"""Command-line entry points for the ReAct agent: `alignkit agent run` answers a question with tools, `alignkit agent trace` shows a run.

`register_agent(app)` adds the `agent` group to the main typer app. Tools come from `--tools`: the
built-in set "builtin" (calculator, python), one built-in tool by name, a Python file (`my_tools.py`)
or an importable module (`package.module`); in a module, every `Tool` object at top level (what
`@tool` makes) is collected. Several sources are joined with commas.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from alignkit.apps.agents.cli import API_KEY_ENV_HELP, BASE_URL_HELP, MODEL_HELP, make_backend
from alignkit.apps.agents.tools import BUILTIN_TOOLS, Tool
from alignkit.errors import AlignkitError

TOOLS_HELP = ('Where the tools come from: "builtin" (calculator, python), a built-in tool name, a Python '
              'file (tools.py) or a module (package.module) whose @tool functions are used; join several '
              'with commas, e.g. "builtin,my_tools.py".')


def _module_tools(source: str) -> list[Tool]:
    """The Tool objects defined at the top level of a Python file or an importable module."""
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise AlignkitError(f"--tools {source}: no such file")
        # A name of its own, so two tool files called tools.py do not replace each other in sys.modules.
        spec = importlib.util.spec_from_file_location(f"alignkit_agent_tools_{abs(hash(path.resolve()))}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except (SyntaxError, ValueError) as e:  # ValueError: null bytes, on some Python versions
            raw = path.read_bytes()
            line = getattr(e, "lineno", None) or (raw[:raw.index(b"\0")].count(b"\n") + 1 if b"\0" in raw else 1)
            what = "binary data (NUL bytes), not Python" if b"\0" in raw else f"invalid Python: {getattr(e, 'msg', e)}"
            raise AlignkitError(f"--tools {source}:{line}: {what}") from None
        except ImportError as e:
            if "relative import" not in str(e):
                raise
            dotted = ".".join(path.with_suffix("").parts)
            raise AlignkitError(f"--tools {source}: this file is part of a package (it imports its neighbours "
                                f"with 'from .'); give it as a module: --tools {dotted}") from None
    else:
        # As `python -m` does, look in the working directory too: the console script's sys.path does not
        # hold it, so `--tools examples.shopbot.tools` from the repository root would not be found.
        cwd = str(Path.cwd())
        added = cwd not in sys.path and "" not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(source)
        except ModuleNotFoundError as e:
            if e.name and source.startswith(e.name):  # the module itself is missing, not one it imports
                raise AlignkitError(f"--tools {source}: no module named {e.name!r} here or on the Python path; "
                                    "give \"builtin\", a tool name, a .py file or an importable module") from None
            raise
        finally:
            if added:
                sys.path.remove(cwd)
    tools = [value for value in vars(module).values() if isinstance(value, Tool)]
    if not tools and callable(getattr(module, "make_tools", None)):
        raise AlignkitError(f"--tools {source}: defines no ready tools; its make_tools() builds them per "
                            "conversation, bound to services that must be running and to a signed-in "
                            "customer, which `agent run` cannot provide. Run its own application instead "
                            "(for the ShopBot: make shopbot-demo, or python -m examples.shopbot.run_demo).")
    if not tools:
        raise AlignkitError(f"--tools {source}: defines no tools; decorate typed, documented functions "
                            "with @tool (from alignkit.apps.agents.tools import tool)")
    return tools


def load_tools(spec: str) -> list[Tool]:
    """The tools named by a --tools value (see the module docstring); AlignkitError for duplicate names."""
    tools: list[Tool] = []
    for source in (s.strip() for s in spec.split(",")):
        if not source:
            continue
        if source == "builtin":
            tools.extend(BUILTIN_TOOLS.values())
        elif source in BUILTIN_TOOLS:
            tools.append(BUILTIN_TOOLS[source])
        else:
            tools.extend(_module_tools(source))
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AlignkitError(f"--tools {spec}: more than one tool named {', '.join(duplicates)}")
    if not tools:
        raise AlignkitError("--tools names no tools")
    return tools


agent_app = typer.Typer(help="A ReAct agent: reason, call tools, answer; and read its traces.",
                        no_args_is_help=True)


@agent_app.command("run")
def run(
    question: str = typer.Argument(..., help="The question, in quotes."),
    tools: str = typer.Option("builtin", "--tools", "-t", help=TOOLS_HELP),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP),
    base_url: Optional[str] = typer.Option(None, help=BASE_URL_HELP),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help=API_KEY_ENV_HELP),
    max_steps: int = typer.Option(8, help="Most model calls before the agent gives up."),
    max_parse_retries: int = typer.Option(2, help="How many unparseable replies in a row are answered "
                                          "with a format reminder before the run stops."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="Append every step to this JSONL file "
                                         "(read it with `alignkit agent trace FILE`)."),
    prompt: Optional[Path] = typer.Option(None, help="A ReAct prompt YAML file instead of "
                                          "alignkit/prompts/react_few_shot.yaml."),
    max_tokens: int = typer.Option(256, help="Most tokens per model reply."),
    temperature: float = typer.Option(0.0, help="0 for greedy decoding; >0 samples."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    constrained: bool = typer.Option(True, "--constrained/--free", help="Local models: decode every reply "
                                     "under a grammar (Thought, then an Action with arguments valid for the "
                                     "tool's schema, or a Final Answer), so no reply is malformed. With "
                                     "--base-url: offer the tools through the server's OpenAI tool calling "
                                     "(`tools`, `tool_choice`; calls come back as `tool_calls`), and fall back "
                                     "to the text protocol if the server refuses tools (HTTP 400/422). --free: "
                                     "the text protocol, plain decoding stopped at \"Observation:\", checked "
                                     "after the fact. Each step's `protocol` in --json and --trace says which "
                                     "ran: grammar, tool_calls, tools_text or text."),
    tool_choice: str = typer.Option("required", help="required: the first reply must call a tool (a small "
                                    "model otherwise answers arithmetic from memory); auto: it may answer at "
                                    "once. Applies to constrained local models and to servers' tool calling."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: question, answer, status, "
                                 "message, plan and every step."),
):
    """Answer a question with a ReAct agent: Thought, Action, Observation, ..., Final Answer.

    On a local model every reply is decoded under a grammar; on a server (--base-url) the tools go
    through its tool calling, with the text protocol as the fallback (see --constrained). Wrong formats,
    unknown tools, bad arguments, failing tools and repeated calls are shown to the model as
    observations so it can correct itself. Exit status 1 when the run ends without a final answer
    (the step limit, too many unparseable replies or repeated calls).

    Example: alignkit agent run --tools builtin --trace run.jsonl "What is 17 * 23 + 4?"
    """
    from alignkit.apps.agents.react import REACT_FEW_SHOT_FILE, run_agent

    tool_list = load_tools(tools)
    result = run_agent(make_backend(model, base_url, api_key_env, device), tool_list, question,
                       max_steps=max_steps, max_parse_retries=max_parse_retries, trace_path=trace,
                       prompt=prompt or REACT_FEW_SHOT_FILE, max_tokens=max_tokens, temperature=temperature,
                       constrained=constrained, tool_choice=tool_choice)
    if as_json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        for step in result.steps:
            print(f"--- step {step.step}")
            print(step.output)
            if step.observation is not None:
                print(f"Observation: {step.observation}")
        print(f"--- {result.message}")
        if result.answer is not None:
            print(f"answer: {result.answer}")
    if result.answer is None:
        raise typer.Exit(1)


@agent_app.command("trace")
def trace(
    file: Path = typer.Argument(..., help="A trace written by `alignkit agent run --trace FILE`."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Show only the run with this id "
                                         "(a file can hold many runs)."),
):
    """Show an agent trace as text: each step's thought, action, observation; errors marked "!!".

    Example: alignkit agent trace run.jsonl
    """
    from alignkit.apps.agents.trace import read_trace, render_trace

    records = read_trace(file)
    if run_id is not None:
        records = [r for r in records if r.get("run") == run_id]
        if not records:
            raise AlignkitError(f"{file}: no run with id {run_id!r}")
    sys.stdout.write(render_trace(records))


def register_agent(app: typer.Typer) -> None:
    """Add the `agent` command group (`run`, `trace`) to `app`."""
    app.add_typer(agent_app, name="agent")
