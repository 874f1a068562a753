"""What every side of the PPO benchmark shares: the settings, the prompts, the reward, the tiny model.

Each side (alignkit PPO, TRL GRPO, TRL PPO) runs in its own process and reports one JSON result;
the settings here are the single place where "the same work" is written down.
"""

from __future__ import annotations

import json
import os
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
# "float32" (default), "bfloat16" or "auto" for every side, set by bench_ppo.py --dtype through the environment:
# alignkit's `dtype: bfloat16` (the frozen base's products in bfloat16 on the CPU) and TRL's `bf16=True`
# (its own default: autocast to bfloat16).
# "auto": each side's default, alignkit's `dtype: auto` (bfloat16 frozen products on a CPU with AMX,
# float32 elsewhere) and TRL's bf16 on the same condition; the older checkout's own `auto`.
DTYPE = os.environ.get("ALIGNKIT_BENCH_DTYPE", "float32")


def trl_bf16() -> bool:
    """TRL's bf16 flag for DTYPE: on for bfloat16, and for auto where alignkit's auto picks bfloat16."""
    if DTYPE == "auto":
        from alignkit.models.cpu_linear import cpu_has_amx_bf16

        return cpu_has_amx_bf16()
    return DTYPE == "bfloat16"
# "bench" (default: the settings above) or "demo", set by bench_ppo.py --shape through the environment:
# the demo's PPO run (configs/demo/ppo.yaml): its training prompts, at most 48 new tokens at temperature
# 0.7, LoRA r 16 on all seven projections, learning rate 1e-3, KL coefficient 0.1. The reward stays the
# judge function above: the demo's reward model would add the same scoring seconds to every side.
SHAPE = os.environ.get("ALIGNKIT_BENCH_SHAPE", "bench")
if SHAPE == "demo":
    PROMPTS_FILE = EXAMPLES / "service_train.txt"
    MAX_NEW_TOKENS, TEMPERATURE, LEARNING_RATE, KL_COEF = 48, 0.7, 1e-3, 0.1
    LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


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


class PlainGenerate:
    """Rollouts as they were before the rollout engine, for the "before" side of the benchmark:
    transformers' `model.generate` on the PEFT-wrapped policy itself (LoRA applied in every layer,
    dynamic KV cache), one batched call per step seeded by the first row's seed. Same interface as
    the engine (sync, generate), so the recipe runs unchanged."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def sync(self, policy):
        self.model = policy

    def generate(self, prompts, *, n=1, max_new_tokens=64, temperature=0.0, top_p=1.0, seed=None,
                 return_logprobs=False, **_):
        import torch
        from transformers import GenerationConfig

        from alignkit.models.generation import Generation, eos_ids, left_pad, render_prompt

        tok, model = self.tokenizer, self.model
        eos = eos_ids(tok, model)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {}
        config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                  return_dict_in_generate=True, output_logits=return_logprobs, **sampling)
        prompt_ids = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
        ids, mask = left_pad(prompt_ids, tok.pad_token_id, next(model.parameters()).device)
        with torch.inference_mode(), torch.random.fork_rng():
            torch.manual_seed(seed[0] if isinstance(seed, list) else (seed or 0))
            result = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = result.sequences[:, ids.shape[1]:].cpu()
        out = Generation(prompt_ids, [], [], [], [] if return_logprobs else None)
        for i in range(new.shape[0]):
            row = new[i].tolist()
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), None)
            kept = row[:cut] if cut is not None else row
            out.tokens.append(kept)
            out.finished.append(cut is not None)
            out.texts.append(tok.decode(kept, skip_special_tokens=True).strip())
            if return_logprobs:
                scale = temperature if temperature > 0 else 1.0
                out.logprobs.append(torch.stack([torch.log_softmax(result.logits[t][i].float() / scale, -1)[kept[t]]
                                                 for t in range(len(kept))]).cpu())
        return out
