"""The ReAct agent: a model that alternates reasoning with tool calls until it can answer (Yao et al. 2022).

`run_agent` is one loop you can read top to bottom: build the prompt from the question and the
steps so far (the scratchpad) -> call the model, stopped at "Observation:" -> parse its reply
(Plan / Thought / Action / Action Input, or Final Answer) -> run the tool -> record the step.

Mistakes the model makes become the observation of that step, so it can correct itself on the
next one: a reply in the wrong format (a reminder of the format; after `max_parse_retries`
such replies in a row the run stops), a tool that does not exist (the available ones are listed),
arguments that do not fit the tool or a tool that raises (the error message), and a call it already
made with the same arguments (answered with the earlier observation instead of running it again;
after `max_repeated_calls` such repeats the run stops). Reaching `max_steps` without a final answer
ends the run with the message "stopped after N steps without a final answer" and the steps made.

Errors that are not the model's stop the run by raising: a backend that cannot be reached
(BackendError), a malformed prompt file (ConfigError), a bug in this code.

The prompt, the few-shot examples and everything the agent says back to the model are data:
`alignkit/prompts/react_few_shot.yaml`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alignkit.apps.agents.backends import (ChatBackend, LocalBackend, OpenAIBackend, ToolsRefused,
                                           cut_at_stop)
from alignkit.apps.agents.cot import PROMPTS_DIR, load_prompt_file
from alignkit.apps.agents.tools import Tool, ToolArgumentError
from alignkit.apps.agents.trace import TraceLog
from alignkit.errors import AlignkitError
from alignkit.models.constrained import COMPACT_JSON, json_string, lark_grammar

REACT_FEW_SHOT_FILE = PROMPTS_DIR / "react_few_shot.yaml"
PROMPT_KEYS = ("system", "user", "observation", "format_error", "unknown_tool", "tool_error", "repeated_call")
STOP = ["Observation:"]
MAX_LINE_CHARS = 120
"""Longest Plan, Thought or Final Answer line a constrained reply may write."""

_LABEL = re.compile(r"^[ \t]*(Plan|Thought|Action Input|Action|Final Answer)[ \t]*:[ \t]*", re.MULTILINE | re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass
class AgentStep:
    """One model call and what came of it; also one "step" record of the trace."""

    step: int
    output: str
    """The model's reply, cut at "Observation:"."""
    prompt_chars: int
    prompt_tokens: int | None
    """Tokens of the prompt as the model sees it; None for backends that cannot count them (HTTP)."""
    latency_s: float
    """Seconds the model call took."""
    plan: str | None = None
    thought: str | None = None
    tool: str | None = None
    arguments: dict | None = None
    observation: str | None = None
    """What the model is shown after this step: the tool's result, or what went wrong."""
    tool_latency_s: float | None = None
    final_answer: str | None = None
    error_kind: str | None = None
    """None, or "format", "unknown_tool", "arguments", "tool_error", "repeated"."""
    error: str | None = None
    protocol: str | None = None
    """How the reply was obtained: "grammar" (a local model decoding under `step_grammar`), "tool_calls"
    (a server's tool calling made the call; the output is the call written as Action lines),
    "tools_text" (tools were offered, the server's model answered in text), "text" (the text protocol)."""
    protocol_note: str | None = None
    """Why a step fell back to the text protocol (the server refused tools), on the first such step."""


@dataclass
class AgentResult:
    question: str
    answer: str | None
    status: str
    """"answered", "step_limit", "format_errors" or "repeated_calls"."""
    message: str
    """One sentence on how the run ended, e.g. "stopped after 8 steps without a final answer"."""
    steps: list[AgentStep] = field(default_factory=list)
    plan: str | None = None
    """The latest plan the model stated, if it stated one."""

    def to_dict(self) -> dict:
        return asdict(self)


class ReplyFormatError(Exception):
    """A model reply that is neither an action nor a final answer; the message tells the model what is missing."""


@dataclass
class ParsedReply:
    plan: str | None
    thought: str | None
    tool: str | None
    tool_input: str | None
    """The Action Input as written (None when there is none); `tool_arguments` interprets it."""
    final_answer: str | None


def parse_reply(text: str) -> ParsedReply:
    """Split a reply into its labelled sections; ReplyFormatError when it has no usable action or answer.

    When a reply has both an Action and a Final Answer, the one that comes first counts: an answer
    written after an action was written before the model could see the action's result.
    """
    matches = list(_LABEL.finditer(text))
    sections: dict[str, str] = {}
    for match, following in zip(matches, matches[1:] + [None]):
        label = match.group(1).lower()
        body = text[match.end():following.start() if following else len(text)].strip()
        sections.setdefault(label, body)  # the first of each label counts; later ones are the model rambling
    order = [m.group(1).lower() for m in matches]
    preamble = text[:matches[0].start()].strip() if matches else text.strip()
    thought = sections.get("thought") or preamble or None
    plan = sections.get("plan") or None
    decisions = [label for label in order if label in ("action", "final answer")]
    if not text.strip():
        raise ReplyFormatError("the reply is empty.")
    if not decisions:
        if "action input" in sections:
            raise ReplyFormatError('there is an "Action Input:" but no "Action:" line naming the tool.')
        raise ReplyFormatError('the reply has neither an "Action:" line nor a "Final Answer:" line.')
    if decisions[0] == "final answer":
        if not sections["final answer"]:
            raise ReplyFormatError('"Final Answer:" is followed by nothing.')
        return ParsedReply(plan, thought, None, None, sections["final answer"])
    tool = sections["action"].splitlines()[0].strip().strip("`'\"").strip() if sections["action"] else ""
    if not tool:
        raise ReplyFormatError('"Action:" must be followed by the name of a tool.')
    return ParsedReply(plan, thought, tool, sections.get("action input"), None)


def tool_arguments(tool: Tool, tool_input: str | None) -> dict:
    """The arguments an Action Input stands for: a JSON object, or a plain string for a tool with one required argument.

    ReplyFormatError for a JSON object that does not parse; ToolArgumentError for input that does
    not fit the tool (Tool.call checks the arguments themselves).
    """
    if tool_input is None or not tool_input.strip():
        return {}
    text = tool_input.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    if text.startswith("{"):
        try:
            # raw_decode: text after the object (a model going on talking) is not part of the input
            value, _ = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            raise ReplyFormatError(f"the Action Input is not valid JSON ({e.msg} at column {e.colno}); "
                                   f"write it as one JSON object, e.g. {tool.signature()}.") from None
        return value
    required = tool.parameters["required"]
    if len(required) != 1:
        raise ToolArgumentError(f"tool '{tool.name}' takes several arguments: give the Action Input as a "
                                f"JSON object {tool.signature()}")
    if text.startswith('"'):
        try:
            text = json.loads(text)  # a quoted string: its content is the argument
        except json.JSONDecodeError:
            pass
    return {required[0]: text}


def describe_tools(tools: list[Tool]) -> str:
    """One entry per tool for the system prompt: name, description, arguments with their descriptions."""
    entries = []
    for tool in tools:
        lines = [f"- {tool.name}: {tool.description}", f"  Action Input: {tool.signature()}"]
        for name, prop in tool.parameters["properties"].items():
            if prop.get("description"):
                lines.append(f"    {name}: {prop['description']}")
        entries.append("\n".join(lines))
    return "\n".join(entries)


def react_messages(prompt: dict, tools: list[Tool], question: str) -> list[dict]:
    """The chat before the agent's first step: system prompt with the tools, the worked examples, the question."""
    tool_names = ", ".join(t.name for t in tools)
    messages = [{"role": "system", "content": prompt["system"].format(tools=describe_tools(tools),
                                                                      tool_names=tool_names)}]
    for example in prompt.get("examples", []):
        messages.append({"role": "user", "content": prompt["user"].format(question=example["question"])})
        for step in example["steps"]:
            messages.append({"role": "assistant", "content": step["reply"]})
            if "observation" in step:
                messages.append({"role": "user", "content": prompt["observation"].format(observation=step["observation"])})
    messages.append({"role": "user", "content": prompt["user"].format(question=question)})
    return messages


def scratchpad_messages(prompt: dict, steps: list[AgentStep]) -> list[dict]:
    """The agent's steps so far as turns: each reply, then its observation."""
    messages = []
    for step in steps:
        messages.append({"role": "assistant", "content": step.output})
        messages.append({"role": "user", "content": prompt["observation"].format(observation=step.observation)})
    return messages


def step_grammar(tools: list[Tool], *, plan: bool, final: bool) -> str:
    """The grammar of one agent reply: an optional Plan line (with `plan`), a Thought line (no "="), then an Action
    naming one of `tools` with an Action Input valid for that tool's JSON schema, or (with `final`)
    a Final Answer line. Decoding under it, a reply cannot be in the wrong format, name a tool that
    does not exist, give arguments that do not fit, or go on to write an observation.
    """
    calls = " | ".join(f'"Action: " {json_string(t.name)} "\\nAction Input: " args_{i}' for i, t in enumerate(tools))
    rules = [f"start: {'plan? ' if plan else ''}\"Thought: \" THOUGHT \"\\n\" {'(call | final)' if final else 'call'}",
             'plan: "Plan: " LINE "\\n"',
             f"call: {calls}",
             'final: "Final Answer: " LINE',
             # Bounded, so that a model that rambles is made to come to the point within max_tokens.
             f"LINE: /[^\\n]{{1,{MAX_LINE_CHARS}}}/",
             # A thought says what to do next; computing is the tools' work. A small model that
             # writes "= <result>" in its thought has guessed the result, then copies the guess.
             f"THOUGHT: /[^\\n=]{{1,{MAX_LINE_CHARS}}}/"]
    rules += [f"args_{i}: %json {json.dumps({**t.parameters, 'x-guidance': COMPACT_JSON})}" for i, t in enumerate(tools)]
    return lark_grammar("\n".join(rules))


def openai_tool(tool: Tool) -> dict:
    """`tool` as an OpenAI function definition, for servers with tool calling."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


def served_tool_step(backend: OpenAIBackend, messages: list[dict], tools: list[Tool], *, tool_choice: str,
                     max_tokens: int, temperature: float) -> tuple[str, str]:
    """(reply, protocol) of one step through the server's tool calling: a call comes back as
    `tool_calls` and is written as the Action lines the text protocol uses, so that the scratchpad
    and the parser read it like any other step. ToolsRefused when the server refuses tools."""
    text, call = backend.chat_tools(messages, [openai_tool(t) for t in tools], tool_choice=tool_choice,
                                    max_tokens=max_tokens, temperature=temperature, stop=STOP)
    if call is None:
        return text, "tools_text"
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return f"Action: {call['name']}\nAction Input: {arguments}", "tool_calls"


def prompt_tokens(backend: ChatBackend, messages: list[dict]) -> int | None:
    """Tokens of the prompt for a local model; None for a served one, whose tokenizer we do not have."""
    if not isinstance(backend, LocalBackend):
        return None
    from alignkit.models.generation import render_prompt

    text = render_prompt(backend.tokenizer, messages)
    return len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])


def run_agent(backend: ChatBackend, tools: list[Tool], question: str, *, max_steps: int = 8,
              max_parse_retries: int = 2, max_repeated_calls: int = 2, trace_path: Path | None = None,
              prompt: Path | dict = REACT_FEW_SHOT_FILE, max_tokens: int = 256,
              temperature: float = 0.0, constrained: bool = True,
              tool_choice: str = "auto") -> AgentResult:
    """Answer `question` with a ReAct loop over `tools`; the behaviour is described in the module docstring.

    `prompt` is a prompt YAML file or its already loaded content. With `trace_path`, every step is
    appended to that JSONL file as it happens (see `alignkit.apps.agents.trace`). With `constrained`
    and a local model, every reply is decoded under `step_grammar`; with `constrained` and a served
    model (OpenAIBackend), each step offers the tools through the server's tool calling, and once
    the server refuses tools (400/422) the run goes on with the text protocol and its checks (each
    step's `protocol` says which ran). `tool_choice` "required" makes the first reply a tool call (as
    in OpenAI's API): a small model otherwise often "answers" an arithmetic question from memory.
    """
    if tool_choice not in ("auto", "required"):
        raise AlignkitError(f"tool_choice must be 'auto' or 'required', got {tool_choice!r}")
    if max_steps < 1:
        raise AlignkitError(f"max_steps must be at least 1, got {max_steps}")
    tools_by_name = {t.name: t for t in tools}
    if not tools_by_name:
        raise AlignkitError("the agent needs at least one tool")
    if len(tools_by_name) != len(tools):
        raise AlignkitError(f"two tools have the same name: {', '.join(t.name for t in tools)}")
    if not isinstance(prompt, dict):
        prompt = load_prompt_file(Path(prompt), PROMPT_KEYS)
    tool_names = ", ".join(tools_by_name)
    head = react_messages(prompt, tools, question)
    trace = TraceLog(trace_path) if trace_path is not None else None
    if trace:
        trace.start(question, list(tools_by_name), max_steps)

    grammars = None
    if constrained and isinstance(backend, LocalBackend):
        grammars = {first: step_grammar(tools, plan=first, final=not (first and tool_choice == "required"))
                    for first in (True, False)}
    served_tools = constrained and isinstance(backend, OpenAIBackend)
    steps: list[AgentStep] = []
    calls: dict[tuple[str, str], AgentStep] = {}  # (tool, arguments as JSON) -> the step that made the call
    plan, status, format_errors_in_a_row, repeats = None, "step_limit", 0, 0
    try:
        while len(steps) < max_steps:
            messages = head + scratchpad_messages(prompt, steps)
            started = time.perf_counter()
            protocol, note = "text", None
            if grammars:
                protocol = "grammar"
                reply = backend.chat(messages, max_tokens=max_tokens, temperature=temperature,
                                     grammar=grammars[not steps])
            elif served_tools and backend.tool_calling is not False:
                try:
                    reply, protocol = served_tool_step(
                        backend, messages, tools, max_tokens=max_tokens, temperature=temperature,
                        tool_choice="required" if not steps and tool_choice == "required" else "auto")
                except ToolsRefused as e:
                    note = f"the server refused tool calling, so the text protocol is used from here: {e}"
                    reply = backend.chat(messages, max_tokens=max_tokens, temperature=temperature, stop=STOP)
            else:
                reply = backend.chat(messages, max_tokens=max_tokens, temperature=temperature, stop=STOP)
            # Servers that ignore `stop` would let the model write its own (invented) observation.
            output = cut_at_stop(reply, STOP).strip()
            step = AgentStep(step=len(steps) + 1, output=output,
                             prompt_chars=sum(len(m["content"]) for m in messages),
                             prompt_tokens=prompt_tokens(backend, messages),
                             latency_s=round(time.perf_counter() - started, 4), protocol=protocol,
                             protocol_note=note)
            steps.append(step)

            try:
                parsed = parse_reply(output)
                format_errors_in_a_row = 0
                step.plan, step.thought = parsed.plan, parsed.thought
                plan = parsed.plan or plan
                if parsed.final_answer is None:
                    step.tool = parsed.tool
                    tool = tools_by_name.get(parsed.tool)
                    step.arguments = tool_arguments(tool, parsed.tool_input) if tool else None
            except ReplyFormatError as e:
                format_errors_in_a_row += 1
                step.error_kind, step.error = "format", str(e)
                step.observation = prompt["format_error"].format(problem=e)
            except ToolArgumentError as e:
                step.error_kind, step.error = "arguments", str(e)
                step.observation = prompt["tool_error"].format(error=e)

            call_key = (step.tool, json.dumps(step.arguments, sort_keys=True))
            if step.error_kind:
                pass  # the observation already says what went wrong
            elif parsed.final_answer is not None:
                step.final_answer = parsed.final_answer
                status = "answered"
            elif step.tool not in tools_by_name:
                step.error_kind = "unknown_tool"
                step.error = f"unknown tool '{step.tool}' (available: {tool_names})"
                step.observation = prompt["unknown_tool"].format(tool=step.tool, tool_names=tool_names)
            elif call_key in calls:
                earlier = calls[call_key]
                repeats += 1
                step.error_kind = "repeated"
                step.error = f"same call as step {earlier.step}"
                step.observation = prompt["repeated_call"].format(step=earlier.step, observation=earlier.observation)
            else:
                calls[call_key] = step
                tool_started = time.perf_counter()
                try:
                    step.observation = tools_by_name[step.tool].call(step.arguments)
                except ToolArgumentError as e:
                    step.error_kind, step.error = "arguments", str(e)
                    step.observation = prompt["tool_error"].format(error=e)
                except Exception as e:  # whatever a tool raises is the tool's failure, shown to the model
                    step.error_kind, step.error = "tool_error", f"{type(e).__name__}: {e}"
                    step.observation = prompt["tool_error"].format(error=e if str(e) else type(e).__name__)
                step.tool_latency_s = round(time.perf_counter() - tool_started, 4)

            if trace:
                trace.write("step", **asdict(step))
            if status == "answered":
                break
            if format_errors_in_a_row > max_parse_retries:
                status = "format_errors"
                break
            if repeats > max_repeated_calls:
                status = "repeated_calls"
                break

        n = len(steps)
        message = {
            "answered": f"answered after {n} step{'s' if n != 1 else ''}",
            "step_limit": f"stopped after {n} steps without a final answer",
            "format_errors": f"stopped after {n} steps without a final answer: {format_errors_in_a_row} "
                             "replies in a row could not be parsed",
            "repeated_calls": f"stopped after {n} steps without a final answer: the model repeated an "
                              f"earlier tool call {repeats} times",
        }[status]
        result = AgentResult(question=question, answer=steps[-1].final_answer, status=status, message=message,
                             steps=steps, plan=plan)
        if trace:
            trace.write("end", status=status, answer=result.answer, message=message, steps=n)
        return result
    finally:
        if trace:
            trace.close()
