"""GGUF export: the rotary reordering by hand and against transformers' reader, round trips through
alignkit's own .gguf loading per quant type, a PPO-trained adapter that still says what it learned,
and the refusals."""

import json

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from alignkit.export.cli import export_app
from alignkit.export.to_gguf import ExportError, export_gguf, to_interleaved_rope
from alignkit.models import generate, load_model

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(export_app, name="export")
# Relative error of the logits after the round trip, ||y_gguf - y|| / ||y||, on the tiny model.
# Measured when written: f16 2.8e-4, q8_0 7.7e-3, q4_0 3.8e-2.
TOL = {"f16": 2e-3, "q8_0": 2e-2, "q4_0": 0.1}
TEXT = "Where is my order? It has not arrived yet, please help."


@pytest.fixture(autouse=True)
def gguf_cache(tmp_path, monkeypatch):
    """Loading a .gguf converts it once into a cache under ALIGNKIT_HOME: keep that in the test's folder."""
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_rope_rows_go_from_halves_to_pairs_by_hand():
    """One head of size 4: HF rotates row 0 with row 2 and row 1 with row 3; llama.cpp rotates rows
    (0, 1) and (2, 3). So rows [a, b, c, d] are written as [a, c, b, d]. Two heads of size 4 reorder
    each head alone: [0..7] -> [0, 2, 1, 3, 4, 6, 5, 7]."""
    w = torch.arange(4.0)[:, None].expand(4, 3)
    assert to_interleaved_rope(w, 1)[:, 0].tolist() == [0, 2, 1, 3]
    assert to_interleaved_rope(torch.arange(8.0)[:, None], 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(ExportError, match="does not split into 3 heads"):
        to_interleaved_rope(torch.zeros(8, 2), 3)


def test_rope_reordering_is_undone_by_the_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(24, 5)
    reader = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    for heads, name in ((6, "blk.0.attn_q.weight"), (2, "blk.0.attn_k.weight")):
        back = reader.process(to_interleaved_rope(w, heads).numpy(), name).weights
        assert torch.equal(torch.from_numpy(back), w)


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_round_trip_through_alignkit_gguf_loading(tiny, tiny_model_dir, tmp_path, quant):
    model, tok = tiny
    out = tmp_path / f"tiny-{quant}.gguf"
    info = export_gguf(str(tiny_model_dir), out, quant=quant, progress=False)
    assert info["tied_embeddings"] and info["chat_template"] and out.stat().st_size == info["bytes"]
    assert not list(tmp_path.glob(".*partial"))
    back, back_tok = load_model(str(out), device="cpu")
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        y, yb = model(ids).logits, back(ids).logits
    assert 0 < rel(yb, y) < TOL[quant]
    assert back.config.tie_word_embeddings and back.config.num_key_value_heads == model.config.num_key_value_heads
    # The tokenizer comes back whole: same ids, same chat template, same special tokens. transformers'
    # GGUF reader adds GPT-2's "<|endoftext|>" when a vocabulary lacks it, after the model's ids.
    vocab, back_vocab = tok.get_vocab(), back_tok.get_vocab()
    assert {t: i for t, i in back_vocab.items() if t != "<|endoftext|>"} == vocab
    assert back_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert back_tok.apply_chat_template(messages, tokenize=False) == tok.apply_chat_template(messages, tokenize=False)
    assert (back_tok.eos_token, back_tok.bos_token) == (tok.eos_token, tok.bos_token)


def test_quantized_types_shrink_the_file(tiny_model_dir, tmp_path):
    """Per value: f16 2 bytes, q8_0 34/32, q4_0 18/32 (the tied embedding stays q8_0)."""
    sizes = {q: export_gguf(str(tiny_model_dir), tmp_path / f"{q}.gguf", quant=q, progress=False)
             for q in ("f16", "q8_0", "q4_0")}
    assert sizes["q4_0"]["tensors"]["Q8_0"] == 1  # token_embd only
    assert sizes["q4_0"]["bytes"] < sizes["q8_0"]["bytes"] < sizes["f16"]["bytes"]


VOWEL_REWARD = '''
def reward(prompts, completions):
    return [sum(c in "aeiou" for c in s.lower()) / max(len(s), 1) for s in completions]
'''


@pytest.fixture(scope="module")
def ppo_adapter(tmp_path_factory, tiny_model_dir):
    """A LoRA adapter trained by PPO (8 steps, vowel-share reward) on the tiny model with its tied
    embeddings scaled 4x, so that its logits are spread enough for an adapter to move greedy output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.config import PPOConfig, load_config
    from alignkit.recipes import ppo

    root = tmp_path_factory.mktemp("ppo_export")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(4.0)
    base.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "base")
    (root / "vowels.py").write_text(VOWEL_REWARD)
    (root / "prompts.txt").write_text("Where is my order?\nCan I return shoes?\nHow long does a refund take?\n"
                                      "Do you ship abroad?\n")
    cfg = {"model": str(root / "base"), "data": {"prompts": str(root / "prompts.txt")},
           "reward": f"{root / 'vowels.py'}:reward", "output_dir": str(root / "runs"), "run_name": "ppo",
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
           "learning_rate": 1e-2, "lr_scheduler": "constant", "rollout_batch": 4, "minibatch_size": 4,
           "max_new_tokens": 8, "max_steps": 8, "save_every": 100, "device": "cpu", "seed": 0,
           "kl_target": None, "kl_coef": 0.02}
    (root / "ppo.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = ppo.main(load_config(PPOConfig, root / "ppo.yaml"))
    return root / "base", run_dir / "final"


def test_ppo_adapter_exported_still_generates_its_trained_replies(ppo_adapter, tmp_path):
    base_dir, adapter_dir = ppo_adapter
    assert json.loads((adapter_dir / "adapter_config.json").read_text())  # an adapter, merged on export
    prompts = ["Where is my order?", "Do you ship abroad?", "Can I cancel?"]
    policy, tok = load_model(str(adapter_dir), device="cpu")
    base, _ = load_model(str(base_dir), device="cpu")
    trained = generate(policy, tok, prompts, max_new_tokens=12).tokens
    assert trained != generate(base, tok, prompts, max_new_tokens=12).tokens  # PPO changed the replies
    export_gguf(str(adapter_dir), tmp_path / "ppo-f16.gguf", quant="f16", progress=False)
    exported, exported_tok = load_model(str(tmp_path / "ppo-f16.gguf"), device="cpu")
    assert generate(exported, exported_tok, prompts, max_new_tokens=12).tokens == trained


def test_torchao_quantized_directory_exports_its_dequantized_weights(tiny, tmp_path):
    from alignkit.compress.quantize import quantize_model, save_quantized

    model, tok = tiny
    q8 = quantize_model(model, "int8-weight")
    qdir = save_quantized(q8, tok, tmp_path / "q8", {"method": "int8-weight"})
    export_gguf(str(qdir), tmp_path / "q8.gguf", quant="f16", progress=False)
    back, _ = load_model(str(tmp_path / "q8.gguf"), device="cpu")
    ids = tok([TEXT], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert rel(back(ids).logits, q8(ids).logits) < TOL["f16"]


def test_refusals(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    qwen.save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    with pytest.raises(ExportError, match="supports Llama-architecture models .*Qwen2ForCausalLM"):
        export_gguf(str(tmp_path / "qwen"), tmp_path / "q.gguf", progress=False)
    assert not (tmp_path / "q.gguf").exists() and not list(tmp_path.glob(".*partial"))
    with pytest.raises(ExportError, match="--out must end in .gguf"):
        export_gguf(str(tiny_model_dir), tmp_path / "model.bin")
    result = runner.invoke(cli, ["export", "gguf", str(tiny_model_dir), "--out", str(tmp_path / "m.gguf"),
                                 "--quant", "q5_k"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "must be one of f16, q8_0, q4_0" in result.output


def test_cli_writes_the_file_and_says_what_is_in_it(tiny_model_dir, tmp_path):
    out = tmp_path / "tiny.gguf"
    result = runner.invoke(cli, ["export", "gguf", str(tiny_model_dir), "--out", str(out), "--quant", "q8_0"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "14 Q8_0" not in result.output and "15 Q8_0" in result.output
    assert "tied embeddings" in result.output and "chat template" in result.output
