"""Answer a question from an index: retrieve, abstain when nothing is relevant, fit the passages into the prompt, generate, cite.

    result = answer_question("rag.db", "How many vacation days do I get?", model, tokenizer)
    print(result.answer)                 # "... 25 paid vacation days [1]."
    for n, hit in result.numbered():     # [1] handbook/vacation.md > Vacation (lines 1-9)
        print(f"[{n}] {hit.citation}")

Relevance gate. A model given unrelated passages answers anyway, so the question is first checked
against a threshold, and below it the answer is the template's `abstain` text and the model is not
called. The score that is compared depends on the mode, because search's scores are not comparable:

  dense, hybrid  the cosine similarity of the question to its nearest chunk (for hybrid, found by a
                 dense search of depth 1). Reciprocal-rank fusion scores are 1/(60 + rank) sums:
                 they say where a chunk ranked, not whether it is relevant, and an absent topic
                 still ranks first with 1/61. On the shipped corpus with all-MiniLM-L6-v2 the 23
                 answerable questions score 0.335 to 0.70 and ten off-topic ones 0.07 to 0.29,
                 hence the default 0.30.
  bm25           the best BM25 score. Its scale depends on the corpus (document lengths, word
                 rarity) and off-topic questions that share one rare word score as high as real
                 ones, so the default 0.0 only abstains when no chunk shares a word with the
                 question; pass min_score after looking at the scores `rag query --json` prints.

Answering through a server (`server=OpenAIBackend(...)`, `rag ask --base-url`). The prompt is still
budgeted, but without the served model's tokenizer: every UTF-8 byte counts as one token, which
is an upper bound for byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM, Qwen: a token covers at
least one byte), plus SERVER_TEMPLATE_TOKENS per message for the server's chat template (role
markers). English prose runs about 4 bytes per token, so the bound gives passages about a quarter
of the room they could have: safe rather than tight. The window comes from the server's
`/v1/models` entry (`max_model_len`, as alignkit serve and vLLM report it) or from the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from alignkit.apps.rag.chunk import chunk_budget
from alignkit.apps.rag.embed import Embedder, load_embedder
from alignkit.apps.rag.retrieve import Mode, search
from alignkit.apps.rag.store import Hit, SqliteVecStore
from alignkit.errors import AlignkitError, ConfigError

PROMPT_FILE = Path(__file__).resolve().parents[2] / "prompts" / "rag_answer.yaml"
QUOTE_PROMPT_FILE = PROMPT_FILE.with_name("rag_quote.yaml")
"""The prompt of "quote-grammar" answers (see alignkit.apps.rag.quote)."""

ANSWER_STYLES = ("quote", "quote-grammar", "generate")
"""How the answer is made from the passages shown:
  quote          the passage sentence closest to the question (cosine of the index's embeddings),
                 copied with its citation; extractive, no language model involved
  quote-grammar  the language model picks the sentence: greedy decoding under a grammar whose only
                 sentences are the passages' own (alignkit.apps.rag.quote)
  generate       the language model writes the answer from the prompt of prompts/rag_answer.yaml"""
DEFAULT_QUOTE_PASSAGES = 3
"""Passages a quote is chosen from by default (rag ask/eval): on the held-out questions, quoting
from the best 3 passages beat 1, 2, 4 or 5 (see the README's RAG table)."""

DEFAULT_MIN_SCORE: dict[str, float] = {"dense": 0.30, "hybrid": 0.30, "bm25": 0.0}
"""Relevance threshold per mode (see the module docstring for what is compared and why these values)."""

DEFAULT_ANSWER_TOKENS = 128
SERVER_TEMPLATE_TOKENS = 16
"""Tokens allowed per message for a server's chat template (ChatML adds 5; Llama 3 about 5)."""

_CITATION = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class RagPrompt:
    """The prompt template of prompts/rag_answer.yaml."""

    system: str
    template: str
    passage: str
    separator: str
    abstain: str


def load_prompt(path: str | Path = PROMPT_FILE) -> RagPrompt:
    """Read a prompt template file; a missing key or placeholder is named in the error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read prompt template: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of system, template, passage, separator, abstain")
    missing = [key for key in ("template", "passage", "abstain") if not isinstance(data.get(key), str)]
    if missing:
        raise ConfigError(f"{path}: missing or not text: {', '.join(missing)}")
    for key, needed in (("template", ("{context}", "{question}")), ("passage", ("{n}", "{text}"))):
        absent = [p for p in needed if p not in data[key]]
        if absent:
            raise ConfigError(f"{path}: '{key}' lacks the placeholder(s) {', '.join(absent)}")
    return RagPrompt(
        system=data.get("system") or "",
        template=data["template"],
        passage=data["passage"],
        separator=data.get("separator", "\n\n"),
        abstain=data["abstain"],
    )


@dataclass
class Answer:
    """What `answer_question` did: the retrieval, the gate's decision, the passages shown and the reply."""

    question: str
    hits: list[Hit]
    """Everything retrieved, best first."""
    relevance: float | None
    """The score the gate compared (see the module docstring); None when nothing was retrieved."""
    threshold: float
    abstained: bool
    passages: list[Hit] = field(default_factory=list)
    """The passages numbered [1].. in the prompt, texts trimmed to fit; the top k hits when not generating."""
    answer: str | None = None
    """The model's reply, the abstention text, or None when generation was skipped."""
    prompt: str | None = None
    """The rendered prompt sent to the model."""
    prompt_tokens: int = 0

    def numbered(self) -> list[tuple[int, Hit]]:
        return list(enumerate(self.passages, start=1))

    def cited(self) -> set[int]:
        """Passage numbers the answer refers to as [n]."""
        if not self.answer:
            return set()
        return {int(n) for n in _CITATION.findall(self.answer) if 1 <= int(n) <= len(self.passages)}

    def to_json(self) -> dict:
        """{"question", "answer", "abstained", "relevance", "threshold", "citations", "retrieval"} (see `rag ask --help`)."""
        cited = self.cited()
        return {
            "question": self.question,
            "answer": self.answer,
            "abstained": self.abstained,
            "relevance": self.relevance,
            "threshold": self.threshold,
            "citations": [
                {"n": n, "source": h.source, "citation": h.citation, "score": h.score, "cited": n in cited}
                for n, h in self.numbered()
            ],
            "retrieval": [
                {"rank": r, "source": h.source, "citation": h.citation, "score": h.score, "method": h.method, "text": h.text}
                for r, h in enumerate(self.hits, start=1)
            ],
        }


def relevance_score(
    store: SqliteVecStore, question: str, mode: Mode, hits: list[Hit], embedder: Embedder | None = None
) -> float | None:
    """The score the relevance gate compares with the threshold of `mode`, None when nothing matched."""
    if mode == "hybrid":
        nearest = search(store, question, k=1, mode="dense", embedder=embedder)
        return nearest[0].score if nearest else None
    return hits[0].score if hits else None


class Utf8Budget:
    """Stands in for a tokenizer the prompt budget cannot see: one token per UTF-8 byte (an upper bound
    for byte-level BPE; see the module docstring). Trimming cuts at a byte, dropping a split character."""

    chat_template = None  # render_prompt joins the messages' texts; the template is SERVER_TEMPLATE_TOKENS

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="ignore")


def served_context_window(server) -> int:
    """The served model's context length from `{base_url}/models` (max_model_len, or context_length)."""
    import os

    import httpx

    url = f"{server.base_url}/models"
    key = os.environ.get(server.api_key_env)
    try:
        response = httpx.get(url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=server.timeout)
        response.raise_for_status()
        entries = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise AlignkitError(f"GET {url}: cannot read the served models ({type(exc).__name__}: {exc}); "
                            "is the server running? Or pass --context-tokens") from None
    entry = next((e for e in entries if e.get("id") == server.name), entries[0] if len(entries) == 1 else None)
    window = (entry or {}).get("max_model_len") or (entry or {}).get("context_length")
    if not window:
        served = ", ".join(str(e.get("id")) for e in entries)
        raise AlignkitError(f"GET {url}: no context length for model {server.name!r} (served: {served}); "
                            "pass --context-tokens")
    return int(window)


def context_window(model: object) -> int:
    """Positions the model can attend over, from its config."""
    window = getattr(model.config, "max_position_embeddings", None)  # type: ignore[attr-defined]
    if not window:
        raise AlignkitError("the model's config has no max_position_embeddings: cannot size the RAG prompt")
    return int(window)


def _messages(prompt: RagPrompt, question: str, context: str) -> list[dict]:
    user = prompt.template.format(context=context, question=question)
    return ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [{"role": "user", "content": user}]


def _render(tokenizer: object, messages: list[dict]) -> tuple[str, int]:
    """The text and token count of the prompt exactly as `models.generate` will feed it."""
    from alignkit.models import render_prompt

    text = render_prompt(tokenizer, messages)
    # generate() adds the tokenizer's special tokens only when there is no chat template.
    with_template = tokenizer.chat_template is not None  # type: ignore[attr-defined]
    return text, len(tokenizer(text, add_special_tokens=not with_template)["input_ids"])  # type: ignore[operator]


def _trim(tokenizer: object, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if len(ids) <= max_tokens:
        return text
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).rstrip()  # type: ignore[attr-defined]


def passage_title(hit: Hit) -> str:
    """A short name for a passage in the prompt: its nearest heading, else its file name ("vacation")."""
    if hit.heading_path:
        return hit.heading_path[-1]
    return Path(hit.source).stem.replace("_", " ").replace("-", " ")


def build_prompt(
    question: str,
    hits: list[Hit],
    tokenizer: object,
    window: int,
    answer_tokens: int = DEFAULT_ANSWER_TOKENS,
    prompt: RagPrompt | None = None,
) -> tuple[list[dict], list[Hit], int]:
    """Chat messages holding the question and as many of `hits` as fit, and the passages kept.

    Returns (messages, passages, prompt token count) with prompt tokens + answer_tokens <= window.
    Each passage gets an equal share of the room left by the instructions, the question and the
    answer (chunk_budget), trimmed to it; passages from the lowest rank are dropped when the share
    would be under 16 tokens, and again if tokenization across the joins still overshoots.
    """
    prompt = prompt or load_prompt()
    _, fixed = _render(tokenizer, _messages(prompt, question, ""))
    if fixed + answer_tokens > window:
        raise AlignkitError(
            f"the question and instructions take {fixed} tokens; with {answer_tokens} for the answer "
            f"that exceeds the model's context window of {window}: ask a shorter question or fewer answer tokens"
        )
    label = prompt.passage.format(n=len(hits) or 1, citation="", title="", text="") + prompt.separator
    label_tokens = len(tokenizer(label, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    passages: list[Hit] = []
    for n in range(len(hits), 0, -1):
        try:
            # The citation label is part of each passage's cost; the question is already in `fixed`.
            share = chunk_budget(window, n, 0, answer_tokens, prompt_tokens=fixed + n * label_tokens)
        except ValueError:
            continue
        passages = [replace(h, text=_trim(tokenizer, h.text, share)) for h in hits[:n]]
        break
    while True:
        context = prompt.separator.join(
            prompt.passage.format(n=i, citation=h.citation, title=passage_title(h), text=h.text)
            for i, h in enumerate(passages, start=1)
        )
        messages = _messages(prompt, question, context)
        _, count = _render(tokenizer, messages)
        if count + answer_tokens <= window or not passages:
            return messages, passages, count
        passages = passages[:-1]


def answer_question(
    index: str | Path | SqliteVecStore,
    question: str,
    model: object | None = None,
    tokenizer: object | None = None,
    *,
    k: int = 4,
    mode: Mode = "hybrid",
    min_score: float | None = None,
    max_new_tokens: int = DEFAULT_ANSWER_TOKENS,
    prompt: RagPrompt | None = None,
    embedder: Embedder | None = None,
    max_passages: int | None = None,
    server: object | None = None,
    window: int | None = None,
    style: str = "generate",
) -> Answer:
    """Retrieve k passages for `question`; abstain below the relevance threshold, else answer with `model`.

    model, tokenizer: from models.load_model; with model None nothing is generated and `passages`
    are the top k hits, untrimmed (retrieval only).
    min_score: relevance threshold, default DEFAULT_MIN_SCORE[mode].
    max_new_tokens: the answer budget, reserved in the context window before passages are added.
    max_passages: show the model only the best this many of the k hits (a small reader does better
    with one good passage than with five); retrieval itself still returns k.
    server: an OpenAIBackend to answer instead of `model`; `window` is its context length in tokens
    (default: asked from the server). prompt_tokens is then the byte bound, not a token count.
    style: one of ANSWER_STYLES. "quote" needs no model (the sentence is chosen by the index's
    embedder) and shows it every passage untrimmed; "quote-grammar" needs a local model, and its
    `prompt` defaults to QUOTE_PROMPT_FILE's.
    """
    if not question.strip():
        raise AlignkitError("the question is empty")
    if style not in ANSWER_STYLES:
        raise AlignkitError(f"unknown answer style {style!r}: choose one of {', '.join(ANSWER_STYLES)}")
    if style == "quote-grammar" and server is not None:
        raise AlignkitError("quote-grammar answers need a local model: the grammar runs inside our decoding loop")
    prompt = prompt or load_prompt(QUOTE_PROMPT_FILE if style == "quote-grammar" else PROMPT_FILE)
    threshold = DEFAULT_MIN_SCORE[mode] if min_score is None else min_score
    store = index if isinstance(index, SqliteVecStore) else SqliteVecStore(index)
    try:
        hits = search(store, question, k=k, mode=mode, embedder=embedder)
        relevance = relevance_score(store, question, mode, hits, embedder)
    finally:
        if store is not index:
            store.close()
    result = Answer(question, hits, relevance, threshold, abstained=False)
    # A bm25 score of 0 and a cosine at the threshold both count as relevant: ">=" keeps the
    # bm25 default of 0.0 meaning "some word matched".
    if relevance is None or relevance < threshold:
        result.abstained = True
        result.answer = prompt.abstain.format(score=relevance if relevance is not None else float("nan"), threshold=threshold)
        return result
    if style == "quote":
        from alignkit.apps.rag.quote import closest_sentence

        result.passages = hits[:max_passages]
        result.answer = closest_sentence(question, result.passages, embedder or load_embedder(store.embedder_name))
        return result
    if model is None and server is None:
        result.passages = hits
        return result
    from alignkit.models import generate, render_prompt

    if server is not None:
        allowance = 2 * SERVER_TEMPLATE_TOKENS  # system and user messages
        window = window or served_context_window(server)
        budget = Utf8Budget()
        messages, result.passages, count = build_prompt(
            question, hits[:max_passages], budget, window - allowance, max_new_tokens, prompt
        )
        result.prompt_tokens, result.prompt = count + allowance, render_prompt(budget, messages)
        result.answer = server.chat(messages, max_tokens=max_new_tokens, temperature=0.0).strip()
        return result

    messages, result.passages, result.prompt_tokens = build_prompt(
        question, hits[:max_passages], tokenizer, context_window(model), max_new_tokens, prompt
    )
    result.prompt = render_prompt(tokenizer, messages)
    if style == "quote-grammar":
        result.answer = _quote(model, tokenizer, messages, result.passages)
        return result
    result.answer = generate(model, tokenizer, [messages], max_new_tokens=max_new_tokens, temperature=0.0).texts[0]
    return result


def _quote(model: object, tokenizer: object, messages: list[dict], passages: list[Hit]) -> str:
    """The passage sentence (and its "[n]") the model picks, decoded under quote_grammar."""
    from alignkit.apps.rag.quote import quote_candidates, quote_grammar
    from alignkit.models import generate
    from alignkit.models.constrained import GrammarLogitsProcessor
    from alignkit.models.generation import eos_ids

    candidates = quote_candidates(passages)
    if not candidates:
        raise AlignkitError("the passages shown have no sentence to quote; try --answer generate")
    eos = eos_ids(tokenizer, model)
    processor = GrammarLogitsProcessor(tokenizer, quote_grammar(passages), eos_token_ids=eos)
    # Room for the longest candidate: the grammar ends the reply, the length only must not cut it.
    longest = max(len(tokenizer(f"{s} [{n}]", add_special_tokens=False)["input_ids"]) for n, s in candidates)  # type: ignore[operator]
    return generate(model, tokenizer, [messages], max_new_tokens=longest + 4, temperature=0.0,
                    logits_processor=processor).texts[0].strip()
