"""Configs: YAML plus overrides, and errors that name the file, line and field."""

import pytest

from alignkit.config import SFTConfig, load_config
from alignkit.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  r: 4\n")
    cfg = load_config(SFTConfig, p, ["lora.r=16", "max_steps=3", "lora.target_modules=[q_proj]"])
    assert cfg.lora.r == 16 and cfg.max_steps == 3 and cfg.lora.target_modules == ["q_proj"]
    assert str(cfg.data.train) == "a.jsonl" and cfg.model == "embedded"


def test_unknown_key_names_file_and_line(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\nlora:\n  rank: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert f"{p}:4: lora.rank: unknown key" in str(e.value)


def test_wrong_type_names_field_and_value(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\nmicro_batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert f"{p}:3: micro_batch_size" in msg and "'many'" in msg


def test_missing_required_field(tmp_path):
    p = write(tmp_path, "model: embedded\n")
    with pytest.raises(ConfigError, match="data: Field required"):
        load_config(SFTConfig, p)


def test_bad_override(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n")
    with pytest.raises(ConfigError, match="override: lora.r"):
        load_config(SFTConfig, p, ["lora.r=0"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(SFTConfig, p, ["lora.r"])


def test_invalid_yaml_reports_line(tmp_path):
    p = write(tmp_path, "data:\n  train: a.jsonl\n lora: [\n")
    with pytest.raises(ConfigError, match=rf"{p}:\d+: invalid YAML"):
        load_config(SFTConfig, p)
