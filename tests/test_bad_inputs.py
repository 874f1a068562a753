"""The bad-input battery: every command that reads a user's file gets it truncated, empty, binary,
of the wrong type, and as one huge line.

For each, the command must name the file (and the line, where the file has lines to name), end with
a non-zero exit code, and leave no half-written output. A command that salvages (uses the good lines
of a damaged file and names the bad ones) exits 3 and writes a complete output of what it could use;
`rag ingest` does so per source (an unusable file is named and skipped; the index stays valid).

Commands run in-process through typer's CliRunner (a subprocess pays ~7 s of imports each). An
AlignkitError escaping the runner is what `alignkit` prints as "error: ..." with exit code 2.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.errors import AlignkitError
from alignkit.io import take_skipped

runner = CliRunner()

HUGE = 4_000_000  # characters on the one line of a "huge" file
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x01\x00\xff\xd8\xff\xe0" * 8

GOOD = {
    "sft": {"prompt": "Where is my order?", "completion": "It ships today."},
    "pairs": {"prompt": "Hi", "chosen": "Hello! How can I help?", "rejected": "What."},
    "rankings": {"prompt": "Hi", "completions": ["Hello! How can I help?", "What."], "ranks": []},
    "prompts": {"prompt": "Where is my order?", "category": "service"},
}
JSONL_WRONG_TYPE = {  # valid JSON of the wrong shape for the file
    "sft": '["Where is my order?", "It ships today."]\n',
    "pairs": json.dumps(GOOD["rankings"]) + "\n",
    "rankings": json.dumps(GOOD["pairs"]) + "\n",
    "prompts": '"Where is my order?"\n',
}
JUDGE_YAML = "components:\n  - {name: positive, judge: sentiment, weight: 1.0}\n"


def jsonl_inputs(kind: str) -> dict[str, bytes]:
    good = json.dumps(GOOD[kind]) + "\n"
    return {
        "truncated": (good + good[: len(good) // 2]).encode(),
        "empty": b"",
        "binary": BINARY,
        "wrong_type": JSONL_WRONG_TYPE[kind].encode(),
        "huge_line": ('{"prompt": "' + "x" * HUGE + "\n").encode(),
    }


def yaml_inputs(truncated: str, wrong_type: str) -> dict[str, bytes]:
    return {
        "truncated": truncated.encode(),
        "empty": b"",
        "binary": BINARY,
        "wrong_type": wrong_type.encode(),
        "huge_line": ("components: [" + "x" * HUGE + "\n").encode(),
    }


def python_inputs() -> dict[str, bytes]:
    return {
        "truncated": (b"from alignkit.apps.agents.tools import tool\n\n@tool\n"
                      b"def add(a: int, b: int) -> int:\n    \"\"\"Add"),
        "empty": b"",
        "binary": BINARY,
        "wrong_type": b'{"tools": ["calculator"]}\n',
        "huge_line": ("x = '" + "x" * HUGE + "\n").encode(),
    }


def commands(tiny: str, reward_dir: str = "") -> dict[str, tuple[str, dict[str, bytes], callable]]:
    """name -> (file suffix, the bad inputs, args(path, tmp) for the command reading that file)."""
    model = ["--model", tiny, "--device", "cpu", "--max-new-tokens", "4"]
    return {
        "train sft data": (".jsonl", jsonl_inputs("sft"), lambda p, t: [
            "train", "sft", "--config", "configs/sft.yaml", f"model={tiny}", f"data.train={p}", "data.eval=null",
            "max_steps=1", "micro_batch_size=1", "grad_accum=1", f"output_dir={t / 'runs'}", "run_name=bad"]),
        "train reward pairs": (".jsonl", jsonl_inputs("pairs"), lambda p, t: [
            "train", "reward", "--config", "configs/reward.yaml", f"model={tiny}", f"data.train={p}",
            "data.eval=null", "max_steps=1", "micro_batch_size=1", "grad_accum=1", f"output_dir={t / 'runs'}", "run_name=bad"]),
        "train dpo pairs": (".jsonl", jsonl_inputs("pairs"), lambda p, t: [
            "train", "dpo", "--config", "configs/dpo.yaml", f"model={tiny}", f"data.train={p}", "data.eval=null",
            "max_steps=1", "micro_batch_size=1", "grad_accum=1", f"output_dir={t / 'runs'}", "run_name=bad"]),
        "train grpo prompts": (".jsonl", jsonl_inputs("prompts"), lambda p, t: [
            "train", "grpo", "--config", "configs/grpo.yaml", f"model={tiny}", f"data.prompts={p}",
            f"reward={write(t / 'judge.yaml', JUDGE_YAML.encode())}", "rollout_batch=1", "group_size=2",
            "max_new_tokens=4", "max_steps=1", f"output_dir={t / 'runs'}", "run_name=bad"]),
        "prefs from-rankings": (".jsonl", jsonl_inputs("rankings"), lambda p, t: [
            "prefs", "from-rankings", str(p), str(t / "out.jsonl")]),
        "prefs judge candidates": (".jsonl", jsonl_inputs("rankings"), lambda p, t: [
            "prefs", "judge", "--candidates", str(p), "--judge", str(write(t / "judge.yaml", JUDGE_YAML.encode())),
            "--out", str(t / "out.jsonl")]),
        "prefs judge YAML": (".yaml", yaml_inputs("components:\n  - {name: positive, judge: sentiment",
                                                  "- sentiment\n- toxicity\n"), lambda p, t: [
            "prefs", "judge", "--candidates", str(write(t / "c.jsonl", (json.dumps(GOOD["rankings"]) + "\n").encode())),
            "--judge", str(p), "--out", str(t / "out.jsonl")]),
        "train sft config": (".yaml", yaml_inputs("model: embedded\ndata:\n  train: [a.jsonl", "- model\n- data\n"),
                             lambda p, t: ["train", "sft", "--config", str(p)]),
        "prefs sample prompts": (".jsonl", jsonl_inputs("prompts"), lambda p, t: [
            "prefs", "sample", "--prompts", str(p), "--out", str(t / "out.jsonl"), "--n", "2", *model]),
        "cai redteam seeds": (".jsonl", jsonl_inputs("prompts"), lambda p, t: [
            "cai", "redteam", "--seeds", str(p), "--out", str(t / "out.jsonl"), "--variations", "0", *model]),
        "cai revise input": (".jsonl", jsonl_inputs("prompts"), lambda p, t: [
            "cai", "revise", "-i", str(p), "--out-dir", str(t / "out"), *model]),
        "cai principles constitution": (".yaml", yaml_inputs("name: mine\nprinciples:\n  - id: kind\n    critique",
                                                             "- be kind\n- be honest\n"),
                                        lambda p, t: ["cai", "principles", str(p)]),
        "label serve tasks": (".jsonl", jsonl_inputs("rankings"), lambda p, t: [
            "label", "serve", "--db", str(t / "out.sqlite"), "--tasks", str(p)]),
        "agent run tools": (".py", python_inputs(), lambda p, t: ["agent", "run", "--tools", str(p), "What is 2+2?"]),
        "prefs sample text prompts": (".txt", {"empty": b"", "binary": BINARY}, lambda p, t: [
            "prefs", "sample", "--prompts", str(p), "--out", str(t / "out.jsonl"), "--n", "2", *model]),
        "reward score file": (".jsonl", jsonl_inputs("pairs"), lambda p, t: [
            "reward", "score", "-m", reward_dir, "--file", str(p), "--out", str(t / "out.jsonl")]),
        "rag ingest csv": (".csv", {
            "truncated": b'city,note\nOslo,cold\nBergen,"rainy\nTromso,dark\n', "empty": b"", "binary": BINARY,
            "wrong_type": b"\n\n\n", "huge_line": ("city,note\nOslo,\"" + "x" * HUGE + "\n").encode()},
            lambda p, t: ["rag", "ingest", str(p), "--index", str(t / "out.db"), "--model", tiny]),
    }


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def names_file_and_line(message: str, path: Path, whole_file: bool) -> bool:
    """The message names the file and, unless the problem is the whole file (empty, or a YAML or
    Python file of the wrong kind altogether), the line."""
    if str(path) not in message and path.name not in message:
        return False
    return whole_file or re.search(rf"{re.escape(path.name)}:\d+|line \d+", message) is not None


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A reward model (the tiny model with a fresh scalar head) for `reward score`."""
    from alignkit.models import ScalarHeadModel, load_model

    base, tok = load_model(str(tiny_model_dir), device="cpu")
    out = tmp_path_factory.mktemp("rm") / "final"
    ScalarHeadModel(base).save_pretrained(out, tok)
    return out


CASES = [(command, kind) for command in commands("tiny") for kind in commands("tiny")[command][1]]


@pytest.mark.parametrize("command,kind", CASES, ids=[f"{c}-{k}".replace(" ", "_") for c, k in CASES])
def test_bad_input_is_named_and_nothing_half_written(command, kind, tmp_path, tiny_model_dir, reward_dir,
                                                     monkeypatch):
    import uvicorn

    # Test double for the server of `label serve`: it returns at once, as if stopped, so the command
    # ends; it may be reached only with the good lines of a salvaged file.
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(True))
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # configs/ are relative to the repository
    suffix, inputs, args = commands(str(tiny_model_dir), str(reward_dir))[command]
    path = write(tmp_path / f"input{suffix}", inputs[kind])
    take_skipped()
    result = runner.invoke(app, args(path, tmp_path))
    error = result.exception
    message = str(error) if isinstance(error, AlignkitError) else result.output
    assert error is None or isinstance(error, (AlignkitError, SystemExit)), (
        f"{type(error).__name__} escaped instead of a message: {error!r}"[:2000])
    assert result.exit_code != 0, result.output[-2000:]
    whole_file = (kind == "empty" or (kind == "wrong_type" and suffix != ".jsonl")
                  or (kind == "binary" and suffix in (".csv", ".txt")))
    assert names_file_and_line(message, path, whole_file), message[:2000]
    assert len(message) < 20_000  # a huge line is named, not echoed
    outputs = [p for p in tmp_path.rglob("*") if p.name.startswith(("out", ".out")) and p.is_file()]
    assert not served or result.exit_code == 3
    if result.exit_code == 3:  # salvaged: what was usable was used, the output is complete, the rest named
        assert kind == "truncated" or command.startswith("rag"), kind
        assert "skipped" in result.output
    else:
        assert outputs == [], outputs


@pytest.mark.parametrize("recipe,good", [("sft", GOOD["sft"]), ("reward", GOOD["pairs"])])
def test_training_on_a_damaged_file_names_the_bad_line_first_and_ends_with_exit_3(recipe, good, tmp_path,
                                                                                   tiny_model_dir, monkeypatch):
    """One bad line among good ones: it is named before training starts, the run trains on the rest
    and completes, and the last line says that the exit code 3 is about the skipped input."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(good) + "\n" + '{"prompt": "cut' + "\n" + json.dumps(good).replace("Hi", "Hey") + "\n")
    take_skipped()
    result = runner.invoke(app, ["train", recipe, "--config", f"configs/{recipe}.yaml", f"model={tiny_model_dir}",
                                 f"data.train={data}", "data.eval=null", "max_steps=1", "micro_batch_size=1",
                                 "grad_accum=1", f"output_dir={tmp_path / 'runs'}", "run_name=salvaged"])
    assert result.exit_code == 3, result.output[-2000:]
    err = result.stderr  # warnings and the training progress bar share stderr, in the order printed
    assert err.index(f"warning: {data}:2: invalid JSON") < err.index(f"{recipe}:")
    last = err.strip().splitlines()[-1]
    assert last.startswith("warning: finished with what was usable") and f"({data}:2;" in last, last
    assert (tmp_path / "runs" / "salvaged" / "final").is_dir()
