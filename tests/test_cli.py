"""The command line: help, generate, chat, models info, and bad input -> message + non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("generate", "chat", "train", "models", "sandbox"):
        assert cmd in result.output
    sft_help = runner.invoke(app, ["train", "sft", "--help"])
    assert "lora.r (default 8)" in sft_help.output and "data.train (required)" in sft_help.output


def test_generate_json(tiny_model_dir):
    result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "-p", "Hi", "-p", "Where is it?",
                                 "--max-new-tokens", "5", "--json", "--logprobs", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(l) for l in result.output.splitlines() if l.startswith("{")]
    assert [r["prompt"] for r in records] == ["Hi", "Where is it?"]
    for r in records:
        assert 1 <= len(r["tokens"]) <= 5 and len(r["logprobs"]) == len(r["tokens"])
        assert all(lp <= 0 for lp in r["logprobs"])


def test_chat_reads_piped_lines_and_keeps_history(tiny_model_dir):
    result = runner.invoke(app, ["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4",
                                 "--device", "cpu"], input="hello\n/reset\nsecond question\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("you> ") == 3 and result.output.count("bot> ") == 2


def test_models_info_json(tiny_model_dir):
    result = runner.invoke(app, ["models", "info", str(tiny_model_dir), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["layers"] == 2 and info["context_length"] == 256 and info["adapters"] == {}


def run_cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "alignkit.cli", *args], env=env, capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.parametrize("case", ["unknown_key", "bad_jsonl", "missing_model", "wrong_type"])
def test_bad_input_names_the_place_and_writes_no_run(case, tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = {"model": str(tiny_model_dir), "data": {"train": str(data)}, "output_dir": str(tmp_path / "runs"),
           "device": "cpu", "micro_batch_size": 1, "max_steps": 1}
    extra = []
    if case == "unknown_key":
        cfg["learning_rte"] = 0.1
        expect = ["c.yaml:7: learning_rte: unknown key"]
    elif case == "bad_jsonl":
        data.write_text('{"prompt": "a"}\n{not json\n')  # no usable line (one would be used: exit 3)
        expect = [f"{data}: 2 problem(s)", "line 1: missing field 'completion'", "line 2: invalid JSON"]
    elif case == "missing_model":
        cfg["model"] = str(tmp_path / "no-such-model")
        expect = ["no-such-model': no such file or directory"]
    else:
        extra = ["lora.r=big"]
        expect = ["override: lora.r: Input should be a valid integer", "'big'"]
    (tmp_path / "c.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    result = run_cli("train", "sft", "--config", str(tmp_path / "c.yaml"), *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    for text in expect:
        assert text in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()
