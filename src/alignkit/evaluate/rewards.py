"""Where a training reward comes from: a reward model, a judge YAML, or a Python function.

Each is turned into one callable, (prompts, completions) -> list of float scores, so the PPO recipe,
`alignkit eval` and the pipelines that call them need not know which it was.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from alignkit.errors import AlignkitError
from alignkit.evaluate.judges import load_judge


def python_reward(spec: str):
    """A Python reward function named 'file.py:function' or 'package.module:function', called as
    fn(prompts, completions) -> list of floats (a programmatic reward, e.g. a test's synthetic one)."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            if not Path(target).is_file():
                raise AlignkitError(f"reward {spec}: no file {target}")
            loader = importlib.util.spec_from_file_location(f"alignkit_reward_{Path(target).stem}", target)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise AlignkitError(f"reward {spec}: cannot import {target}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise AlignkitError(f"reward {spec}: {target} has no function {name!r}")
    return fn


def load_reward(path: Path, device):
    """(score function, description) from a reward-model directory (or its run directory), a judge
    YAML, or a Python function ('file.py:function' or 'package.module:function')."""
    spec = str(path)
    if ":" in spec and not Path(spec).exists():
        return python_reward(spec), f"python function {spec}"
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        judge = load_judge(path)
        return judge.score, judge.name
    from alignkit.models.heads import is_reward_model, load_reward_model

    rm_dir = path if is_reward_model(path) else path / "final"
    rm, tok = load_reward_model(rm_dir, device=device)
    rm.eval()
    return (lambda prompts, completions: rm.score_texts(tok, prompts, completions)), f"reward model {path}"
