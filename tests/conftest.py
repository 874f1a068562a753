"""Shared fixtures: a tiny Llama built from a config and a BPE tokenizer trained on the spot.

The tiny model keeps the suite fast; a few smoke tests use the embedded SmolLM2 instead.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# Decode products exact to float32 on every CPU (no bfloat16 on AMX CPUs), so that a test gives the
# same tokens on every machine; tests of the bfloat16 products set it themselves.
os.environ["ALIGNKIT_DECODE_PRECISION"] = "float32"
# Training's frozen-weight products in float32 too (dtype "auto" picks bfloat16 on AMX CPUs); tests
# of the bfloat16 products ask for it in their config.
os.environ["ALIGNKIT_TRAIN_PRECISION"] = "float32"

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "data" / "examples"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_model(out: Path, seed: int = 0, layers: int = 2) -> Path:
    """Save a 2-layer Llama with a 300-token BPE vocabulary (trained here) to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    hf_tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(hf_tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                         pad_token_id=hf_tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) of the tiny model, loaded once; tests must not modify it."""
    from alignkit.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture()
def sft_file(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text((EXAMPLES / "shop_sft.jsonl").read_text())
    return path


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory for extra tiny models: make_tiny_model(path, seed=..., layers=...)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def launch_two():
    """Run `alignkit ARGS...` in 2 CPU processes (gloo) under accelerate launch; its --multi_gpu flag
    means "start the processes with torchrun", which is what works on CPUs. Returns the completed process."""
    import subprocess
    import sys

    def run(*args: str):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                               "-m", "alignkit.cli", *args], env=env, capture_output=True, text=True, timeout=300)

    return run


POLITE = ["Happy to help!", "Thanks for asking!", "Great question!", "Of course!", "Sure, glad to help.",
          "Thank you for waiting."]
RUDE = ["Stop bothering me.", "Ugh, whatever.", "Not my problem.", "Figure it out.", "Go away.", "Ask someone else."]
ANSWERS = ["Returns are free within 30 days.", "Your order ships tomorrow.", "Refunds take two days.",
           "Use the Track package button.", "We accept cards and PayPal.", "Gift wrap costs three dollars.",
           "Open Orders and click Cancel.", "The jacket is back next week."]
PROMPTS = ["Can I return shoes?", "Where is my order?", "When is my refund?", "How do I track it?",
           "How can I pay?", "Do you wrap gifts?", "Can I cancel?", "Is the jacket in stock?",
           "Help with my order", "Question about returns", "Shipping question", "I need help"]


def synthetic_pairs(rng, prompts, answers, n):
    """Chosen and rejected share the answer and differ only in a polite or rude opening, so
    neither length nor content gives the preference away."""
    out, seen = [], set()
    while len(out) < n:
        answer = rng.choice(answers)
        pair = (rng.choice(prompts), f"{rng.choice(POLITE)} {answer}", f"{rng.choice(RUDE)} {answer}")
        if pair not in seen:  # the validator rightly refuses duplicates
            seen.add(pair)
            out.append(dict(zip(("prompt", "chosen", "rejected"), pair)))
    return out


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture()
def pair_files(tmp_path):
    """(train, held-out) synthetic pairs files: held-out prompts and answers never appear in training."""
    rng = random.Random(0)
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(rng, PROMPTS[:8], ANSWERS[:6], 96))
    # Held out: prompts and answers never seen in training.
    held = write_jsonl(tmp_path / "eval.jsonl", synthetic_pairs(rng, PROMPTS[8:], ANSWERS[6:], 40))
    return train, held
