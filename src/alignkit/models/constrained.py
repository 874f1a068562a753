"""Structured generation: decode under a grammar, a JSON schema or a regular expression.

The masking is llguidance's (the Low-level Guidance library): it turns a grammar into a token mask
at every step, over the model's own tokenizer, in about 0.1 ms per token here, and it is the same
engine guidance and several serving stacks use. We only connect it to our decoding loops:

    processor = GrammarLogitsProcessor(tokenizer, json_schema_grammar(schema), eos_token_ids=[2])
    scores = processor(input_ids, scores)   # (B, T) prompt + tokens so far, (B, V) -> masked scores

`GrammarLogitsProcessor` is an HF-style logits processor: transformers' `model.generate` takes it in
a `LogitsProcessorList`, and alignkit's own generation loops take it as `logits_processor`. It sees
each row's prompt and the tokens generated so far (left-padded), remembers how wide the prompt was
at the first call, and feeds each row's new tokens to that row's matcher. Tokens the grammar does
not allow get a score of -inf; once the grammar is complete only the end-of-sequence tokens remain.

Grammars are llguidance's Lark dialect (https://github.com/guidance-ai/llguidance, docs/syntax.md):
Lark rules, with `%json { <JSON schema> }` and `/regex/` allowed inside. `json_schema_grammar` and
`regex_grammar` build the two common cases; `lark_grammar` checks a hand-written one.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from alignkit.errors import AlignkitError

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""llguidance JSON options: one space after ',' and ':' and nowhere else, as people write JSON by
hand (and as our few-shot examples do); a flexible-whitespace grammar lets a small model pad forever."""


def _checked(grammar: str, what: str) -> str:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise AlignkitError(f"invalid {what}: {messages[0]}")
    return grammar


def json_schema_grammar(schema: dict | str) -> str:
    """A grammar for JSON values valid under `schema` (a dict or JSON text); AlignkitError if it is not a schema."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise AlignkitError(f"the JSON schema is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(schema, dict):
        raise AlignkitError(f"a JSON schema must be a JSON object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)
    except ValueError as e:
        raise AlignkitError(f"invalid JSON schema: {e}") from None
    return _checked(grammar, "JSON schema")


def regex_grammar(pattern: str) -> str:
    """A grammar for text that fully matches the regular expression `pattern` (Rust regex syntax)."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_regex(pattern)
    except ValueError as e:
        raise AlignkitError(f"invalid regular expression {pattern!r}: {e}") from None
    return _checked(grammar, f"regular expression {pattern!r}")


def lark_grammar(text: str) -> str:
    """A grammar written in llguidance's Lark dialect, checked; AlignkitError with the parser's message if it is wrong."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(text)
    except ValueError as e:
        raise AlignkitError(f"invalid grammar: {e}") from None
    return _checked(grammar, "grammar")


def json_string(text: str) -> str:
    """`text` as a Lark string literal (JSON string escapes are valid Lark escapes)."""
    return json.dumps(text)


@lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer, n_vocab: int, eos: tuple[int, ...]):
    # Building the token trie takes about a second: once per (tokenizer, vocabulary, EOS set).
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos))


class GrammarLogitsProcessor:
    """Mask every token the grammar does not allow next; one matcher per batch row (see the module docstring)."""

    def __init__(self, tokenizer, grammar: str, *, eos_token_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.eos = tuple(eos_token_ids) if eos_token_ids else (tokenizer.eos_token_id,)
        self.matchers: list | None = None
        self.prompt_width = 0
        self.consumed: list[int] = []

    def _start(self, batch: int, width: int, n_vocab: int) -> None:
        import llguidance

        ll_tokenizer = _ll_tokenizer(self.tokenizer, n_vocab, self.eos)
        self.matchers = [llguidance.LLMatcher(ll_tokenizer, self.grammar) for _ in range(batch)]
        for matcher in self.matchers:
            if matcher.is_error():
                raise AlignkitError(f"the grammar cannot be used: {matcher.get_error()}")
        self.prompt_width, self.consumed = width, [0] * batch
        self.bitmask = None

    def text_done(self, row: int = 0) -> bool:
        """True when row `row` has produced a complete sentence of the grammar (and was stopped)."""
        return self.matchers is not None and self.matchers[row].is_stopped()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        import llguidance.torch as llt

        batch, width = input_ids.shape
        if self.matchers is None:
            self._start(batch, width, scores.shape[-1])
        if len(self.matchers) != batch:
            raise AlignkitError(f"GrammarLogitsProcessor was started for {len(self.matchers)} rows and now "
                                f"sees {batch}: use one processor per generate call")
        if self.bitmask is None:
            self.bitmask = llt.allocate_token_bitmask(batch, scores.shape[-1])
        for row, matcher in enumerate(self.matchers):
            new = input_ids[row, self.prompt_width + self.consumed[row]:].tolist()
            self.consumed[row] += len(new)
            _advance(matcher, new)
            llt.fill_next_token_bitmask(matcher, self.bitmask, row)
        masked = scores.clone() if scores.device.type != "cpu" else scores
        apply_bitmask(masked, self.bitmask)
        return masked


def apply_bitmask(scores: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set scores (B, V) to -inf, in place, for every token whose bit is 0 in llguidance's token bitmask
    (B, ceil(V / 32)) int32: bit j of word i is token 32 i + j. llguidance's own
    `apply_token_bitmask_inplace` runs a `torch.compile`d kernel, which spent about 3 s compiling on
    the first constrained reply of a process (and again for new shapes); unpacking the bits takes
    microseconds on the CPU (tested equal to llguidance's)."""
    words = bitmask.detach().cpu().numpy().astype("<i4", copy=False)  # bytes of each word, low byte first
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=1, bitorder="little")
    vocab = scores.shape[-1]
    allowed = torch.zeros(scores.shape, dtype=torch.bool)
    width = min(vocab, bits.shape[1])
    allowed[:, :width] = torch.from_numpy(bits[:, :width].astype(bool))
    scores.masked_fill_(~allowed.to(scores.device), float("-inf"))


def _advance(matcher, tokens: list[int]) -> None:
    """Feed a row's new tokens to its matcher; tokens after the row ended (EOS) are padding."""
    for token in tokens:
        if matcher.is_stopped():
            break
        if not matcher.consume_token(token):
            raise AlignkitError(f"token {token} broke the grammar: {matcher.get_error()}")


class RowGrammarProcessor:
    """One optional grammar per row of a batch: row r decodes under `grammars[r]`, freely where it is None.

    For a batching server, where requests with and without a grammar share a decode batch. Called
    as `processor(input_ids, scores, skip)` with the engine's (B, T) ids and (B, V) scores; `skip`
    (B,) marks rows the caller has already ended (a stop string, a client gone): their padding is
    not fed to their matcher. Only the constrained rows are masked.
    """

    def __init__(self, tokenizer, grammars: list[str | None], *, eos_token_ids: list[int]):
        self.tokenizer, self.grammars, self.eos = tokenizer, grammars, tuple(eos_token_ids)
        self.rows = [r for r, g in enumerate(grammars) if g is not None]
        self.matchers: dict[int, object] = {}
        self.prompt_width = 0
        self.consumed = [0] * len(grammars)

    def text_done(self, row: int) -> bool:
        """True when row `row` has a grammar and has produced a complete sentence of it."""
        matcher = self.matchers.get(row)
        return matcher is not None and matcher.is_stopped()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 skip: torch.Tensor | None = None) -> torch.FloatTensor:
        import llguidance
        import llguidance.torch as llt

        if not self.rows:
            return scores
        if not self.matchers:
            ll_tokenizer = _ll_tokenizer(self.tokenizer, scores.shape[-1], self.eos)
            for r in self.rows:
                self.matchers[r] = matcher = llguidance.LLMatcher(ll_tokenizer, self.grammars[r])
                if matcher.is_error():
                    raise AlignkitError(f"the grammar cannot be used: {matcher.get_error()}")
            self.prompt_width = input_ids.shape[1]
            self.bitmask = llt.allocate_token_bitmask(len(self.rows), scores.shape[-1])
        active = [i for i, r in enumerate(self.rows) if skip is None or not bool(skip[r])]
        if not active:
            return scores
        for i in active:
            r = self.rows[i]
            new = input_ids[r, self.prompt_width + self.consumed[r]:].tolist()
            self.consumed[r] += len(new)
            _advance(self.matchers[r], new)
            llt.fill_next_token_bitmask(self.matchers[r], self.bitmask, i)
        index = torch.tensor([self.rows[i] for i in active], device=scores.device)
        part = scores[index]  # a copy: masked, then written back
        apply_bitmask(part, self.bitmask[active])
        scores[index] = part
        return scores
