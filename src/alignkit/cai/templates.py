"""The prompt templates of the Constitutional AI stages, read from the YAML files in cai/prompts/."""

from __future__ import annotations

from pathlib import Path

import yaml

from alignkit.errors import ConfigError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def load_template(name_or_path: str | Path, required: tuple[str, ...]) -> dict:
    """A template file (a shipped name such as 'compare', or a path) with its `required` keys checked."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROMPTS_DIR / f"{name_or_path}.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read prompt template: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise ConfigError(f"{path}: prompt template needs {', '.join(repr(k) for k in missing)}")
    return data


def strip_prefixes(text: str, prefixes: list[str]) -> str:
    """Remove labels such as 'Revision:' that a small model puts before its answer, and quotes around it."""
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if text.lower().startswith(prefix.lower()):
                text, changed = text[len(prefix):].strip(), True
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
