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
    """Save a 2-layer Llama with a 300-token BPE vocabulary (trained here) to `out`; the same model
    the test suite uses, so the tiny figures measure framework overhead rather than matmuls."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    corpus = []
    for f in EXAMPLES.glob("*.jsonl"):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            corpus.extend([rec.get("prompt", ""), rec.get("completion", "")])
            corpus.extend(m["content"] for m in rec.get("messages", []))
    corpus += ["The quick brown fox jumps over the lazy dog.", "user", "assistant", "system"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                     bos_token="<|im_start|>", eos_token="<|im_end|>")
    hf_tok.chat_template = chatml
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out
