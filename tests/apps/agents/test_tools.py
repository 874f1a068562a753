"""Tool schemas from signatures and docstrings, argument validation, and the built-in tools."""

from __future__ import annotations

import json
from typing import Literal, Optional

import pytest

from alignkit.apps.agents.tools import Tool, ToolArgumentError, ToolError, calculator, parse_docstring, tool


@tool
def search(query: str, limit: int = 5, scale: float = 1.0, exact: bool = False,
           tags: list[str] = [], lang: Optional[str] = None,
           order: Literal["asc", "desc"] = "asc") -> dict:
    """Search the catalogue.

    Longer text that is not part of the description.

    Args:
        query: What to look for.
        limit: How many results
            to return at most.
        scale (float): A weight.
        exact: Match the whole query.
        tags: Tags every result must have.
        lang: Language code, or none for all.
        order: Sort order.

    Returns:
        The results.
    """
    return {"query": query, "limit": limit, "tags": tags, "lang": lang, "order": order}


def test_schema_from_signature_and_docstring():
    assert search.name == "search"
    assert search.description == "Search the catalogue."
    props = search.parameters["properties"]
    assert search.parameters["required"] == ["query"]
    assert search.parameters["additionalProperties"] is False
    assert props["query"] == {"type": "string", "description": "What to look for."}
    assert props["limit"] == {"type": "integer", "description": "How many results to return at most.", "default": 5}
    assert props["scale"]["type"] == "number" and props["scale"]["description"] == "A weight."
    assert props["exact"]["type"] == "boolean"
    assert props["tags"]["type"] == "array" and props["tags"]["items"] == {"type": "string"}
    assert props["lang"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert props["order"]["enum"] == ["asc", "desc"] and props["order"]["type"] == "string"
    assert "Returns" not in json.dumps(search.parameters)
    assert search.to_openai()["function"]["name"] == "search"


def test_parse_docstring_stops_at_next_section():
    description, args = parse_docstring("""Add numbers.

    Args:
        a: first
        b: second

    Raises:
        ValueError: never
    """)
    assert description == "Add numbers."
    assert args == {"a": "first", "b": "second"}


def test_call_fills_defaults_and_serialises_non_strings():
    out = json.loads(search.call({"query": "tea", "tags": ["green"], "lang": None}))
    assert out == {"query": "tea", "limit": 5, "tags": ["green"], "lang": None, "order": "asc"}
    assert calculator.call({"expression": "2 + 3"}) == "5"  # str results come back as they are


@pytest.mark.parametrize("args, message", [
    ({}, "missing required argument 'query' (a string)"),
    ({"query": "x", "colour": "red"}, "unknown argument 'colour'"),
    ({"query": 3}, "'query' must be a string, got int 3"),
    ({"query": "x", "limit": "5"}, "'limit' must be an integer, got str"),
    ({"query": "x", "limit": True}, "'limit' must be an integer, got bool"),
    ({"query": "x", "scale": "big"}, "'scale' must be a number"),
    ({"query": "x", "exact": 1}, "'exact' must be a boolean"),
    ({"query": "x", "tags": "green"}, "'tags' must be an array of strings"),
    ({"query": "x", "tags": ["a", 2]}, "'tags[1]' must be a string"),
    ({"query": "x", "lang": 7}, "'lang' must be a string"),
    ({"query": "x", "order": "random"}, "'order' must be one of [\"asc\", \"desc\"]"),
])
def test_invalid_arguments_are_refused_before_the_call(args, message):
    with pytest.raises(ToolArgumentError) as info:
        search.call(args)
    assert message in str(info.value)
    assert "Expected arguments:" in str(info.value) and '"query": string' in str(info.value)


def test_valid_edge_values_pass():
    search.validate({"query": "x", "scale": 2})  # an int is a valid number
    search.validate({"query": "x", "lang": "en", "order": "desc", "tags": []})


def test_functions_a_model_cannot_call_are_refused():
    def untyped(x):
        """Do it."""
    def undocumented(x: int):
        pass
    def weird(x: set):
        """Do it."""
    for fn, text in [(untyped, "needs a type hint"), (undocumented, "needs a docstring"),
                     (weird, "unsupported type")]:
        with pytest.raises(TypeError, match=text):
            Tool.from_function(fn)


@pytest.mark.parametrize("expression, expected", [
    ("17 * 23", "391"), ("(3 + 4) ** 2 / 7", "7"), ("-2 ** 2", "-4"), ("1 / 4", "0.25"), ("2 ** -1", "0.5"),
])
def test_calculator(expression, expected):
    assert calculator.call({"expression": expression}) == expected


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('id')", "only numbers"), ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "too large"), ("2 +", "cannot parse"), ("(-8) ** 0.5", "not a real number"),
    ("'a' * 3", "only numbers"),
])
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculator.call({"expression": expression})
