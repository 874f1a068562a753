"""Structured output for the server: `response_format` and `tools` / `tool_choice`, decoded under a grammar.

    plan = structured_plan(req)                # None, or the grammar and tool prompt for the request
    messages = with_tool_prompt(messages, plan)
    ... decode each row under plan.grammar (alignkit.models.constrained.RowGrammarProcessor) ...
    call = tool_call(text, plan)               # a tool call dict for message.tool_calls, or None

As OpenAI defines them:
* `response_format: {"type": "json_object"}`: the reply is a JSON object;
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: a JSON value valid under
  `schema` (always enforced, whatever `strict` says); `{"type": "text"}`: no constraint.
* `tools: [{"type": "function", "function": {"name", "description", "parameters"}}]` with
  `tool_choice` "none" (plain text, the tools are not shown), "auto" (the default: the reply is
  either text that does not start with "{", or a call), "required" (a call of one of the tools) or
  `{"type": "function", "function": {"name": N}}` (a call of N). A call is written by the model as
  `{"name": ..., "arguments": {...}}`, with arguments valid under that tool's `parameters`; the
  server answers it as `message.tool_calls` with `finish_reason: "tool_calls"`.

The model learns of the tools from a system message (TOOL_PROMPT) listing them as JSON; the
tokenizer's own tool template is not used, since the grammar fixes the call format whatever the
model was trained on. One call per reply (`parallel_tool_calls` is accepted; at most one is made).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from alignkit.errors import AlignkitError
from alignkit.models.constrained import COMPACT_JSON, json_schema_grammar, lark_grammar
from alignkit.serve.errors import bad_request

TOOL_PROMPT = ("You can call these functions:\n{tools}\n"
               "To call one, reply with only a JSON object: "
               '{{"name": <the function name>, "arguments": <an object of its arguments>}}.{when}')
TOOL_WHEN = {"auto": " Otherwise answer in plain text.", "required": " Call one now.",
             "named": " Call {name} now."}


@dataclass
class StructuredPlan:
    """What a request asks of the shape of its reply."""

    grammar: str
    tools: dict[str, dict] | None = None
    """name -> function definition, when the reply may be a tool call."""
    tool_prompt: str | None = None


def _call_schema(name: str, function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": function["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}


def _tools(req) -> dict[str, dict]:
    functions: dict[str, dict] = {}
    for i, tool in enumerate(req.tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request('each tool must be {"type": "function", "function": {"name", "parameters"}}', param=param)
        function = dict(tool["function"])
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("a function needs a non-empty name", param=f"{param}.function.name")
        if name in functions:
            raise bad_request(f"two tools are named '{name}'", param=f"{param}.function.name")
        function["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
        try:
            json_schema_grammar(function["parameters"])
        except AlignkitError as e:
            raise bad_request(f"function '{name}': {e}", param=f"{param}.function.parameters",
                              code="invalid_function_parameters") from None
        functions[name] = function
    return functions


def _tool_choice(req, functions: dict[str, dict]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    if choice in ("none", "auto", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise bad_request(f"tool_choice names the function '{name}', which is not among the tools "
                              f"({', '.join(functions)})", param="tool_choice")
        return "named", name
    raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                      '{"name": ...}}', param="tool_choice")


def _response_format_grammar(fmt) -> str | None:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request('response_format.type must be "text", "json_object" or "json_schema"',
                          param="response_format.type")
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return json_schema_grammar({"type": "object"})
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request('response_format.json_schema must be an object with a "name" and a "schema"',
                          param="response_format.json_schema")
    try:
        return json_schema_grammar(spec.get("schema", {}))
    except AlignkitError as e:
        raise bad_request(str(e), param="response_format.json_schema.schema", code="invalid_json_schema") from None


def structured_plan(req) -> StructuredPlan | None:
    """The grammar (and tool prompt) a chat request asks for; None when it asks for free text.
    A 400 naming the parameter for a malformed schema, tool or tool_choice."""
    functions = _tools(req) if req.tools else {}
    if req.tool_choice is not None and not functions and req.tool_choice != "none":
        raise bad_request("tool_choice needs tools", param="tool_choice")
    choice, named = _tool_choice(req, functions) if functions else ("none", None)
    if choice == "none":
        return None if req.response_format is None else format_plan(req.response_format)
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise bad_request("response_format cannot be combined with tools unless tool_choice is \"none\"",
                          param="response_format")
    offered = {named: functions[named]} if named else functions
    call = {"anyOf": [_call_schema(n, f) for n, f in offered.items()], "x-guidance": COMPACT_JSON}
    rules = ["start: call" if choice != "auto" else "start: call | TEXT",
             f"call: %json {json.dumps(call)}",
             # Text that cannot be mistaken for a call: it does not start with "{".
             "TEXT: /(?s:[^{].*)/"]
    listing = "\n".join(json.dumps({"name": n, "description": f.get("description", ""),
                                    "parameters": f["parameters"]}) for n, f in functions.items())
    when = TOOL_WHEN[choice].format(name=named)
    return StructuredPlan(grammar=lark_grammar("\n".join(rules)), tools=offered,
                          tool_prompt=TOOL_PROMPT.format(tools=listing, when=when))


def format_plan(fmt) -> StructuredPlan | None:
    """The plan for a `response_format` alone (also taken by /v1/completions); None for free text."""
    grammar = _response_format_grammar(fmt)
    return StructuredPlan(grammar=grammar) if grammar is not None else None


def with_tool_prompt(messages: list[dict], plan: StructuredPlan | None) -> list[dict]:
    """`messages` with the tool listing added to the system message (or as a first one)."""
    if plan is None or plan.tool_prompt is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + plan.tool_prompt}, *messages[1:]]
    return [{"role": "system", "content": plan.tool_prompt}, *messages]


def tool_call(text: str, plan: StructuredPlan | None) -> dict | None:
    """The OpenAI tool call a reply stands for (id, type, function.name, function.arguments as JSON
    text), or None when the reply is text (or a call cut short by max_tokens)."""
    if plan is None or plan.tools is None or not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in plan.tools:
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(value.get("arguments", {}))}}


def history_message(message) -> dict:
    """A request message as the chat template sees it: an assistant turn that made tool calls is
    written as the call JSON the model itself would write; a tool result keeps its role."""
    content = message.text()
    if message.role == "assistant" and message.tool_calls:
        calls = []
        for call in message.tool_calls:
            function = call.get("function") or {}
            try:
                arguments = json.loads(function.get("arguments") or "{}")
            except (TypeError, json.JSONDecodeError):
                arguments = function.get("arguments")
            calls.append(json.dumps({"name": function.get("name"), "arguments": arguments}))
        content = "\n".join(([content] if content else []) + calls)
    return {"role": "system" if message.role == "developer" else message.role, "content": content}
