"""Files that are either complete or absent: atomic writes, atomic directories, and JSONL reading with line numbers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

from alignkit.errors import DataError


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: Path, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        # Two renames so there is never a moment with neither the old nor the new directory.
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def scan_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Read a JSONL file into (line number, object) pairs plus a problem for every bad line.

    Blank lines are allowed. A file that cannot be read at all raises DataError.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, ["file not found"]) from None
    except UnicodeDecodeError as e:
        raise DataError(path, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except OSError as e:
        raise DataError(path, [f"cannot read: {e.strerror}"]) from None
    rows, problems = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {lineno}: invalid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"line {lineno}: expected a JSON object, got {type(obj).__name__}")
            continue
        rows.append((lineno, obj))
    if not rows and not problems:
        problems.append("no records (the file is empty)")
    return rows, problems


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Like scan_jsonl, but every bad line is reported, all at once, in one DataError."""
    rows, problems = scan_jsonl(path)
    if problems:
        raise DataError(path, problems)
    return rows


def write_jsonl(path: Path, records) -> int:
    """Write records as JSONL atomically; returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    atomic_write_text(path, "".join(lines))
    return len(lines)


class JsonlLog:
    """Append-only metrics log, flushed per record so a killed run keeps what it logged."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def truncate_jsonl_after(path: Path, step: int) -> None:
    """Drop records logged after `step`: on resume those steps are run again."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut short by the kill
    atomic_write_text(path, "".join(l + "\n" for l in kept))
