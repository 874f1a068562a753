"""Smoke test on the embedded SmolLM2-135M-Instruct: converted once to safetensors, then it chats."""

from alignkit.models import generate, load_model
from alignkit.models.loading import EMBEDDED_CACHE, alignkit_home


def test_embedded_loads_from_cache_and_generates_8_tokens():
    model, tok = load_model("embedded", device="cpu")
    cache = alignkit_home() / "models" / EMBEDDED_CACHE
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    assert tok.chat_template is not None
    out = generate(model, tok, ["What is the capital of France?"], max_new_tokens=8)
    assert len(out.tokens[0]) == 8 or out.finished[0]
    assert "Paris" in out.texts[0]
