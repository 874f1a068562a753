"""Run directories: one per training run, holding the resolved config, JSONL metrics, checkpoints and the final model."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from alignkit.errors import AlignkitError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


def new_run_dir(output_dir: Path, run_name: str | None, prefix: str, overwrite: bool) -> Path:
    """Pick and create the directory of a fresh run; refuse to clobber an existing one."""
    name = run_name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(output_dir) / name
    if run_dir.exists():
        if not overwrite:
            raise AlignkitError(f"run directory {run_dir} already exists: continue it with "
                                f"--resume {run_dir}, or start over with --overwrite")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def resume_config_path(run_dir: Path) -> Path:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise AlignkitError(f"--resume {run_dir}: no {CONFIG_FILE} there, so it is not an alignkit run directory")
    return path
