"""Distillation recipe: a student built from teacher layers, hidden-state pairing, resume equals an
uninterrupted run, teacher-generated completions, config errors, CLI."""

import json
import shutil

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignkit.compress.cli import compress_app
from alignkit.compress.distill import DistillConfig, build_student, hidden_pairs, main
from alignkit.config import load_config
from alignkit.errors import AlignkitError, ConfigError
from alignkit.models import generate, load_model

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(compress_app, name="compress")
HELDOUT = "src/alignkit/data/heldout"


@pytest.fixture(scope="module")
def teacher_dir(make_tiny_model, tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("teacher") / "t4", seed=1, layers=4)


@pytest.fixture(scope="module")
def narrow_student_dir(teacher_dir, tmp_path_factory):
    """A separate student of width 16 (the teacher's is 32) sharing the teacher's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(teacher_dir)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 16, 32, 1
    config.head_dim = 4
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("student") / "s"
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(out)
    return out


def config(tmp_path, teacher_dir, **over):
    from alignkit.config import _set_dotted

    raw = {"model": str(teacher_dir), "output_dir": str(tmp_path / "runs"), "max_steps": 6, "save_every": 3,
           "keep_checkpoints": 3, "micro_batch_size": 2, "learning_rate": 1e-3, "device": "cpu",
           "data": {"train": f"{HELDOUT}/calib.txt", "eval": f"{HELDOUT}/eval.txt", "max_length": 48}}
    for key, value in over.items():
        _set_dotted(raw, key.replace("__", "."), value)
    return load_config(DistillConfig, base=raw)


def test_built_student_copies_teacher_layers_and_narrows_the_mlp(teacher_dir, tmp_path):
    teacher, tok = load_model(str(teacher_dir), device="cpu")
    scores = [torch.arange(64.0) for _ in range(4)]  # channel j scores j: the top 40 are 24..63
    student = build_student(teacher, [0, 3], 40, scores)
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 40
    assert teacher.config.num_hidden_layers == 4  # the teacher is untouched
    for i, t in enumerate([0, 3]):
        s_layer, t_layer = student.model.layers[i], teacher.model.layers[t]
        assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight)
        assert torch.equal(s_layer.mlp.up_proj.weight, t_layer.mlp.up_proj.weight[24:])
        assert torch.equal(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[:, 24:])
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    # Decoding with the KV cache needs each kept layer to know its new position.
    assert generate(student, tok, ["Where is my order?"], max_new_tokens=4).texts
    student.save_pretrained(tmp_path / "s")
    tok.save_pretrained(tmp_path / "s")
    loaded, _ = load_model(str(tmp_path / "s"), device="cpu")
    ids = tok(["Returns are free."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    with pytest.raises(AlignkitError, match="distinct teacher layer indices in 0..3"):
        build_student(teacher, [0, 4])


def test_hidden_pairs():
    """Built from layers [0, 2]: student block 1 <- teacher block 1, student 2 <- teacher 3.
    A separate 2-block student of a 6-block teacher: block i <- round(3 i): 1 <- 3, 2 <- 6."""
    assert hidden_pairs(2, 4, [0, 2]) == [(1, 1), (2, 3)]
    assert hidden_pairs(2, 6, None) == [(1, 3), (2, 6)]


def test_resume_equals_uninterrupted_run_with_projected_hidden_states(tmp_path, teacher_dir, narrow_student_dir):
    """A separate, narrower student with hidden-state matching (so a trainable projection is checkpointed
    too): losing the last 3 of 6 steps and resuming from step 3 gives the same losses and weights."""
    cfg = config(tmp_path, teacher_dir, run_name="full", student__model=str(narrow_student_dir), hidden_weight=0.5)
    full = main(cfg)
    records = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 6 and all(r["hidden"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    ckpt = load_file(full / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert "proj.weight" in ckpt and ckpt["proj.weight"].shape == (32, 16)

    cut = tmp_path / "runs" / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoints" / "step-000006")
    shutil.rmtree(cut / "final")
    main(cfg, resume=cut)
    assert (cut / "metrics.jsonl").read_text() .count('"loss"') == 6
    strip = lambda path: [{k: v for k, v in json.loads(l).items() if k != "elapsed_s"}
                          for l in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(cut) == strip(full)
    a, b = load_file(full / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_distils_teacher_completions_into_a_built_student(tmp_path, teacher_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Where is my order?\nCan I return shoes?\nDo you ship abroad?\nHow long do refunds take?\n")
    yaml_cfg = tmp_path / "d.yaml"
    yaml_cfg.write_text(f"model: {teacher_dir}\noutput_dir: {tmp_path / 'runs'}\nrun_name: tc\n"
                        f"data:\n  train: {prompts}\n  teacher_completions: true\n  max_new_tokens: 8\n"
                        "student:\n  intermediate_size: 32\nmax_steps: 2\nmicro_batch_size: 2\ndevice: cpu\n")
    result = runner.invoke(cli, ["compress", "distill", "--config", str(yaml_cfg)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "tc"
    completions = [json.loads(l) for l in (run / "teacher_completions.jsonl").read_text().splitlines()]
    assert [c["prompt"] for c in completions] == prompts.read_text().splitlines()
    student, _ = load_model(str(run / "final"), device="cpu")
    assert student.config.num_hidden_layers == 2 and student.config.intermediate_size == 32
    assert json.loads((run / "final" / "alignkit.json").read_text())["teacher_layers"] == [0, 2]
    assert "layers [0, 2], MLP 32" in result.output


def test_config_errors_and_help(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="temperature: Input should be greater than 0"):
        config(tmp_path, teacher_dir, temperature=0)
    with pytest.raises(ConfigError, match="student.width: unknown key"):
        config(tmp_path, teacher_dir, student__width=3)
    result = runner.invoke(cli, ["compress", "distill", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for key in ("alpha", "temperature", "hidden_weight", "student.layers", "student.intermediate_size",
                "data.teacher_completions"):
        assert key in result.output
