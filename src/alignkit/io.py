"""Files that are either complete or absent (atomic writes and directories), JSONL reading with line
numbers that can salvage the good lines of a damaged file, and outputs that long jobs append to batch
by batch and resume after a kill."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

from alignkit.errors import AlignkitError, ConfigError, DataError


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


def read_text_file(path: Path, kind: str) -> str:
    """The UTF-8 text of a user's YAML/text file, or a ConfigError naming the file (and the line of
    the first byte that is not UTF-8): `kind` says what the file was meant to be ("config")."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {e.start}); a {kind} file is text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {kind}: {e.strerror}") from None


def scan_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Read a JSONL file into (line number, object) pairs plus a problem for every bad line.

    Blank lines are allowed; a line that is not UTF-8 is a bad line like one that is not JSON. A file
    that cannot be read at all, or holds binary data (NUL bytes), raises DataError.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(path, ["file not found"]) from None
    except OSError as e:
        raise DataError(path, [f"cannot read: {e.strerror}"]) from None
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise DataError(path, [f"line {line}: binary data (NUL bytes), not JSON lines"])
    rows, problems = [], []
    for lineno, data in enumerate(raw.splitlines(), start=1):
        try:
            line = data.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"line {lineno}: not UTF-8 text ({e.reason} at column {e.start + 1})")
            continue
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


# --- salvage: a bad line costs only itself ------------------------------------------------------

_skipped: list[str] = []


def note_skipped(path: Path, problem: str) -> None:
    """Say on stderr that part of an input was skipped (naming file and line) and remember it, so the
    command can end with a non-zero exit code once everything usable has been used."""
    where = f"{path}:{problem.removeprefix('line ')}" if problem.startswith("line ") else f"{path}: {problem}"
    print(f"warning: {where} (skipped)", file=sys.stderr)
    record_skipped(where)


def record_skipped(where: str) -> None:
    """Remember a skip that the command reports in its own words (no warning printed here)."""
    _skipped.append(where)


def take_skipped() -> list[str]:
    """What was skipped since the last call (and forget it): the CLI turns it into exit code 3."""
    out = _skipped[:]
    _skipped.clear()
    return out


def line_order(problem: str) -> int:
    """Sort key of a problem: its line number ("line 7: ..." -> 7), 0 for one about the whole file."""
    head = problem.split(":", 1)[0]
    return int(head[5:]) if head.startswith("line ") and head[5:].isdigit() else 0


def salvage(path: Path, usable: list, problems: list[str]) -> list:
    """Keep what is usable of a file and skip the rest: each problem ("line N: what") is named on
    stderr, in line order, and remembered for exit code 3. DataError listing every problem when
    nothing is usable."""
    problems = sorted(problems, key=line_order)
    if not usable:
        raise DataError(path, problems or ["no records (the file is empty)"])
    for problem in problems:
        note_skipped(Path(path), problem)
    return usable


def read_jsonl_salvaged(path: Path) -> list[tuple[int, dict]]:
    """Like read_jsonl, but a bad line (invalid JSON, not an object, cut short) is named on stderr and
    skipped, and the good lines are used; DataError only when no usable line is left."""
    return salvage(path, *scan_jsonl(path))


# --- resumable outputs: long jobs write as they go ---------------------------------------------

def batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the batch (or record) at `index`: a pure function of the base seed and the
    position, so a resumed run samples exactly what an uninterrupted one did."""
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: rows of a large job do not share seeds


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, for a job's fingerprint: changed input, different job."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ResumableJsonl:
    """A JSONL output written batch by batch, which a rerun with the same arguments continues.

    Beside OUT lives `.OUT.progress.json`: the job's fingerprint (its arguments and inputs), how many
    units (batches, records) are done, and how many bytes of OUT hold them. After every batch the
    records are appended and synced, then the progress file is replaced atomically, so after a kill
    OUT is cut back to the last recorded size: a torn last line, or a batch written but not recorded,
    is dropped and done again, never kept.

    A rerun with another fingerprint starts over when the earlier job had finished (the old
    behaviour: the output is replaced) and is refused while it had not, unless `restart` is given,
    since that would throw away finished work.
    """

    def __init__(self, path: Path, fingerprint: dict, *, restart: bool = False):
        self.path = Path(path)
        self.progress_path = self.path.with_name(f".{self.path.name}.progress.json")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it will read back from the file
        saved = self._read_progress()
        if saved is not None and not restart and saved.get("fingerprint") != self.fingerprint \
                and not saved.get("complete"):
            changed = sorted(k for k in set(self.fingerprint) | set(saved.get("fingerprint", {}))
                             if self.fingerprint.get(k) != saved.get("fingerprint", {}).get(k))
            raise AlignkitError(f"{self.path}: holds an unfinished job with other arguments ({', '.join(changed)} "
                                "differ); rerun with the same ones to continue it, or pass --restart to start over")
        size = self.path.stat().st_size if self.path.exists() else 0
        resumable = (saved is not None and not restart and saved.get("fingerprint") == self.fingerprint
                     and saved.get("bytes", 0) <= size)
        self.done = saved["done"] if resumable else 0
        self.complete = bool(saved.get("complete")) if resumable else False
        self.state = saved.get("state", {}) if resumable else {}
        keep = saved["bytes"] if resumable else 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.truncate(keep)
        self._bytes = keep
        if not resumable:
            self._write_progress()

    def _read_progress(self) -> dict | None:
        try:
            return json.loads(self.progress_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write_progress(self) -> None:
        atomic_write_text(self.progress_path, json.dumps(
            {"fingerprint": self.fingerprint, "done": self.done, "bytes": self._bytes,
             "complete": self.complete, "state": self.state}))

    @property
    def resumed(self) -> bool:
        """True when earlier work is being continued (or was already complete)."""
        return self.done > 0 or self.complete

    def records(self) -> list[dict]:
        """The records already in the output (after the cut)."""
        text = self.path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def save_state(self, **state) -> None:
        """Keep extra job state (e.g. generated inputs of later batches) with the progress."""
        self.state.update(state)
        self._write_progress()

    def append(self, records, done: int) -> None:
        """Append one finished batch of records, then record `done` units as finished."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._bytes += len(data)
        self.done = done
        self._write_progress()

    def finish(self) -> None:
        """Mark the job complete: a rerun with the same arguments then has nothing left to do."""
        self.complete = True
        self._write_progress()
