"""The `alignkit rag` commands: ingest documents into an index, answer questions from it, evaluate it on known answers.

Parsing and printing only; the work is in ingest.py, answer.py and evaluate.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from alignkit.apps.rag.answer import (
    ANSWER_STYLES,
    DEFAULT_ANSWER_TOKENS,
    DEFAULT_MIN_SCORE,
    DEFAULT_QUOTE_PASSAGES,
    PROMPT_FILE,
    QUOTE_PROMPT_FILE,
    answer_question,
    load_prompt,
)

rag_app = typer.Typer(
    help="Retrieval-augmented generation: ingest documents into an index, ask questions with cited answers, "
         "evaluate retrieval.\n\nStart with `alignkit rag ingest docs/ --index rag.db`, then "
         "`alignkit rag query --index rag.db \"your question\"` (ranked chunks) or `alignkit rag ask ...` "
         "(an answer with citations).",
    no_args_is_help=True)

MODEL_HELP = ("Generator: 'embedded' (SmolLM2-135M-Instruct, shipped), a Hugging Face model directory, an adapter "
              "directory saved by alignkit, or a .gguf file")
MODE_HELP = "hybrid (dense + BM25 fused by reciprocal rank), dense (embeddings) or bm25 (full text)"
ANSWER_HELP = ("How to answer: quote (default) copies the passage sentence closest to the question, with its "
               "citation: extractive, no language model is loaded; quote-grammar lets the model pick the sentence "
               "under a grammar that allows only the passages' sentences; generate lets the model write the answer. "
               "On the held-out questions shipped with the demo corpus, quote was right most often (see README).")
PASSAGES_HELP = (f"Show the answerer only the best N of the k passages (default: {DEFAULT_QUOTE_PASSAGES} to quote "
                 "from, all k to generate from); retrieval metrics stay @k.")


def _answering(answer: str, passages: int | None) -> int | None:
    if answer not in ANSWER_STYLES:
        raise typer.BadParameter(f"choose one of {', '.join(ANSWER_STYLES)}", param_hint="--answer")
    if passages is not None and passages < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--passages")
    return passages if passages is not None or answer == "generate" else DEFAULT_QUOTE_PASSAGES


MIN_SCORE_HELP = (f"Relevance threshold below which the answer is 'I don't know' and the model is not called. "
                  f"dense and hybrid compare the question's cosine similarity to its nearest chunk (default "
                  f"{DEFAULT_MIN_SCORE['dense']}); bm25 compares the best BM25 score, whose scale depends on the "
                  f"corpus (default {DEFAULT_MIN_SCORE['bm25']}: abstain only when no chunk shares a word).")
MODES = ("hybrid", "dense", "bm25")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise typer.BadParameter(f"must be one of {', '.join(MODES)}, got {mode!r}", param_hint="--mode")


def _tokenizer(spec: str):
    """The generator's tokenizer without loading its weights: chunk sizes are counted in its tokens."""
    from alignkit.models.loading import load_tokenizer, resolve_base

    path = Path(spec).expanduser()
    if spec != "embedded" and (path / "adapter_config.json").is_file() and (path / "tokenizer_config.json").is_file():
        return load_tokenizer(path)
    return load_tokenizer(resolve_base(spec))


def _dump(obj: dict) -> str:
    # NaN is not JSON; a missing relevance score is reported as null.
    def clean(v):
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {key: clean(x) for key, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), ensure_ascii=False)


@rag_app.command("ingest")
def ingest_cmd(
    sources: List[str] = typer.Argument(..., help="Files, folders, or sqlite:///FILE.db?table=NAME / ?query=SELECT... specs."),
    index: Path = typer.Option(..., "--index", help="Index file to create or bring up to date."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP + "; only its tokenizer is loaded, to "
                              "measure chunks in the tokens the generator will see."),
    chunk_tokens: int = typer.Option(256, help="Largest chunk, in the generator's tokens (at least 16)."),
    overlap: int = typer.Option(32, help="Tokens of trailing sentences repeated at the start of the next chunk "
                                         "(at most chunk-tokens / 2)."),
    embedder_dir: Optional[Path] = typer.Option(None, "--embedder", help="A local sentence-transformers model "
                                                "directory (default: the shipped all-MiniLM-L6-v2). The index "
                                                "records it; queries use the same one."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {\"index\", \"added\", \"updated\", "
                                 "\"unchanged\", \"removed\" (lists of sources), \"skipped\" ([{\"source\", \"reason\", "
                                 "\"location\"}]), \"chunks_written\", \"chunks_removed\", \"embedded\", "
                                 "\"reused_vectors\", \"seconds\"}."),
):
    """Index documents: new and changed ones are chunked and embedded, vanished ones removed, unchanged ones skipped.

    Example: alignkit rag ingest docs/ wiki/ --index rag.db
    """
    from tqdm.auto import tqdm

    from alignkit.apps.rag import ChunkConfig, IngestReport, ingest
    from alignkit.apps.rag.embed import DEFAULT_MODEL_NAME, load_embedder

    try:
        config = ChunkConfig(chunk_tokens, overlap)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    tokenizer = _tokenizer(model)
    embedder = load_embedder(str(embedder_dir.resolve()) if embedder_dir else DEFAULT_MODEL_NAME)
    total = IngestReport(index_path="")
    # ingest() treats each source independently, so one call per source gives the same result
    # and lets the bar advance as each source finishes.
    for source in tqdm(sources, desc="ingesting", unit="source", disable=None if len(sources) > 1 else True):
        report = ingest([source], index, tokenizer, embedder=embedder, config=config)
        total.index_path = report.index_path
        for name in ("added", "updated", "unchanged", "removed", "skipped", "decoded"):
            getattr(total, name).extend(getattr(report, name))
        for name in ("chunks_written", "chunks_removed", "embedded", "reused_vectors", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(report, name))
    if as_json:
        print(_dump({
            "index": total.index_path, "added": total.added, "updated": total.updated,
            "unchanged": total.unchanged, "removed": total.removed,
            "skipped": [{"source": s.source, "reason": s.reason, "location": s.location} for s in total.skipped],
            "chunks_written": total.chunks_written, "chunks_removed": total.chunks_removed,
            "embedded": total.embedded, "reused_vectors": total.reused_vectors, "seconds": round(total.seconds, 3),
        }))
    else:
        print(total.summary())


@rag_app.command("query")
def query_cmd(
    question: str = typer.Argument(..., help="The question to search for."),
    index: Path = typer.Option(..., "--index", help="Index file written by `alignkit rag ingest`."),
    k: int = typer.Option(5, "--k", help="How many chunks to return."),
    mode: str = typer.Option("hybrid", help=MODE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {\"rank\", \"score\", \"source\", "
                                 "\"text\", \"citation\", \"method\"}, best first."),
):
    """Print the ranked chunks for a question, with scores and sources (no model involved).

    Example: alignkit rag query --index rag.db "How many vacation days do I get?" --k 5
    """
    from alignkit.apps.rag import search

    _check_mode(mode)
    hits = search(index, question, k=k, mode=mode)
    rows = [{"rank": i, "score": h.score, "source": h.source, "text": h.text, "citation": h.citation,
             "method": h.method} for i, h in enumerate(hits, start=1)]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    for r in rows:
        print(f"[{r['rank']}] {r['score']:.4f}  {r['citation']}  ({r['method']})")
        print("    " + r["text"][:300].replace("\n", " ") + ("..." if len(r["text"]) > 300 else ""))


@rag_app.command("ask")
def ask_cmd(
    question: str = typer.Argument(..., help="The question to answer."),
    index: Path = typer.Option(..., "--index", help="Index file written by `alignkit rag ingest`."),
    k: int = typer.Option(4, "--k", help="Passages to retrieve and put in the prompt (fewer if the context window is full)."),
    passages: Optional[int] = typer.Option(None, "--passages", help=PASSAGES_HELP),
    answer: Optional[str] = typer.Option(None, "--answer", help=ANSWER_HELP + " With --base-url the default is "
                                         "generate: the served model answers."),
    mode: str = typer.Option("hybrid", help=MODE_HELP),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP + "; with --base-url, the served "
                              "model's name"),
    base_url: Optional[str] = typer.Option(None, help="Answer with an OpenAI-compatible server instead of a local "
                                           "model, e.g. http://127.0.0.1:8000/v1 (`alignkit serve`). Without the "
                                           "served tokenizer the prompt is budgeted at one token per UTF-8 byte "
                                           "(an upper bound for byte-level BPE tokenizers, about 4x what English "
                                           "needs) plus 16 tokens per message for the chat template."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="With --base-url: environment variable holding the "
                                    "server's API key (sent as a Bearer token; never printed)."),
    context_tokens: Optional[int] = typer.Option(None, help="With --base-url: the served model's context window in "
                                                 "tokens. Default: read from the server's /v1/models "
                                                 "(max_model_len, which alignkit serve and vLLM report)."),
    min_score: Optional[float] = typer.Option(None, help=MIN_SCORE_HELP),
    max_new_tokens: int = typer.Option(DEFAULT_ANSWER_TOKENS, help="Answer budget in tokens, reserved in the context window."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt", help="Prompt template YAML (default: the shipped "
                                                                      "prompts/rag_answer.yaml, or rag_quote.yaml "
                                                                      "with --answer quote-grammar)."),
    generate: bool = typer.Option(True, help="--no-generate: retrieve and apply the relevance threshold only; no model is loaded."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {\"question\", \"answer\" (null with "
                                 "--no-generate unless abstained), \"abstained\", \"relevance\", \"threshold\", "
                                 "\"citations\": [{\"n\", \"source\", \"citation\", \"score\", \"cited\"}] (the passages "
                                 "numbered [n] in the prompt; cited: the answer refers to [n]), \"retrieval\": [{\"rank\", "
                                 "\"source\", \"citation\", \"score\", \"method\", \"text\"}]}."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
):
    """Answer a question from the index, citing the passages used, or say it does not know.

    Example: alignkit rag ask --index rag.db "How many vacation days do I get?"
    Served:  alignkit rag ask --index rag.db "..." --base-url http://127.0.0.1:8000/v1 --model embedded
    """
    _check_mode(mode)
    if context_tokens is not None and context_tokens < 1:
        raise typer.BadParameter("must be a positive number of tokens", param_hint="--context-tokens")
    answer = answer or ("generate" if base_url else "quote")
    passages = _answering(answer, passages)
    prompt = load_prompt(prompt_file or (QUOTE_PROMPT_FILE if answer == "quote-grammar" else PROMPT_FILE))
    loaded, server = (None, None), None
    if answer == "quote":
        pass  # the index's embedder picks the sentence: no model to load or serve
    elif generate and base_url:
        from alignkit.apps.agents.backends import OpenAIBackend

        server = OpenAIBackend(base_url, model, api_key_env=api_key_env)
    elif generate:
        from alignkit.models import load_model

        loaded = load_model(model, device=device)
    result = answer_question(index, question, *loaded, k=k, mode=mode, min_score=min_score,
                             max_new_tokens=max_new_tokens, prompt=prompt, max_passages=passages,
                             server=server, window=context_tokens, style=answer if generate else "generate")
    if as_json:
        print(_dump(result.to_json()))
        return
    if result.answer is not None:
        print(result.answer)
    if result.abstained:
        return
    cited = result.cited()
    print("\nSources:" if result.answer is not None else "Retrieved:")
    for n, hit in result.numbered():
        mark = "*" if n in cited else " "
        print(f"{mark}[{n}] {hit.citation}  ({hit.method} score {hit.score:.3f})")
    # The gate's score is not the ranking score in hybrid mode (rank fusion): say which is which.
    gate = "BM25 score of the best chunk" if mode == "bm25" else "cosine similarity of the nearest chunk"
    print(f"relevance {result.relevance:.3f} ({gate}); abstain threshold {result.threshold:.3f} (same scale)")


@rag_app.command("eval")
def eval_cmd(
    index: Path = typer.Option(..., "--index", help="Index file written by `alignkit rag ingest`."),
    qa: Path = typer.Option(..., "--qa", help="QA JSONL: {\"question\", \"source\" (path suffix, or a list), \"answer\" "
                                              "(substring)} per line; source and/or answer."),
    k: int = typer.Option(5, "--k", help="Passages retrieved per question; metrics are @k."),
    mode: str = typer.Option("hybrid", help=MODE_HELP),
    generate: bool = typer.Option(False, help="Also answer each question with --model and check the answers "
                                              "(answer substring, faithfulness to the passages)."),
    model: str = typer.Option("embedded", "--model", "-m", help=MODEL_HELP + " (with --generate)."),
    min_score: Optional[float] = typer.Option(None, help=MIN_SCORE_HELP + " (with --generate)."),
    max_new_tokens: int = typer.Option(DEFAULT_ANSWER_TOKENS, help="Answer budget in tokens (with --generate)."),
    passages: Optional[int] = typer.Option(None, "--passages", help=PASSAGES_HELP + " With --generate."),
    answer: str = typer.Option("quote", "--answer", help=ANSWER_HELP + " With --generate."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {\"k\", \"mode\", \"metrics\": {\"questions\", "
                                 "\"hit_rate@k\", \"mrr\", \"recall@k\", \"abstained\", and with --generate "
                                 "\"answer_accuracy\", \"faithfulness\"}, \"questions\": [{\"line\", \"question\", "
                                 "\"rank\", \"recall\", \"abstained\", \"retrieved\", and with --generate \"answer\", "
                                 "\"answer_correct\", \"faithfulness\", \"unsupported\"}]}."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
):
    """Measure retrieval (hit-rate@k, MRR, recall@k) and optionally the generated answers on questions with known answers.

    A chunk is relevant when it comes from the expected source and contains the answer substring.
    Faithfulness is best effort: the share of answer sentences whose content words mostly occur in
    one passage shown to the model. Bad QA lines are all reported with their line numbers.
    Example: alignkit rag eval --index rag.db --qa questions.jsonl --k 5 --json
    """
    from alignkit.apps.rag import SqliteVecStore
    from alignkit.apps.rag.evaluate import evaluate, load_qa

    _check_mode(mode)
    if k < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--k")
    items = load_qa(qa)
    passages = _answering(answer, passages)
    loaded = (None, None)
    if generate and answer != "quote":
        from alignkit.models import load_model

        loaded = load_model(model, device=device)
    prompt = load_prompt(QUOTE_PROMPT_FILE if answer == "quote-grammar" else PROMPT_FILE)
    with SqliteVecStore(index) as store:
        report = evaluate(
            items,
            lambda item: answer_question(store, item.question, *loaded, k=k, mode=mode, min_score=min_score,
                                         max_new_tokens=max_new_tokens, prompt=prompt, max_passages=passages,
                                         style=answer if generate else "generate"),
            k, mode, generated=generate, progress=not as_json,
        )
    if as_json:
        print(_dump(report.to_json()))
        return
    for name, value in report.metrics().items():
        print(f"{name:16} {value if not isinstance(value, float) else f'{value:.3f}'}")
    misses = [r for r in report.results if r.rank is None]
    if misses:
        print(f"\nmissed within top {k}:")
        for r in misses:
            print(f"  line {r.item.line}: {r.item.question}")
    unsupported = [(r, s) for r in report.results for s in r.unsupported]
    if unsupported:
        print("\nanswer sentences not supported by the retrieved text (best effort):")
        for r, sentence in unsupported:
            print(f"  line {r.item.line}: {sentence}")
