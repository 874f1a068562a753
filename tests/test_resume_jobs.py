"""Long data jobs killed with SIGKILL in the middle of writing a batch, then run again, end with the
file an uninterrupted run writes, byte for byte: `prefs judge`, `cai redteam`, `cai revise` and `eval`
(`prefs sample` has its own test in test_cli_prefs.py).

The kill is real (the job's process gets SIGKILL and dies without running any handler); only its
moment is chosen by the test: a small driver (KILLER below, test code) runs the `alignkit` command
line in a subprocess and, at the N-th batch the job appends, writes that batch with its last line
torn in half and then SIGKILLs its own process. The output then ends with a batch that was written
but never recorded as done, cut in the middle of a line: the rerun must drop it and do it again.
The uninterrupted run and the rerun go through typer's CliRunner in this process (a subprocess pays
~7 s of imports). One more test kills a plain `eval` from outside, at whatever point it has reached
once 16 completions are recorded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignkit.cli import app

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"

# Test driver: the alignkit CLI with ResumableJsonl.append wrapped so that append number KILL_AT
# writes its records with the last line cut in half and the process then dies by SIGKILL.
KILLER = r"""
import json, os, signal, sys
from alignkit.io import ResumableJsonl

kill_at, calls, original = int(os.environ["KILL_AT"]), [0], ResumableJsonl.append

def append(self, records, done):
    calls[0] += 1
    if calls[0] == kill_at:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        last = len(json.dumps(records[-1], ensure_ascii=False).encode("utf-8")) + 1
        with open(self.path, "ab") as f:
            f.write(data[:len(data) - last // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, records, done)

ResumableJsonl.append = append
from alignkit.cli import app
app(sys.argv[1:], prog_name="alignkit")
"""


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a job's subprocess: this source tree, and the same thread count as this
    process, so the two processes compute the same floats."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])), **extra}


def kill_mid_batch(args: list[str], kill_at: int) -> subprocess.CompletedProcess:
    """Run `alignkit ARGS` in a subprocess that SIGKILLs itself while writing batch `kill_at`."""
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=child_env(KILL_AT=str(kill_at)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # killed mid-run, not finished or failed
    return proc


def check_killed_then_resumed(args, output: Path, full: Path, kill_at: int, continued=("resuming",)) -> dict:
    """Kill the job while it writes batch `kill_at`, check what the kill left, rerun it (its output
    must show each of `continued`: it went on from where it was killed), and compare the output with the
    uninterrupted run's. Returns figures for the record: sizes and what was redone."""
    kill_mid_batch(args, kill_at)
    progress = json.loads(output.with_name(f".{output.name}.progress.json").read_text())
    left = output.read_bytes()
    assert not progress["complete"] and progress["done"] > 0, progress
    assert len(left) > progress["bytes"] and not left.endswith(b"\n")  # a torn, unrecorded batch after the kept ones
    assert full.read_bytes().startswith(left[:progress["bytes"]])  # what was recorded is what a full run writes
    lines_redone = left[progress["bytes"]:].count(b"\n") + 1
    resumed = runner.invoke(app, args)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    for says in continued:  # it went on from where it was, it did not start over
        assert says in resumed.output, (says, resumed.output[-3000:])
    assert output.read_bytes() == full.read_bytes()
    return {"bytes_kept": progress["bytes"], "bytes_after_kill": len(left), "units_done": progress["done"],
            "lines_redone": lines_redone, "final_bytes": len(full.read_bytes())}


def run_full(args) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]


def test_prefs_judge_killed_mid_chunk_resumes_to_the_uninterrupted_file(tmp_path):
    """40 candidate records judged in chunks of 16 (pairs, with the third chunk repeating the first's
    prompts, so pairs already written must count as seen after the restart); killed while writing the
    second chunk."""
    words = ["great", "awful", "fine", "terrible", "lovely", "bad", "nice", "horrible"]
    candidates = tmp_path / "cands.jsonl"
    completions = [[f"It was {words[i % 8]}.", f"It was {words[(i + 3) % 8]}, thanks.", "It was."] for i in range(32)]
    completions += [c[::-1] for c in completions[:8]]  # the same pairs again, in another order
    candidates.write_text("".join(json.dumps({"prompt": f"How was order {i % 32}?", "completions": c, "ranks": []})
                                  + "\n" for i, c in enumerate(completions)))
    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: positive, judge: sentiment, weight: 1.0}\n")
    args = lambda out: ["prefs", "judge", "--candidates", str(candidates), "--judge", str(judge), "--out", str(out),
                        "--format", "pairs"]
    run_full(args(tmp_path / "full.jsonl"))
    figures = check_killed_then_resumed(args(tmp_path / "killed.jsonl"), tmp_path / "killed.jsonl",
                                        tmp_path / "full.jsonl", kill_at=2, continued=["resuming", "16 of 40 record(s) already judged",
                                                                    "judging:  40%|████      | 48/120"])
    assert figures["units_done"] == 16  # records judged before the killed chunk
    print("prefs judge", figures)


@pytest.fixture()
def model_args(tiny_model_dir):
    return ["--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "6", "--batch-size", "2"]


def test_cai_redteam_killed_mid_batch_resumes_to_the_uninterrupted_file(tmp_path, model_args):
    """6 seeds plus sampled rephrasings, sampled responses, batches of 2; killed writing batch 3."""
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"prompt": f"Say something rude about person {i}.", "category": "insults"})
                             + "\n" for i in range(6)))
    args = lambda out: ["cai", "redteam", "--seeds", str(seeds), "--out", str(out), "--variations", "1",
                        "--temperature", "1.0", *model_args]
    run_full(args(tmp_path / "full.jsonl"))
    figures = check_killed_then_resumed(args(tmp_path / "killed.jsonl"), tmp_path / "killed.jsonl",
                                        tmp_path / "full.jsonl", kill_at=3)
    assert figures["units_done"] == 4
    print("cai redteam", figures)


def test_cai_revise_killed_mid_batch_resumes_to_the_uninterrupted_files(tmp_path, model_args):
    """6 prompts, two sampled critique-revision rounds, batches of 2; killed writing batch 2. The SFT
    file derived from the trace must match too."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me how to annoy neighbour {i}."}) + "\n" for i in range(6)))
    args = lambda out: ["cai", "revise", "-i", str(prompts), "--out-dir", str(out), "--rounds", "2",
                        "--temperature", "1.0", *model_args]
    run_full(args(tmp_path / "full"))
    figures = check_killed_then_resumed(args(tmp_path / "killed"), tmp_path / "killed" / "trace.jsonl",
                                        tmp_path / "full" / "trace.jsonl", kill_at=2)
    assert (tmp_path / "killed" / "sft.jsonl").read_bytes() == (tmp_path / "full" / "sft.jsonl").read_bytes()
    assert figures["units_done"] == 2
    print("cai revise", figures)


def test_eval_killed_mid_batch_resumes_to_the_uninterrupted_completions_and_metrics(tmp_path, tiny_model_dir):
    """Two models on 20 prompts, batches of 8 (3 per model); killed writing the second model's second
    batch. The completions file and the report's metrics match the uninterrupted run's."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Where is my order number {i}?\n" for i in range(20)))
    args = lambda out: ["eval", "--models", f"a={tiny_model_dir},b={tiny_model_dir}", "--prompts", str(prompts),
                        "--max-new-tokens", "6", "--batch-size", "8", "--device", "cpu", "--samples", "2", "--out", str(out)]
    run_full(args(tmp_path / "full"))
    figures = check_killed_then_resumed(args(tmp_path / "killed"), tmp_path / "killed.completions.jsonl",
                                        tmp_path / "full.completions.jsonl", kill_at=5,
                                        continued=["eval a: 100%|██████████| 3/3 [00:00<?",  # all cached
                                                   "eval b:  33%|███▎      | 1/3 [00:00<?"])
    assert figures["units_done"] == 28  # the first model's 20 completions and one batch of the second's
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("full", "killed")]
    assert metrics[0] == metrics[1]
    print("eval", figures)


def test_eval_killed_from_outside_at_an_unplanned_moment_resumes_to_the_uninterrupted_file(tmp_path,
                                                                                           tiny_model_dir):
    """No hook this time: the test SIGKILLs a plain `alignkit eval` as soon as its progress file
    records 16 completions, wherever the job then is (mostly inside a generation), and the rerun
    ends with the uninterrupted run's completions."""
    import time

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Can I return item {i} after a month?\n" for i in range(40)))
    args = lambda out: ["eval", "--models", f"a={tiny_model_dir}", "--prompts", str(prompts), "--max-new-tokens", "8",
                        "--batch-size", "8", "--device", "cpu", "--samples", "2", "--out", str(out)]
    run_full(args(tmp_path / "full"))
    proc = subprocess.Popen([sys.executable, "-m", "alignkit.cli", *args(tmp_path / "killed")], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / ".killed.completions.jsonl.progress.json"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text() or "{}").get("done", 0) >= 16:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    state = json.loads(progress.read_text())
    assert not state["complete"] and 16 <= state["done"] < 40, state
    killed = tmp_path / "killed.completions.jsonl"
    print("eval (outside kill)", {"units_done": state["done"], "bytes_kept": state["bytes"],
                                  "bytes_after_kill": killed.stat().st_size})
    resumed = runner.invoke(app, args(tmp_path / "killed"))
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert killed.read_bytes() == (tmp_path / "full.completions.jsonl").read_bytes()
