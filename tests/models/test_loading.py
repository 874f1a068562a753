"""Model loading: every --model kind, and clear errors for bad paths."""

import pytest

from alignkit.errors import ModelLoadError
from alignkit.models import load_model
from alignkit.models.loading import describe


def test_hf_directory_loads_with_chat_template(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    info = describe(model, tok)
    assert info["layers"] == 2 and info["chat_template"] and info["context_length"] == 256
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert not model.training


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_model(str(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_corrupt_weights_name_the_directory(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match=f"cannot load weights from {bad}"):
        load_model(str(bad), device="cpu")


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model(str(bad))
    assert not any((tmp_path / "home").rglob("config.json"))  # nothing half-written in the cache


def test_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="must be a .gguf"):
        load_model(str(f))
