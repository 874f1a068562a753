"""Export a model to one GGUF file (weights, tokenizer, chat template) for llama.cpp, Ollama, LM Studio.

    alignkit export gguf M --out model.gguf [--quant f16|q8_0|q4_0]

Written with the `gguf` package: `GGUFWriter` for the file, `gguf.quants` for the Q8_0/Q4_0 blocks,
and its tensor-name map for the Llama architecture (the only one exported; others are refused).

Three details decide whether llama.cpp and transformers read the file back as the same model:

* llama.cpp's Llama graph applies rotary embeddings to interleaved pairs of each head's dimensions,
  Hugging Face's to its two halves. The q and k projections are therefore written with each head's
  rows reordered from halves to pairs (`to_interleaved_rope`); transformers' GGUF loader undoes it.
* The tokenizer is stored as llama.cpp's "gpt2" (byte-level BPE) vocabulary: every token in the
  byte-to-unicode spelling of tokenizer.json, the merges, a type per token (normal, control for
  special tokens, user-defined for other added tokens), the special token ids and the chat template.
* A tied output embedding is written once (`token_embd`); no `output.weight` means "tied" to both
  readers.

Quantization: f16 stores every matrix in half precision; q8_0 and q4_0 store blocks of 32 values
with one f16 scale per block (8 or 4 bits per value). With q4_0 the embedding (the output layer too
when tied) is kept at q8_0, as llama.cpp's own quantizer keeps the output layer at higher precision:
it is the layer whose error reaches the logits undamped. Norm weights (1-D) stay float32. A matrix
whose rows do not split into blocks of 32 falls back to f16, and the export says so.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from alignkit.errors import AlignkitError

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class ExportError(AlignkitError):
    """The model cannot be exported as asked: an architecture, tokenizer or option we do not write."""


def to_interleaved_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows of a q/k projection from HF's halves layout to llama.cpp's pairs.

    Within one head of size d, HF rotates row i with row i + d/2; llama.cpp rotates rows 2j and
    2j + 1. So output row 2j takes input row j and output row 2j + 1 takes input row j + d/2.
    """
    rows = w.shape[0]
    if rows % (2 * heads):
        raise ExportError(f"a projection of {rows} rows does not split into {heads} heads of even size")
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def check_architecture(config) -> None:
    architectures = getattr(config, "architectures", None) or []
    if config.model_type != "llama" or (architectures and architectures[0] != "LlamaForCausalLM"):
        raise ExportError(f"GGUF export supports Llama-architecture models (LlamaForCausalLM); this model is "
                          f"{architectures[0] if architectures else config.model_type!r}. Convert it with "
                          "llama.cpp's convert_hf_to_gguf.py instead.")
    if getattr(config, "rope_scaling", None) and config.rope_scaling.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {config.rope_scaling} is not written by this exporter")


def float_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights as float32 tensors; adapters merged, torchao-quantized weights dequantized."""
    if hasattr(model, "merge_and_unload"):  # an adapter directory: export base plus adapter
        model = model.merge_and_unload()
    out = {}
    for name, t in model.state_dict().items():
        t = t.dequantize() if type(t) is not torch.Tensor and hasattr(t, "dequantize") else t
        out[name] = t.detach().float().cpu()
    return out


def vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of a byte-level BPE tokenizer, as llama.cpp's "gpt2" model stores them."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3 style); this "
                          f"tokenizer is {model.get('type')} with pre-tokenizer "
                          f"{(spec.get('pre_tokenizer') or {}).get('type')}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocab_size is {vocab_size}")
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(s.get("type") == "ByteLevel" for s in steps)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how text is split before BPE: "gpt-2" for the plain ByteLevel regex,
    the name transformers' GGUF reader uses for a known Split regex, else "default" (with a warning)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    for step in pre.get("pretokenizers", []):
        pattern = (step.get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if pattern == split:
                return name
    log.warning("unknown pre-tokenizer %s: written as 'default'; check tokenization in llama.cpp", pre.get("type"))
    return "default"


def tensor_type(name: str, t: torch.Tensor, quant: str, tied: bool):
    """The GGML type a tensor is stored as under `quant`."""
    from gguf import GGMLQuantizationType as Q

    if t.dim() < 2:
        return Q.F32
    wanted = {"f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[quant]
    if wanted == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = Q.Q8_0
    if wanted != Q.F16 and t.shape[-1] % BLOCK:
        log.warning("%s: rows of %d values do not split into blocks of %d; stored as f16", name, t.shape[-1], BLOCK)
        return Q.F16
    return wanted


@contextmanager
def atomic_file(path: Path):
    """A temporary path beside `path`, renamed onto it on success and removed on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_gguf(model_spec: str, out: Path, *, quant: str = "f16", progress: bool = True) -> dict:
    """Load `model_spec` (anything --model takes), write it to `out` as GGUF; returns a summary."""
    import gguf
    from tqdm.auto import tqdm

    from alignkit.models import load_model

    if quant not in QUANTS:
        raise ExportError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ExportError(f"--out must end in .gguf, got {out}")
    model, tokenizer = load_model(model_spec, device="cpu", dtype="float32")
    config = model.config
    check_architecture(config)
    tokens, types, merges = vocabulary(tokenizer, config.vocab_size)
    state = float_state_dict(model)
    del model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = bool(config.tie_word_embeddings)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        writer.add_name(Path(model_spec).name if model_spec != "embedded" else "SmolLM2-135M-Instruct")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                        or (config.rope_parameters or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                                 (writer.add_eos_token_id, tokenizer.eos_token_id),
                                 (writer.add_unk_token_id, tokenizer.unk_token_id),
                                 (writer.add_pad_token_id, tokenizer.pad_token_id)):
            if token_id is not None:
                setter(token_id)
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)

        counts: dict[str, int] = {}
        for hf_name, t in tqdm(state.items(), desc=f"export {quant}", unit="tensor", disable=not progress):
            if tied and hf_name == "lm_head.weight":
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ExportError(f"no GGUF name for tensor {hf_name}: not a plain Llama model")
            if name.endswith("attn_q.weight"):
                t = to_interleaved_rope(t, heads)
            elif name.endswith("attn_k.weight"):
                t = to_interleaved_rope(t, kv_heads)
            qtype = tensor_type(name, t, quant, tied)
            data = t.numpy().astype(np.float32)
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, data.astype(np.float16))
            elif qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "quant": quant, "bytes": out.stat().st_size, "tensors": counts,
            "parameters": sum(t.numel() for n, t in state.items() if not (tied and n == "lm_head.weight")),
            "tied_embeddings": tied, "chat_template": bool(tokenizer.chat_template)}
