"""The TRL 1.10 side of the PPO benchmark: `trl.experimental.ppo.PPOTrainer` with the same LoRA,
prompts, reward, completions per step and lengths as alignkit's PPO.

TRL dropped this trainer after 1.10, and 1.10 cannot share an environment with the TRL 1.16 used for
GRPO, so this module runs with a TRL 1.10 installed apart and put first on PYTHONPATH.

TRL's PPO takes its reward from a sequence-classifier-shaped model (`get_reward` calls the model's
backbone, then `model.score` on the last hidden states). JudgeRewardModel has that shape and calls the
shared judge on the decoded completion, so both PPOs score with the same Python function.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from types import SimpleNamespace

import _ppo_common as common
import torch


class JudgeRewardModel(torch.nn.Module):
    """A reward "model" for TRL's get_reward: the judge's score of each decoded completion, repeated
    at every position (TRL reads it at the last response token)."""

    base_model_prefix = "backbone"

    def __init__(self, tokenizer, score_fn, marker_ids: list[int]):
        super().__init__()
        self.tokenizer, self.score_fn, self.marker_ids = tokenizer, score_fn, marker_ids
        self.lengths: list[int] = []  # completion lengths of every rollout scored, in order
        self.anchor = torch.nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the module a device

    def backbone(self, input_ids, attention_mask, **_):
        prompts, completions = [], []
        for row, mask in zip(input_ids, attention_mask):
            real = row[mask.bool()].tolist()
            start = self._completion_start(real)
            self.lengths.append(len(real) - start)  # generated tokens, the stop token included
            prompts.append(self.tokenizer.decode(real[:start], skip_special_tokens=True))
            completions.append(self.tokenizer.decode(real[start:], skip_special_tokens=True).strip())
        scores = torch.tensor(self.score_fn(prompts, completions), dtype=torch.float32, device=input_ids.device)
        hidden = scores[:, None, None].expand(-1, input_ids.shape[1], 1)
        return SimpleNamespace(hidden_states=[hidden])

    def _completion_start(self, ids: list[int]) -> int:
        """Index just after the last occurrence of the chat template's assistant header."""
        m = self.marker_ids
        for i in range(len(ids) - len(m), -1, -1):
            if ids[i:i + len(m)] == m:
                return i + len(m)
        raise ValueError("no assistant header in a rollout: the prompts were not chat-rendered")

    def score(self, hidden):
        return hidden


def run(model_dir: str, steps: int, workdir: Path) -> dict:
    """steps + 1 PPO updates (the first is warm-up); figures over the last `steps`."""
    import trl
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from alignkit.models.generation import render_prompt
    from alignkit.models.loading import load_tokenizer

    if not trl.__version__.startswith("1.10."):
        raise RuntimeError(f"TRL's PPO side needs TRL 1.10 first on PYTHONPATH, found {trl.__version__} at {trl.__file__}")

    tokenizer = load_tokenizer(model_dir)
    rendered = [render_prompt(tokenizer, p) for p in common.load_prompts()]
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        # TRL's PPO takes every pad id for padding, so a pad equal to <|im_end|> would mask the chat
        # template's own end-of-turn tokens: pad with a special token the prompts never contain.
        tokenizer.pad_token = next(t for t in tokenizer.all_special_tokens
                                   if t != tokenizer.eos_token and not any(t in r for r in rendered))
    tokenizer.padding_side = "left"
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in rendered]})
    header = render_prompt(tokenizer, "x").rpartition("x")[2].split("\n")[-2] + "\n"  # "<|im_start|>assistant\n"

    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The critic gets the same LoRA (plus its score head) instead of full fine-tuning: alignkit's value
    # head shares the LoRA'd backbone, so full-parameter critic updates would not be like for like.
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tokenizer.pad_token_id
    value = get_peft_model(value, common.peft_lora_config("SEQ_CLS"))
    reward = JudgeRewardModel(tokenizer, common.reward_function(), tokenizer(header, add_special_tokens=False)["input_ids"])

    n = common.COMPLETIONS_PER_STEP
    args = PPOConfig(
        output_dir=str(workdir / "trl-ppo"), report_to="none", save_strategy="no", use_cpu=True,
        # alignkit trains in float32 without activation checkpointing; TRL defaults to both otherwise.
        bf16=common.trl_bf16(), gradient_checkpointing=False,
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=n * (steps + 1), local_rollout_forward_batch_size=n, response_length=common.MAX_NEW_TOKENS,
        temperature=common.TEMPERATURE, kl_coef=common.KL_COEF, learning_rate=common.LEARNING_RATE,
        lr_scheduler_type="constant", stop_token="eos", num_sample_generations=0, seed=common.SEED,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)

    times = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_log(self, *a, **k):  # once per PPO update, at its end
            times.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=common.peft_lora_config(),
                         callbacks=[Clock()])
    trainer.train()
    step_s = [b - a for a, b in itertools.pairwise(times)]
    # TRL 1.10 logs no completion length, so the reward wrapper counted the tokens it scored.
    tokens = [sum(reward.lengths[i:i + n]) for i in range(0, len(reward.lengths), n)]
    return common.result("TRL 1.10 PPOTrainer", step_s[1:], tokens[1:])
