"""Prompt sets: JSONL records with a "prompt" field, or plain text with one prompt per line."""

from __future__ import annotations

from pathlib import Path

from alignkit.errors import DataError
from alignkit.io import salvage, scan_jsonl


def load_prompts(path: Path) -> list[str]:
    """Prompts from a .jsonl file ({"prompt": ...} per line) or any other text file (one per line).

    A bad JSONL line (not JSON, no usable 'prompt') is named on stderr and skipped (exit code 3);
    DataError when no line is usable."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows, problems = scan_jsonl(path)
        prompts = []
        for lineno, rec in rows:
            p = rec.get("prompt")
            if not isinstance(p, str) or not p.strip():
                problems.append(f"line {lineno}: missing or empty field 'prompt'")
            else:
                prompts.append(p)
        return salvage(path, prompts, problems)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(path, ["file not found"]) from None
    except UnicodeDecodeError as e:
        raise DataError(path, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    prompts = [l.strip() for l in lines if l.strip()]
    if not prompts:
        raise DataError(path, ["no prompts (the file is empty)"])
    return prompts
