"""The TRL 1.16 side of the PPO benchmark: `GRPOTrainer` with the same LoRA, prompts, reward,
completions per step, lengths and sampling temperature as alignkit's PPO, and one optimisation pass
over each step's 8 completions (num_iterations 1, one batch of 8, no accumulation), KL on (beta > 0).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import _ppo_common as common


def run(model_dir: str, steps: int, workdir: Path) -> dict:
    """steps + 1 GRPO updates (the first is warm-up); figures over the last `steps`."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignkit.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    # Conversational prompts: TRL renders them with the tokenizer's chat template, as alignkit does.
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in common.load_prompts()]})
    score = common.reward_function()

    def judge_safety(prompts, completions, **_):
        return score([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])

    n = common.COMPLETIONS_PER_STEP
    args = GRPOConfig(
        output_dir=str(workdir / "trl-grpo"), report_to="none", save_strategy="no", use_cpu=True,
        # float32 (or bfloat16 autocast with --dtype bfloat16) without activation checkpointing, as
        # alignkit trains; TRL defaults to bfloat16 and checkpointing otherwise.
        bf16=common.trl_bf16(), gradient_checkpointing=False,
        num_generations=n, per_device_train_batch_size=n, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=common.MAX_NEW_TOKENS, temperature=common.TEMPERATURE, top_p=1.0,
        beta=common.KL_COEF, learning_rate=common.LEARNING_RATE, lr_scheduler_type="constant",
        max_steps=steps + 1, seed=common.SEED, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if "completions/mean_length" in logs:  # per step, as logging_steps is 1
                tokens.append(n * logs["completions/mean_length"])

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=judge_safety, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=common.peft_lora_config(), callbacks=[Clock()])
    trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(times)]
    return common.result("TRL 1.16 GRPOTrainer", step_s[1:], tokens[1:])
