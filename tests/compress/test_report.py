"""The side-by-side report: quality metrics against independent computations, every column filled, the
speed/memory subprocess, reward and toxicity with a reward model, plot and errors."""

import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from alignkit.compress.cli import compress_app
from alignkit.compress.prune import prune_model, save_pruned
from alignkit.compress.quantize import quantize_model, save_quantized
from alignkit.compress.report import (EVAL_TEXT, count_parameters, measure_speed, quality, reference_logprobs,
                                      token_rows)
from alignkit.compress.quantize import load_calibration_texts
from alignkit.errors import AlignkitError

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(compress_app, name="compress")


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory):
    model, tok = tiny
    root = tmp_path_factory.mktemp("variants")
    q = save_quantized(quantize_model(model, "int8-weight", 16, "int8"), tok, root / "int8",
                       {"method": "int8-weight", "embedding": "int8"})
    pruned, _, info = prune_model(model, tok, "magnitude", 0.5)
    p = save_pruned(pruned, tok, root / "mag50", info)
    return q, p


def test_quality_against_the_transformers_loss(tiny):
    """Perplexity is exp of the token-weighted mean of transformers' own per-text loss; a model compared
    with itself agrees everywhere with zero KL; a perturbed copy does not."""
    import copy

    model, tok = tiny
    rows = token_rows(tok, load_calibration_texts(EVAL_TEXT, 4), 256)
    ref = reference_logprobs(model, rows)
    got = quality(model, rows, ref)
    with torch.no_grad():
        nll = sum(model(input_ids=r, labels=r).loss.item() * (r.shape[1] - 1) for r in rows)
    n = sum(r.shape[1] - 1 for r in rows)
    assert got["eval_tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["top1_agreement"] == 1.0 and got["kl_vs_baseline"] == pytest.approx(0.0, abs=1e-6)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        noisy.model.layers[0].mlp.down_proj.weight.add_(torch.randn_like(noisy.model.layers[0].mlp.down_proj.weight))
    other = quality(noisy, rows, ref)
    assert other["kl_vs_baseline"] > 0 and other["perplexity"] != got["perplexity"]


def test_count_parameters_sees_zeros_and_quantized_tensors(tiny):
    """The tiny model's only zeros are its padding token's embedding row (32 values); 50% magnitude
    pruning adds half of every linear layer's weights."""
    model, tok = tiny
    total, nonzero = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert not model.get_input_embeddings().weight[tok.pad_token_id].any() and nonzero == total - 32
    pruned, _, _ = prune_model(model, tok, "magnitude", 0.5)
    linear = sum(m.weight.numel() for n, m in pruned.named_modules() if n.endswith("proj"))
    assert count_parameters(pruned) == (total, nonzero - linear // 2)
    assert count_parameters(quantize_model(model, "int8-weight"))[0] == total


def test_cli_report_side_by_side(tiny_model_dir, variants, tmp_path):
    from alignkit.models import ScalarHeadModel, load_model

    lm, tok = load_model(str(tiny_model_dir), device="cpu")
    rm_dir = ScalarHeadModel(lm).save_pretrained(tmp_path / "rm", tok)
    out = tmp_path / "report"
    result = runner.invoke(cli, ["compress", "report", *map(str, variants), "--baseline", str(tiny_model_dir),
                                 "--reward", str(rm_dir), "--no-speed", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "metrics.json").read_text())
    base, int8, mag = rows
    assert [r["name"] for r in rows] == ["baseline (model)", "int8", "mag50"]
    assert base["perplexity_ratio"] == 1.0 and base["top1_agreement"] == 1.0 and base["kl_vs_baseline"] == 0
    assert int8["disk_bytes"] < 0.45 * base["disk_bytes"] and int8["kl_vs_baseline"] > 0
    assert mag["nonzero_parameters"] < mag["parameters"] == base["parameters"]
    assert all(0 <= r["toxicity"] <= 1 and isinstance(r["reward"], float) for r in rows)
    assert "| int8 |" in result.output and "not measured" in result.output
    assert (out / "size_vs_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_and_memory_in_a_fresh_process(variants):
    """One subprocess (it imports torch and loads the quantized model through load_model)."""
    got = measure_speed(str(variants[0]), threads=2, new_tokens=4)
    assert got["tokens_per_s_batch1"] > 0 and got["tokens_per_s_batch8"] > 0
    # torch and transformers alone take over 100 MB; a model this small adds little on top of them.
    assert got["peak_rss"] >= got["rss_after_imports"] > 100e6
    # The tiny int8 model's tensors (its int8 embedding dequantized to float at load) take under 100 kB.
    assert 20e3 < got["weight_bytes"] < 100e3 and got["load_rss_growth"] < 50e6


def test_report_errors(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(cli, ["compress", "report", str(tmp_path / "empty"), "--baseline", str(tiny_model_dir),
                                 "--out", str(tmp_path / "r")])
    assert isinstance(result.exception, AlignkitError) and "not a model directory (no config.json)" in str(result.exception)
    assert not (tmp_path / "r").exists()
