"""Where human rankings live: tasks, labelers and labels in one SQLite file, with task loading and export.

A rankings file (JSONL) holds one task per line: `{"id": str?, "prompt": str, "completions": [str,
...], "ranks": [...], "labeler": str}`. Rank 1 is best, equal ranks are ties, and "F" marks a
completion that fails the instructions outright. Tasks keep their given "id", else get a hash of
prompt and completions, so loading the same file twice adds nothing and an exported file loads back
as the same tasks, its rankings as the same labels, each kept under its labeler.

Each labeler labels a task at most once; submitting again replaces their label. The journal is WAL
so readers never block the one writer, every connection waits (busy timeout) rather than failing
when another holds the write lock, and every write is one short statement or transaction.
synchronous stays FULL: labels are hours of human work and a few of them per second cost nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alignkit.errors import AlignkitError, DataError
from alignkit.io import atomic_write_text, note_skipped, scan_jsonl

FAIL = "F"
"""The rank of a completion that fails the instructions outright, whatever the others are like."""

BUSY_TIMEOUT_S = 15.0
"""How long a connection waits for another's write lock before giving up; writes take milliseconds."""

LABELER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,           -- load order: labelers get tasks in the order of the file
    id TEXT NOT NULL UNIQUE,
    prompt TEXT NOT NULL,
    completions TEXT NOT NULL          -- JSON list of strings
);
CREATE TABLE IF NOT EXISTS labelers (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    task_id TEXT NOT NULL REFERENCES tasks(id),
    labeler TEXT NOT NULL REFERENCES labelers(name),
    ranks TEXT NOT NULL,               -- JSON list of positive ints and "F", one per completion
    updated_at TEXT NOT NULL,
    PRIMARY KEY (task_id, labeler)
);
"""


class InvalidLabel(AlignkitError):
    """A submitted ranking does not fit its task; the message says what to change."""


@dataclass(frozen=True)
class Task:
    id: str
    prompt: str
    completions: list[str]


def init_db(db_path: Path) -> None:
    """Create the database (WAL journal, tables) if it is not there yet; harmless when it is."""
    Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file, set once here
        conn.executescript(SCHEMA)
    finally:
        conn.close()


@contextlib.contextmanager
def connect(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for one request or command, closed afterwards; in autocommit mode, so each
    statement is its own short transaction unless the caller opens one with BEGIN."""
    if not Path(db_path).exists():
        raise AlignkitError(f"{db_path}: no label database here; `alignkit label add-labeler` or "
                            "`alignkit label serve` creates one")
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=ON")
        yield conn
    finally:
        conn.close()


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- tasks -----------------------------------------------------------------------------------

def task_id(prompt: str, completions: list[str]) -> str:
    """The id of a task that has none in its file: stable across loads, machines and Python versions."""
    return hashlib.sha256(json.dumps([prompt, completions]).encode()).hexdigest()[:16]


def task_problems(obj: dict) -> list[str]:
    problems = []
    prompt, completions = obj.get("prompt"), obj.get("completions")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append('"prompt" must be a non-empty string')
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        problems.append('"completions" must be a list of strings')
    elif len(completions) < 2:
        problems.append(f'"completions" has {len(completions)} item(s); ranking needs at least 2')
    given = obj.get("id")
    if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int)) or str(given) == ""):
        problems.append('"id" must be a non-empty string or an integer when present')
    if not isinstance(obj.get("ranks", []), list):
        problems.append('"ranks" must be a list when present')
    return problems


def read_tasks(tasks_path: Path) -> list[tuple[int, Task]]:
    """Read and check a rankings file into (line number, task) pairs, one per distinct task.

    An exported file (one line per label) reads back as its distinct tasks; read_rankings, which
    this calls, also returns the labels and says what happens to bad lines.
    """
    return read_rankings(tasks_path)[0]


@dataclass(frozen=True)
class FileLabel:
    """A ranking already in a rankings file: `labeler`'s ranks of a task, from line `lineno`."""

    lineno: int
    task_id: str
    labeler: str
    ranks: list


def read_rankings(tasks_path: Path) -> tuple[list[tuple[int, Task]], list[FileLabel]]:
    """The distinct tasks of a rankings file and the labels it holds: a line with non-empty "ranks"
    and a "labeler" is that labeler's ranking of the task.

    A bad line costs only itself: it is named on stderr and skipped (the command then exits 3). A
    file with no usable line raises DataError listing every problem.
    """
    tasks: dict[str, tuple[int, Task]] = {}
    labels: dict[tuple[str, str], FileLabel] = {}
    rows, problems = scan_jsonl(tasks_path)
    for lineno, obj in rows:
        errors = task_problems(obj)
        if errors:
            problems.extend(f"line {lineno}: {e}" for e in errors)
            continue
        given = obj.get("id")
        task = Task(id=str(given) if given is not None else task_id(obj["prompt"], obj["completions"]),
                    prompt=obj["prompt"], completions=obj["completions"])
        if task.id in tasks:
            first_line, first = tasks[task.id]
            if first != task:
                problems.append(f"line {lineno}: id {task.id!r} was already used on line {first_line} "
                                "for a different prompt or completions")
                continue
        else:
            tasks[task.id] = (lineno, task)
        ranks, labeler = obj.get("ranks") or [], obj.get("labeler")
        if not ranks:
            continue
        if not isinstance(labeler, str) or not labeler.strip():
            problems.append(f'line {lineno}: ranks without a "labeler": whose ranking is it?')
            continue
        rank_errors = rank_problems(ranks, len(task.completions))
        earlier = labels.get((task.id, labeler))
        if rank_errors:
            problems.extend(f"line {lineno}: {e}" for e in rank_errors)
        elif earlier is not None and earlier.ranks != ranks:
            problems.append(f"line {lineno}: {labeler} already ranked this task differently on line {earlier.lineno}")
        else:
            labels.setdefault((task.id, labeler), FileLabel(lineno, task.id, labeler, ranks))
    if not tasks:
        raise DataError(tasks_path, problems)
    for problem in sorted(problems, key=lambda p: int(p.split(":")[0].removeprefix("line "))):
        note_skipped(Path(tasks_path), problem)
    return list(tasks.values()), list(labels.values())


def load_tasks(db_path: Path, tasks_path: Path) -> int:
    """Add the tasks (and labels) of a rankings file to the database; return how many tasks were new."""
    return load_rankings(db_path, tasks_path)[0]


def load_rankings(db_path: Path, tasks_path: Path) -> tuple[int, int]:
    """Add the tasks of a rankings file, and the labels it holds, to the database; return (new tasks,
    new labels).

    A bad line of the file is named and skipped (see read_rankings); then loading is all or nothing.
    A task already in the database is skipped when its prompt and completions are the same, and an
    error otherwise: changing them would silently change what existing labels rank.

    Labels are kept per labeler; a labeler named in the file but not yet in the database is added
    without a working token (`alignkit label add-labeler NAME --replace` issues one). A label the
    database already holds for that task and labeler is kept: it is the newer work.
    """
    tasks, labels = read_rankings(tasks_path)
    init_db(db_path)
    with connect(db_path) as conn, conn:
        conn.execute("BEGIN IMMEDIATE")
        problems, added = [], 0
        for lineno, task in tasks:
            stored = conn.execute("SELECT prompt, completions FROM tasks WHERE id = ?", (task.id,)).fetchone()
            if stored is None:
                conn.execute("INSERT INTO tasks (id, prompt, completions) VALUES (?, ?, ?)",
                             (task.id, task.prompt, json.dumps(task.completions)))
                added += 1
            elif (stored[0], json.loads(stored[1])) != (task.prompt, task.completions):
                problems.append(f"line {lineno}: id {task.id!r}: the database already holds a "
                                "different prompt or completions under this id")
        if problems:
            raise DataError(tasks_path, problems)  # leaving the `with conn` block rolls back
        labels_added = 0
        for label in labels:
            conn.execute("INSERT INTO labelers (name, token_sha256, created_at) VALUES (?, ?, ?) "
                         "ON CONFLICT(name) DO NOTHING", (label.labeler, hash_token(secrets.token_urlsafe(24)), now()))
            labels_added += conn.execute(
                "INSERT INTO labels (task_id, labeler, ranks, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(task_id, labeler) DO NOTHING",
                (label.task_id, label.labeler, json.dumps(label.ranks), now())).rowcount
    return added, labels_added


def next_task(conn: sqlite3.Connection, labeler: str, skip: Sequence[str] = ()) -> Task | None:
    """The first task, in load order, that `labeler` has not labeled, passing over the ids in `skip`
    (tasks they chose to leave for later) while any other is left; None when they have done all."""
    rows = conn.execute(
        "SELECT id, prompt, completions FROM tasks t WHERE NOT EXISTS "
        "(SELECT 1 FROM labels l WHERE l.task_id = t.id AND l.labeler = ?) ORDER BY seq", (labeler,))
    first = None
    for row in rows:
        if row[0] not in skip:
            return Task(row[0], row[1], json.loads(row[2]))
        first = first or row
    return None if first is None else Task(first[0], first[1], json.loads(first[2]))


def task_for(conn: sqlite3.Connection, labeler: str, task_id: str) -> tuple[Task, list | None] | None:
    """A task by id and `labeler`'s ranks of it (None if not labeled yet); None for an unknown id."""
    row = conn.execute("SELECT t.id, t.prompt, t.completions, l.ranks FROM tasks t LEFT JOIN labels l "
                       "ON l.task_id = t.id AND l.labeler = ? WHERE t.id = ?", (labeler, task_id)).fetchone()
    if row is None:
        return None
    return Task(row[0], row[1], json.loads(row[2])), None if row[3] is None else json.loads(row[3])


# --- labelers --------------------------------------------------------------------------------

def hash_token(token: str) -> str:
    # Tokens are 192 random bits, so a plain SHA-256 cannot be reversed by guessing; a slow
    # password hash would only slow down every request.
    return hashlib.sha256(token.encode()).hexdigest()


def add_labeler(db_path: Path, name: str, *, replace: bool = False) -> str:
    """Register a labeler and return their new token; only its hash is stored, so it is shown once.

    With replace=True an existing labeler gets a new token (their old one stops working) and keeps
    their labels.
    """
    if not LABELER_NAME.fullmatch(name):
        raise AlignkitError(f"labeler name {name!r}: use 1-64 letters, digits and . _ @ -, "
                            "starting with a letter or digit")
    token = secrets.token_urlsafe(24)
    init_db(db_path)
    with connect(db_path) as conn:
        if replace:
            conn.execute("INSERT INTO labelers (name, token_sha256, created_at) VALUES (?, ?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET token_sha256 = excluded.token_sha256",
                         (name, hash_token(token), now()))
        else:
            try:
                conn.execute("INSERT INTO labelers (name, token_sha256, created_at) VALUES (?, ?, ?)",
                             (name, hash_token(token), now()))
            except sqlite3.IntegrityError:
                raise AlignkitError(f"labeler {name!r} already exists; replacing their token "
                                    "(replace=True) revokes the old one") from None
    return token


def labeler_for_token(conn: sqlite3.Connection, token: str) -> str | None:
    row = conn.execute("SELECT name FROM labelers WHERE token_sha256 = ?", (hash_token(token),)).fetchone()
    return None if row is None else row[0]


# --- labels ----------------------------------------------------------------------------------

def rank_problems(ranks: Any, n_completions: int) -> list[str]:
    """What is wrong with `ranks` for a task of `n_completions` completions (empty when nothing).

    Valid ranks are one per completion, each an integer from 1 to n (ties share a number) or "F".
    """
    if not isinstance(ranks, list):
        return [f"ranks must be a list, got {type(ranks).__name__}"]
    problems = []
    if len(ranks) != n_completions:
        problems.append(f"got {len(ranks)} rank(s) for {n_completions} completions; give one per completion")
    for i, rank in enumerate(ranks, start=1):
        if rank == FAIL:
            continue
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= n_completions:
            problems.append(f'completion {i}: rank {json.dumps(rank)} is neither an integer from 1 to '
                            f'{n_completions} nor "F"')
    return problems


def save_label(conn: sqlite3.Connection, labeler: str, task_id: str, ranks: Any) -> None:
    """Store `labeler`'s ranking of a task, replacing any earlier one; InvalidLabel if it does not fit."""
    row = conn.execute("SELECT completions FROM tasks WHERE id = ?", (task_id,)).fetchone()
    if row is None:
        raise InvalidLabel(f"no task with id {task_id!r}")
    problems = rank_problems(ranks, len(json.loads(row[0])))
    if problems:
        raise InvalidLabel("; ".join(problems))
    conn.execute("INSERT INTO labels (task_id, labeler, ranks, updated_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT(task_id, labeler) DO UPDATE SET ranks = excluded.ranks, "
                 "updated_at = excluded.updated_at",
                 (task_id, labeler, json.dumps(ranks), now()))


def progress(conn: sqlite3.Connection) -> dict:
    """{"total": number of tasks, "labelers": [{"name": ..., "done": ...}, ...]} sorted by name."""
    total = conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]
    rows = conn.execute("SELECT name, COUNT(task_id) FROM labelers LEFT JOIN labels ON labeler = name "
                        "GROUP BY name ORDER BY name").fetchall()
    return {"total": total, "labelers": [{"name": name, "done": done} for name, done in rows]}


def done_and_total(conn: sqlite3.Connection, labeler: str) -> dict:
    """{"done": tasks `labeler` has labeled, "total": tasks in the database}."""
    done = conn.execute("SELECT COUNT(*) FROM labels WHERE labeler = ?", (labeler,)).fetchone()[0]
    return {"done": done, "total": conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0]}


def export(db_path: Path, out_path: Path) -> int:
    """Write every label as one rankings-file line, with "id" and "labeler" set, and return the count.

    Lines come in task load order, then by labeler. The file is written to a temporary name and
    renamed, so a reader never sees half an export.
    """
    with connect(db_path) as conn:
        rows = conn.execute("SELECT t.id, t.prompt, t.completions, l.ranks, l.labeler FROM labels l "
                            "JOIN tasks t ON t.id = l.task_id ORDER BY t.seq, l.labeler").fetchall()
    lines = [json.dumps({"id": id_, "prompt": prompt, "completions": json.loads(completions),
                         "ranks": json.loads(ranks), "labeler": labeler}) + "\n"
             for id_, prompt, completions, ranks, labeler in rows]
    atomic_write_text(Path(out_path), "".join(lines))
    return len(rows)
