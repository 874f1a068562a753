"""Structured output through the server, with the official openai client on 127.0.0.1: response_format
(json_object, json_schema), tools with tool_choice required / named / auto, streaming, bad schemas; and
the per-row grammar processor the batching worker uses."""

import asyncio
import json

import pytest
import torch

from alignkit.serve.app import create_app

from .conftest import running

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "count", "colour"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {
             "name": "calculator", "description": "Evaluate an arithmetic expression.",
             "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 12}},
                            "required": ["expression"], "additionalProperties": False}}},
         {"type": "function", "function": {
             "name": "lookup", "description": "Find an order.",
             "parameters": {"type": "object", "properties": {"order": {"type": "integer", "minimum": 1, "maximum": 999}},
                            "required": ["order"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "What is 17 * 23?"}]


def valid(value: dict) -> bool:
    """SCHEMA checked by hand (no JSON-schema validator is installed)."""
    return (set(value) == {"ok", "count", "colour"} and isinstance(value["ok"], bool)
            and isinstance(value["count"], int) and 0 <= value["count"] <= 99 and value["colour"] in ("red", "green", "blue"))


def valid_call(name: str, arguments: dict) -> bool:
    if name == "calculator":
        return set(arguments) == {"expression"} and isinstance(arguments["expression"], str) and len(arguments["expression"]) <= 12
    return name == "lookup" and set(arguments) == {"order"} and isinstance(arguments["order"], int) and 1 <= arguments["order"] <= 999


@pytest.fixture(scope="module")
def served(long_tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(long_tiny_dir), AutoTokenizer.from_pretrained(long_tiny_dir)
    app = create_app(model, tok, served_name="tiny", default_max_tokens=48)
    with running(app) as url:
        yield url, app


@pytest.fixture()
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=120)


def test_json_schema_reply_validates_for_several_seeds(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=seed, max_tokens=48,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "answer", "schema": SCHEMA, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        assert valid(json.loads(r.choices[0].message.content)), r.choices[0].message.content


def test_json_object_reply_is_an_object(client):
    """The random tiny model may write one endless key: a reply cut by max_tokens is allowed, but every
    reply that ended by itself is a JSON object."""
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=seed, max_tokens=64,
                                           response_format={"type": "json_object"})
        content = r.choices[0].message.content
        assert content.startswith("{")
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)
            finished += 1
    print(f"{finished} of 4 json_object replies ended within 64 tokens")


def test_bad_schema_is_a_400_naming_the_parameter(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})
    assert e.value.status_code == 400 and e.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format.type"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    broken = [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ASK, tools=broken, tool_choice="required")
    assert e.value.body["param"] == "tools[0].function.parameters"


def test_streamed_json_schema_reply_joins_to_valid_json(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, temperature=0.8, seed=7, max_tokens=48,
                                            stream=True, response_format={"type": "json_schema", "json_schema": {
                                                "name": "answer", "schema": SCHEMA}})
    pieces, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and len([p for p in pieces if p]) > 1  # streamed in pieces, not at once
    assert valid(json.loads("".join(pieces)))


def test_completions_take_response_format(client):
    r = client.completions.create(model="tiny", prompt="Answer in JSON:", temperature=0, max_tokens=48,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "answer", "schema": SCHEMA}}})
    assert valid(json.loads(r.choices[0].text))


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "lookup"}}])
def test_tool_calls_validate(client, choice):
    for seed in range(2):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=choice, n=2,
                                           temperature=1.0, seed=seed, max_tokens=48)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            (call,) = c.message.tool_calls
            assert call.type == "function" and call.id.startswith("call_")
            assert valid_call(call.function.name, json.loads(call.function.arguments)), call
            if isinstance(choice, dict):
                assert call.function.name == "lookup"


def test_auto_tool_choice_gives_a_valid_call_or_plain_text(client):
    kinds = set()
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                           max_tokens=24)
        c = r.choices[0]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            call = c.message.tool_calls[0]
            assert valid_call(call.function.name, json.loads(call.function.arguments))
            kinds.add("call")
        else:
            assert not c.message.content.lstrip().startswith("{")
            kinds.add("text")
    assert kinds  # either is allowed; the assertions above hold for each


def test_streamed_tool_call_and_history_with_a_tool_result(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=48, stream=True)
    calls, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    assert valid_call(call.function.name, json.loads(call.function.arguments))
    # The call and its result go back as OpenAI clients send them; the server reads both.
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "391"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_rows_with_and_without_a_grammar_share_a_batch(served):
    """A free row decoded beside constrained rows gives exactly its reply when decoded alone."""
    from openai import AsyncOpenAI

    url, app = served
    free = {"model": "tiny", "messages": ASK, "temperature": 0, "max_tokens": 12}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}

    async def go():
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        alone = await client.chat.completions.create(**free)
        before = app.state.worker.health()["largest_batch"]
        together = await asyncio.gather(client.chat.completions.create(**free),
                                        *(client.chat.completions.create(**{**free, "max_tokens": 48},
                                                                         response_format=fmt) for _ in range(3)))
        await client.close()
        return alone, together, before

    alone, together, before = asyncio.run(go())
    assert app.state.worker.health()["largest_batch"] >= 2  # at least two of them decoded together
    assert together[0].choices[0].message.content == alone.choices[0].message.content
    assert all(valid(json.loads(r.choices[0].message.content)) for r in together[1:])


def test_row_grammar_processor_masks_only_its_rows(tiny):
    from alignkit.models.constrained import RowGrammarProcessor, regex_grammar

    _, tok = tiny
    V = len(tok)
    digits = regex_grammar(r"[0-9]+")
    proc = RowGrammarProcessor(tok, [None, digits, digits], eos_token_ids=[tok.eos_token_id])
    ids = torch.tensor([tok("hi")["input_ids"]] * 3)
    scores = torch.zeros(3, V)
    out = proc(ids, scores.clone())
    assert torch.equal(out[0], scores[0])  # the free row is untouched
    allowed = {i for i in range(V) if out[1, i] > float("-inf")}
    assert allowed and all(tok.decode([i]).isdigit() for i in allowed)
    # Row 2 is ended by the caller (skip): the token after it is padding, not fed to its matcher.
    nine = tok.convert_tokens_to_ids("9")
    step = torch.cat([ids, torch.tensor([[nine], [nine], [tok.pad_token_id]])], dim=1)
    out = proc(step, torch.zeros(3, V), skip=torch.tensor([False, False, True]))
    assert out[1, tok.eos_token_id] == 0  # "9" is a complete number: EOS is allowed now
    assert torch.equal(out[2], torch.zeros(V))
