"""SFT data: validate {"prompt","completion"} or {"messages":[...]} JSONL, tokenise with the chat
template, and mark which tokens the loss counts (assistant turns only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from alignkit.errors import DataError
from alignkit.io import salvage, scan_jsonl

IGNORE = -100  # label value the loss skips
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens; the token id on completion tokens


def _check(lineno: int, rec: dict) -> tuple[list[dict] | None, list[str]]:
    """Turn one record into chat messages, or say what is wrong with it."""
    where = f"line {lineno}"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return None, [f"{where}: field 'messages' must be a non-empty list"]
        problems = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                problems.append(f"{where}: messages[{j}] needs 'role' (one of {sorted(ROLES)}) and string 'content'")
            elif not m["content"].strip():
                problems.append(f"{where}: messages[{j}].content is empty")
        if not problems and not any(m["role"] == "assistant" for m in msgs):
            problems.append(f"{where}: no assistant message, so nothing to learn")
        return (None if problems else msgs), problems
    missing = [k for k in ("prompt", "completion") if k not in rec]
    if missing:
        return None, [f"{where}: missing field '{missing[0]}' (expected prompt+completion or messages)"]
    problems = [f"{where}: field '{k}' must be a non-empty string" for k in ("prompt", "completion")
                if not isinstance(rec[k], str) or not rec[k].strip()]
    if problems:
        return None, problems
    return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}], []


def load_conversations(path: Path) -> list[list[dict]]:
    """Read and validate an SFT file. A bad line (not JSON, or a record of the wrong shape) is named on
    stderr with its line and skipped, and counts towards exit code 3; DataError listing every problem
    when no line is usable."""
    rows, problems = scan_jsonl(path)
    convs = []
    for lineno, rec in rows:
        msgs, errs = _check(lineno, rec)
        problems.extend(errs)
        if msgs is not None:
            convs.append(msgs)
    return salvage(path, convs, problems)


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int) -> Example:
    """Tokens of the whole conversation, with labels only on assistant turns.

    With a chat template, turn i's span is found by rendering messages[:i] with a generation prompt
    (the prefix) and messages[:i+1] (prefix + turn); this relies on the template rendering each
    conversation as a prefix of its extensions, which holds for ChatML-style templates. Without a
    template: prompt text, then completion text and EOS.
    """
    if tokenizer.chat_template is None:
        prompt = "\n".join(m["content"] for m in messages[:-1])
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = p_ids + c_ids
        labels = [IGNORE] * len(p_ids) + c_ids
        return Example(ids[:max_length], labels[:max_length])

    def encode(msgs, gen_prompt):
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen_prompt, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = encode(messages, False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(encode(messages[:i], True))
        end = len(encode(messages[:i + 1], False))
        labels[start:end] = ids[start:end]
    return Example(ids[:max_length], labels[:max_length])


def build_examples(tokenizer, path: Path, max_length: int) -> tuple[list[Example], list[str]]:
    """Tokenised examples, plus a note for each one dropped because truncation left no completion."""
    examples, notes = [], []
    for n, msgs in enumerate(load_conversations(path), start=1):
        ex = tokenize_conversation(tokenizer, msgs, max_length)
        if all(l == IGNORE for l in ex.labels):
            notes.append(f"{path}: record {n}: the prompt fills max_length={max_length}; no completion token left, skipped")
            continue
        examples.append(ex)
    if not examples:
        raise DataError(path, ["no usable examples: every completion was cut off by max_length"] + notes)
    return examples, notes


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask and labels, each (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
