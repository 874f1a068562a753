"""Constitutions: YAML files of principles, validated with clear errors, selected per application.

A constitution file:

    name: dialogue_rules                 # how selections refer to it
    description: ...                     # optional
    source: ...                          # optional: where the principles come from
    principles:
      - id: no_insults                   # lowercase letters, digits and _; unique in the file
        text: Choose the response that is least insulting...      # asked by the AI labeler
        critique_request: Identify anything insulting...          # the critique-and-revise loop
        revision_request: Rewrite the response so that...

Three ship with alignkit (human_rights, platform_terms, dialogue_rules). A selection names shipped
constitutions or files, optionally narrowed to some principles:

    human_rights:privacy,dialogue_rules          privacy from human_rights, every dialogue rule
    my_rules.yaml,platform_terms:honest_identity+private_information
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from alignkit.errors import ConfigError
from alignkit.io import read_text_file

CONSTITUTIONS_DIR = Path(__file__).resolve().parent / "constitutions"
PRINCIPLE_KEYS = ("id", "text", "critique_request", "revision_request")
FILE_KEYS = {"name", "description", "source", "principles"}
ID_PATTERN = re.compile(r"^[a-z0-9_]+$")


@dataclass(frozen=True)
class Principle:
    constitution: str
    id: str
    text: str
    critique_request: str
    revision_request: str

    @property
    def key(self) -> str:
        """'constitution:id', unique across every selected file."""
        return f"{self.constitution}:{self.id}"


@dataclass(frozen=True)
class Constitution:
    name: str
    path: Path
    principles: tuple[Principle, ...]
    description: str = ""
    source: str = ""


def shipped() -> list[str]:
    """Names of the constitutions that ship with alignkit."""
    return sorted(p.stem for p in CONSTITUTIONS_DIR.glob("*.yaml"))


def _node_lines(text: str) -> list[int]:
    """1-based line of each item of the top-level `principles` list, for error messages."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return []
    if not isinstance(root, yaml.MappingNode):
        return []
    for key, value in root.value:
        if key.value == "principles" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def principle_problems(item, seen: set[str]) -> list[str]:
    """Everything wrong with one principle entry; `seen` collects ids to catch repeats."""
    if not isinstance(item, dict):
        return [f"expected a mapping with keys {', '.join(PRINCIPLE_KEYS)}, got {type(item).__name__}"]
    problems = [f"unknown key '{k}' (allowed: {', '.join(PRINCIPLE_KEYS)})" for k in item if k not in PRINCIPLE_KEYS]
    for key in PRINCIPLE_KEYS:
        if key not in item:
            problems.append(f"missing '{key}'")
        elif not isinstance(item[key], str) or not item[key].strip():
            problems.append(f"'{key}' must be a non-empty string, got {item[key]!r}")
    pid = item.get("id")
    if isinstance(pid, str) and pid.strip():
        if not ID_PATTERN.match(pid):
            problems.append(f"id {pid!r} must use lowercase letters, digits and _ only")
        elif pid in seen:
            problems.append(f"id {pid!r} is used twice")
        seen.add(pid)
    return problems


def load_constitution(path: Path | str) -> Constitution:
    """Read and validate a constitution file; ConfigError lists every problem with file, line and principle."""
    path = Path(path)
    text = read_text_file(path, "constitution")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                          f"{getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'name' and 'principles' at the top level")
    problems = [f"{path}: unknown key '{k}' (allowed: {', '.join(sorted(FILE_KEYS))})"
                for k in data if k not in FILE_KEYS]
    name = data.get("name")
    if not isinstance(name, str) or not ID_PATTERN.match(name):
        problems.append(f"{path}: 'name' must be lowercase letters, digits and _, got {name!r}")
    for key in ("description", "source"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{path}: '{key}' must be a string")
    items = data.get("principles")
    if not isinstance(items, list) or not items:
        problems.append(f"{path}: 'principles' must be a non-empty list")
        items = []
    lines, seen = _node_lines(text), set()
    for i, item in enumerate(items):
        where = f"{path}:{lines[i]}" if i < len(lines) else str(path)
        pid = item.get("id") if isinstance(item, dict) else None
        label = f"principles[{i}]" + (f" (id {pid!r})" if isinstance(pid, str) else "")
        problems += [f"{where}: {label}: {p}" for p in principle_problems(item, seen)]
    if problems:
        raise ConfigError(f"invalid constitution {path}:\n  " + "\n  ".join(problems))
    principles = tuple(Principle(name, it["id"], " ".join(it["text"].split()), " ".join(it["critique_request"].split()),
                                 " ".join(it["revision_request"].split())) for it in items)
    return Constitution(name, path, principles, data.get("description", ""), data.get("source", ""))


def _resolve(ref: str) -> Path:
    """A shipped constitution's name, or a path to a YAML file."""
    if ref.endswith((".yaml", ".yml")) or "/" in ref:
        return Path(ref)
    if ref not in shipped():
        raise ConfigError(f"no constitution {ref!r}: name a shipped one ({', '.join(shipped())}) "
                          "or give a path to a .yaml file")
    return CONSTITUTIONS_DIR / f"{ref}.yaml"


def select_principles(selection: str) -> list[Principle]:
    """Principles named by a selection: comma-separated `constitution[:id+id...]` items (see module doc)."""
    chosen: dict[str, Principle] = {}
    items = [s.strip() for s in selection.split(",") if s.strip()]
    if not items:
        raise ConfigError("principles: empty selection; name at least one constitution, e.g. dialogue_rules")
    for item in items:
        ref, _, ids = item.partition(":")
        constitution = load_constitution(_resolve(ref))
        by_id = {p.id: p for p in constitution.principles}
        wanted = [i.strip() for i in ids.split("+") if i.strip()] if ids else list(by_id)
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise ConfigError(f"principles {item!r}: {constitution.path} has no principle "
                              f"{', '.join(map(repr, unknown))}; it has: {', '.join(by_id)}")
        for i in wanted:
            chosen.setdefault(by_id[i].key, by_id[i])
    return list(chosen.values())


def sample_principle(principles: list[Principle], rng: random.Random) -> Principle:
    """One principle drawn uniformly, as the CAI paper samples one per critique and per comparison."""
    return principles[rng.randrange(len(principles))]
