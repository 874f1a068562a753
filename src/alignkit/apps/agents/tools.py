"""Tools for agents: typed Python functions whose JSON schema comes from their signature and docstring.

A tool is a plain function with type hints on every argument and a Google-style docstring:

    @tool
    def convert(amount: float, unit: Literal["km", "mi"] = "km") -> str:
        '''Convert a distance.

        Args:
            amount: The distance to convert.
            unit: The unit `amount` is in.
        '''

The first docstring paragraph becomes the description, the `Args:` entries the argument
descriptions. Supported annotations: str, int, float, bool, list[X], dict, Optional[X] / X | None,
Literal[...]. Arguments without a default are required.

`Tool.call(args)` checks the arguments a model produced against the schema before calling (a missing,
unknown or wrongly typed argument raises ToolArgumentError with a message the model can act on) and
returns an observation: a str result as it is, anything else as JSON.
"""

from __future__ import annotations

import ast
import inspect
import json
import operator
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

from alignkit.errors import AlignkitError


class ToolArgumentError(AlignkitError):
    """The arguments given to a tool do not match its schema; the message says which and how."""


class ToolError(AlignkitError):
    """A tool ran but could not do what was asked (e.g. a malformed expression); the message says why."""


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object"}


def _schema(annotation: Any, where: str) -> dict:
    """JSON schema of one annotation; TypeError for annotations a model could not fill in."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _SIMPLE:
        return {"type": _SIMPLE[annotation]}
    if origin is list:
        return {"type": "array", "items": _schema(args[0], where) if args else {}}
    if origin is dict:
        return {"type": "object"}
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or kinds.pop() not in _SIMPLE:
            raise TypeError(f"{where}: Literal values must all be of one of str, int, float, bool")
        return {"type": _SIMPLE[type(args[0])], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and len(args) == 2:
            return {"anyOf": [_schema(options[0], where), {"type": "null"}]}
        raise TypeError(f"{where}: only Optional[X] unions are supported, not {annotation}")
    raise TypeError(f"{where}: unsupported type {annotation!r}; use str, int, float, bool, list[...], "
                    "dict, Optional[...] or Literal[...]")


def _check(value: Any, schema: dict, path: str) -> str | None:
    """None when `value` fits `schema`, else what is wrong with it."""
    if "anyOf" in schema:
        if value is None:
            return None
        return _check(value, schema["anyOf"][0], path)
    kind = schema.get("type")
    # bool is a subclass of int in Python, but true is not a number in JSON
    fits = {"string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "array": isinstance(value, list),
            "object": isinstance(value, dict)}.get(kind, True)
    if not fits:
        return f"'{path}' must be {_describe(schema)}, got {type(value).__name__} {json.dumps(value, default=repr)[:80]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"'{path}' must be one of {json.dumps(schema['enum'])}, got {json.dumps(value)}"
    if kind == "array":
        for i, item in enumerate(value):
            problem = _check(item, schema["items"], f"{path}[{i}]")
            if problem:
                return problem
    return None


def _describe(schema: dict) -> str:
    if "anyOf" in schema:
        return f"{_describe(schema['anyOf'][0])} or null"
    kind = schema.get("type", "any value")
    if kind == "array":
        items = schema.get("items", {})
        return f"an array of {items['type']}s" if "type" in items and items["type"] != "array" else "an array"
    return {"integer": "an integer", "object": "an object"}.get(kind, f"a {kind}")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph joined into one line, {argument: description}) from a Google-style docstring."""
    lines = inspect.cleandoc(doc or "").splitlines()
    first: list[str] = []
    for line in lines:
        if not line.strip():
            break
        first.append(line.strip())
    arg_docs: dict[str, str] = {}
    in_args, current, arg_indent = False, None, None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped) and indent == 0:
            in_args, current, arg_indent = True, None, None
            continue
        if not in_args:
            continue
        if stripped and indent == 0:  # the next section ("Returns:", ...) ends the arguments
            break
        if not stripped:
            continue
        entry = re.match(r"(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)", stripped)
        if entry and (arg_indent is None or indent <= arg_indent):
            arg_indent = indent
            current = entry.group(1).lstrip("*")
            arg_docs[current] = entry.group(3).strip()
        elif current is not None:  # a continuation line of the current argument
            arg_docs[current] = f"{arg_docs[current]} {stripped}".strip()
    return " ".join(first), arg_docs


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    """JSON schema of the arguments: {"type": "object", "properties", "required", "additionalProperties": false}."""
    fn: Callable[..., Any]

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        """Build a tool from a typed function; TypeError when an argument has no supported type hint."""
        tool_name = name or fn.__name__
        description, arg_docs = parse_docstring(fn.__doc__)
        if not description:
            raise TypeError(f"tool '{tool_name}': the function needs a docstring; its first paragraph "
                            "tells the model what the tool does")
        hints = typing.get_type_hints(fn)
        properties, required = {}, []
        for param in inspect.signature(fn).parameters.values():
            where = f"tool '{tool_name}', argument '{param.name}'"
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise TypeError(f"{where}: *args and **kwargs cannot be described to a model")
            if param.name not in hints:
                raise TypeError(f"{where}: needs a type hint")
            prop = _schema(hints[param.name], where)
            if param.name in arg_docs:
                prop["description"] = arg_docs[param.name]
            if param.default is param.empty:
                required.append(param.name)
            else:
                prop["default"] = param.default
            properties[param.name] = prop
        parameters = {"type": "object", "properties": properties, "required": required,
                      "additionalProperties": False}
        return cls(name=tool_name, description=description, parameters=parameters, fn=fn)

    def validate(self, args: dict) -> dict:
        """The arguments with defaults filled in; ToolArgumentError naming every problem otherwise."""
        if not isinstance(args, dict):
            raise ToolArgumentError(f"tool '{self.name}': arguments must be a JSON object of "
                                    f"{self.signature()}, got {type(args).__name__}")
        properties = self.parameters["properties"]
        problems = [f"unknown argument '{k}'" for k in args if k not in properties]
        problems += [f"missing required argument '{k}' ({_describe(properties[k])})"
                     for k in self.parameters["required"] if k not in args]
        problems += [p for k, v in args.items() if k in properties
                     for p in [_check(v, properties[k], k)] if p]
        if problems:
            raise ToolArgumentError(f"tool '{self.name}': {'; '.join(problems)}. "
                                    f"Expected arguments: {self.signature()}")
        return {**{k: p["default"] for k, p in properties.items() if "default" in p}, **args}

    def call(self, args: dict) -> str:
        """Validate `args`, call the function and return its result as an observation string."""
        result = self.fn(**self.validate(args))
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)

    def signature(self) -> str:
        """A short, readable form of the arguments, e.g. `{"expression": string, "places"?: integer}`."""
        properties = self.parameters["properties"]
        required = set(self.parameters["required"])
        parts = [f'"{k}"{"" if k in required else "?"}: {_describe(p).removeprefix("a ").removeprefix("an ")}'
                 for k, p in properties.items()]
        return "{" + ", ".join(parts) + "}"

    def to_openai(self) -> dict:
        """The tool in the OpenAI function-calling format."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def tool(fn: Callable[..., Any]) -> Tool:
    """Decorator: turn a typed, documented function into a Tool."""
    return Tool.from_function(fn)


# --- built-in tools ---------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
              ast.Div: operator.truediv, ast.Pow: operator.pow}
_MAX_RESULT_BITS = 100_000  # 2**100000 has ~30k digits: big enough for arithmetic, cheap to compute


def _evaluate(node: ast.AST) -> int | float:
    # An interpreter of numbers and five operators, not a Python sandbox: names, calls, attributes
    # and every other node are refused, so there is nothing to escape to.
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            # 9**9**9 would take minutes and gigabytes: bound the size of the result first.
            bits = max(abs(left), 2).bit_length() if isinstance(left, int) else 64
            if abs(right) > 10_000 or bits * abs(right) > _MAX_RESULT_BITS:
                raise ToolError(f"{left} ** {right} is too large to compute")
        try:
            value = _OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large for a float") from None
        if isinstance(value, complex):  # (-8) ** 0.5
            raise ToolError(f"{left} ** {right} is not a real number")
        return value
    raise ToolError("only numbers, + - * / ** and parentheses are allowed, found "
                    f"'{ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__}'")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of numbers, + - * / ** and parentheses.

    Args:
        expression: The expression, e.g. "17 * 23" or "(3 + 4) ** 2 / 7".
    """
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    value = _evaluate(tree)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # "391", not "391.0", for 782 / 2
    return str(value)


# What an expression may contain, as a JSON-schema pattern: a model decoding under the tool's schema
# (alignkit.models.constrained) can then only write arithmetic here, not "12.5% of 368".
calculator.parameters["properties"]["expression"].update(pattern=r"^[0-9.+\-*/() ]+$", maxLength=200)


@tool
def python(code: str, timeout_s: float = 5.0) -> str:
    """Run a Python program in an isolated sandbox and report its output and its `answer` variable.

    The sandbox has no network, no access to files outside a private /tmp, and limits on CPU,
    memory and time. Store the result in a variable named `answer` or print it.

    Args:
        code: The complete program to run.
        timeout_s: Wall-clock limit in seconds.
    """
    from alignkit.apps.agents.sandbox import run_code

    result = run_code(code, timeout_s=min(timeout_s, 60.0))
    lines = []
    if result.stdout:
        lines.append(f"stdout:\n{result.stdout.rstrip()}")
    if result.ok:
        if result.result is not None:
            lines.append(f"answer = {json.dumps(result.result)}")
        return "\n".join(lines) or "(the program ran and printed nothing; set `answer` or print the result)"
    lines.append(f"error: {result.error}")
    if result.stderr:
        lines.append(f"stderr (last lines):\n{chr(10).join(result.stderr.rstrip().splitlines()[-6:])}")
    return "\n".join(lines)


BUILTIN_TOOLS = {t.name: t for t in (calculator, python)}
