"""Structured generation on the tiny model: JSON schemas, regexes, the ReAct step grammar, prefix reuse.

The tiny model has random weights, so whatever it writes unconstrained is noise: every output
that parses here parses because of the grammar (the first test checks that the noise is noise).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from alignkit.apps.agents.backends import LocalBackend, cut_at_stop
from alignkit.apps.agents.react import parse_reply, step_grammar, tool_arguments
from alignkit.apps.agents.tools import BUILTIN_TOOLS, calculator
from alignkit.errors import AlignkitError
from alignkit.models.constrained import GrammarLogitsProcessor, json_schema_grammar, lark_grammar, regex_grammar

SCHEMA = {"type": "object", "properties": {"size": {"enum": ["small", "large"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["size", "count"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return LocalBackend(str(tiny_model_dir), device="cpu")


def sampled(backend, grammar, seed, max_tokens=64):
    torch.manual_seed(seed)
    return backend.chat(MESSAGES, max_tokens=max_tokens, temperature=1.0, grammar=grammar)


def test_json_schema_output_is_valid_for_every_seed(backend):
    unconstrained = [sampled(backend, None, seed) for seed in range(3)]
    assert not any(text.startswith("{") for text in unconstrained)  # without the grammar: noise
    grammar = json_schema_grammar(SCHEMA)
    for seed in range(4):
        value = json.loads(sampled(backend, grammar, seed))
        assert set(value) == {"size", "count"} and value["size"] in ("small", "large")
        assert isinstance(value["count"], int)


def test_regex_output_matches_in_full(backend):
    pattern = r"(yes|no), [0-9]{2}"
    for seed in range(3):
        assert re.fullmatch(pattern, sampled(backend, regex_grammar(pattern), seed))


def test_react_step_grammar_gives_replies_the_agent_accepts(backend):
    required = step_grammar([calculator], plan=True, final=False)  # python's code has no length bound
    for seed in range(3):
        parsed = parse_reply(sampled(backend, required, seed, max_tokens=600))
        assert parsed.final_answer is None and parsed.tool == "calculator" and "=" not in parsed.thought
        args = BUILTIN_TOOLS[parsed.tool].validate(tool_arguments(BUILTIN_TOOLS[parsed.tool], parsed.tool_input))
        if parsed.tool == "calculator":  # the schema's pattern: arithmetic characters only
            assert re.fullmatch(r"[0-9.+\-*/() ]+", args["expression"])


def test_bad_schemas_regexes_and_grammars_are_clear_errors():
    with pytest.raises(AlignkitError, match="not valid JSON"):
        json_schema_grammar("{not json")
    with pytest.raises(AlignkitError, match="JSON object"):
        json_schema_grammar("[1, 2]")
    with pytest.raises(AlignkitError, match="invalid regular expression"):
        regex_grammar("[0-9")
    with pytest.raises(AlignkitError, match="invalid grammar"):
        lark_grammar('start: "a" undefined_rule')


def test_processor_masks_only_what_the_grammar_forbids(tiny):
    """After the prompt, a regex "ab" allows exactly the tokens that are a prefix of "ab" (and no EOS)."""
    model, tokenizer = tiny
    processor = GrammarLogitsProcessor(tokenizer, regex_grammar("ab"), eos_token_ids=[tokenizer.eos_token_id])
    vocab = model.config.vocab_size
    scores = processor(torch.tensor([[1, 2, 3]]), torch.zeros(1, vocab))
    allowed = {i for i in range(vocab) if scores[0, i] > float("-inf")}
    expected = {i for i in range(vocab) if tokenizer.decode([i]) in ("a", "ab")}
    assert allowed == expected and tokenizer.eos_token_id not in allowed


def test_prefix_reuse_changes_nothing_in_the_reply(tiny_model_dir, backend):
    long = MESSAGES + [{"role": "assistant", "content": "over the lazy dog"}, {"role": "user", "content": "again"}]
    first = backend.chat(MESSAGES, max_tokens=12, temperature=0.0)
    reused = backend.chat(long, max_tokens=12, temperature=0.0)
    assert backend.reused_tokens > 0  # the shared beginning was not computed again
    fresh = LocalBackend(str(tiny_model_dir), device="cpu")
    assert fresh.chat(long, max_tokens=12, temperature=0.0) == reused and fresh.reused_tokens == 0
    assert backend.chat(MESSAGES, max_tokens=12, temperature=0.0) == first


def test_a_reply_that_begins_with_the_stop_string_is_not_emptied():
    assert cut_at_stop("Observation: 3\nThought: done\nObservation: x", ["Observation:"]) == \
        "Observation: 3\nThought: done\n"
    assert cut_at_stop("  Observation: 3", ["Observation:"]) == "  Observation: 3"
    assert cut_at_stop("Thought: a\nObservation: b", ["Observation:"]) == "Thought: a\n"


def test_calculator_schema_refuses_prose_in_the_expression():
    pattern = calculator.parameters["properties"]["expression"]["pattern"]
    assert re.fullmatch(pattern, "12.5 / 100 * 368") and not re.fullmatch(pattern, "12.5% of 368")


def test_generate_command_with_regex_and_json_schema(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from alignkit.cli import app

    runner = CliRunner()
    base = ["generate", "-p", "the quick", "-p", "brown fox", "--model", str(tiny_model_dir), "--json",
            "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "64"]
    result = runner.invoke(app, base + ["--regex", "(yes|no)"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 2 and all(r["completion"] in ("yes", "no") for r in records)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    result = runner.invoke(app, base + ["--json-schema", str(schema)])
    assert result.exit_code == 0, result.output
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            assert json.loads(json.loads(line)["completion"])["size"] in ("small", "large")
    both = runner.invoke(app, base + ["--regex", "a", "--json-schema", str(schema)])
    assert isinstance(both.exception, AlignkitError) and "not both" in str(both.exception)  # main() exits 2


@pytest.mark.parametrize("vocab", [5, 32, 33, 300])
def test_apply_bitmask_equals_llguidance_kernel(vocab):
    """Our eager unpacking of the token bitmask masks exactly what llguidance's compiled kernel masks
    (random bits, a vocabulary that is and is not a multiple of 32, words with the sign bit set)."""
    import llguidance.torch as llt

    from alignkit.models.constrained import apply_bitmask

    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-2 ** 31, 2 ** 31 - 1, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    scores = torch.randn(3, vocab, generator=gen)
    ours, theirs = scores.clone(), scores.clone()
    apply_bitmask(ours, bitmask)
    llt.apply_token_bitmask_inplace(theirs, bitmask)
    assert torch.equal(ours, theirs)
    assert torch.isinf(ours).any() and torch.isfinite(ours).any()
