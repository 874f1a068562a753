"""What every side of the PPO benchmark shares: the settings, the prompts, the reward, the tiny model.

Each side (alignkit PPO, TRL GRPO, TRL PPO) runs in its own process and reports one JSON result;
the settings here are the single place where "the same work" is written down.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS_FILE = REPO / "src" / "alignkit" / "data" / "examples" / "shop_prompts.txt"
EXAMPLES = REPO / "src" / "alignkit" / "data" / "examples"
# Toxicity (weight -1) plus a friendly tone (weight 0.25): a cheap, deterministic reward that needs
# no trained model, so every trainer calls the very same Python function.
JUDGE_FILE = REPO / "configs" / "judge_safety.yaml"

COMPLETIONS_PER_STEP = 8
MAX_NEW_TOKENS = 32
TEMPERATURE = 1.0
LEARNING_RATE = 1e-4
KL_COEF = 0.05  # alignkit kl_coef, TRL PPO kl_coef and TRL GRPO beta: the KL term is on for every side
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SEED = 0


def load_prompts() -> list[str]:
    return [line.strip() for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]


def peft_lora_config(task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"])


def reward_function():
    """The composed judge's score(prompts, completions) -> list of floats, as alignkit's PPO loads it."""
    from alignkit.evaluate.judges import load_judge

    return load_judge(JUDGE_FILE).score


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux: the peak resident memory of this whole process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result(side: str, step_seconds: list[float], step_tokens: list[float], **extra) -> dict:
    """Figures over the measured steps (the first, warm-up step already left out by the caller)."""
    seconds, tokens = sum(step_seconds), sum(step_tokens)
    return {"side": side, "steps": len(step_seconds), "s_per_step": seconds / len(step_seconds),
            "tokens_per_s": tokens / seconds, "tokens_per_step": tokens / len(step_tokens),
            "peak_rss_mb": peak_rss_mb(), **extra}


def write_result(path: Path, res: dict) -> None:
    Path(path).write_text(json.dumps(res))


def build_tiny_model(out: Path, seed: int = 0, layers: int = 2) -> Path:
    """The test suite's tiny Llama (2 layers, a 300-token BPE vocabulary trained on the spot), so the
    tiny figures measure framework overhead rather than matmuls."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model as build

    return build(out, seed=seed, layers=layers)
