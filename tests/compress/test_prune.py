"""Pruning: masks by hand, exact sparsity, Wanda's activation norms, masked recovery, structured
pruning's smaller matrices, save/load round trips, CLI."""

import copy
import json

import pytest
import torch
import typer
from torch import nn
from typer.testing import CliRunner

from alignkit.compress.cli import compress_app
from alignkit.compress.prune import (CALIB_TEXT, PruneError, input_norms, lowest_mask, magnitude_masks,
                                     mlp_channel_scores, prune_model, recover, save_pruned, sparsity_of,
                                     wanda_masks)
from alignkit.compress.quantize import load_calibration_texts, quantizable_linears
from alignkit.models import load_model

runner = CliRunner()
cli = typer.Typer()
cli.add_typer(compress_app, name="compress")


@pytest.fixture(scope="module")
def texts():
    return load_calibration_texts(CALIB_TEXT, 8)


def logits(model, tok, text="Where is my parcel? It has not arrived."):
    with torch.no_grad():
        return model(tok([text], return_tensors="pt")["input_ids"]).logits


def test_lowest_mask_by_hand():
    """Scores [[3, 1, 2], [0.5, 5, 1]]. Over all entries, the 2 lowest are 0.5 at (1,0) and the first 1
    at (0,1) (ties go to the lower index, so (1,2) stays). Per row, 1 each: (0,1) and (1,0); 2 each:
    row 0 loses 1 and 2, row 1 loses 0.5 and 1."""
    s = torch.tensor([[3.0, 1.0, 2.0], [0.5, 5.0, 1.0]])
    assert lowest_mask(s, 2).tolist() == [[1, 0, 1], [0, 1, 1]]
    assert lowest_mask(s, 1, dim=1).tolist() == [[1, 0, 1], [0, 1, 1]]
    assert lowest_mask(s, 2, dim=1).tolist() == [[1, 0, 0], [0, 1, 0]]


def test_wanda_differs_from_magnitude_by_hand():
    """W = [[1, -0.8], [3, 0.5]], input norms ||X_j|| = [sqrt 2, 2].
    Wanda scores |W| * ||X||: row 0 [1.414, 1.6] -> zero column 0; row 1 [4.243, 1.0] -> zero column 1.
    Magnitude at 50% of the layer zeroes the two smallest |W|: 0.5 at (1,1) and 0.8 at (0,1)."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -0.8], [3.0, 0.5]]))
    norms = {"l": torch.tensor([2 ** 0.5, 2.0])}
    assert wanda_masks({"l": lin}, norms, 0.5)["l"].tolist() == [[0, 1], [1, 0]]
    assert magnitude_masks({"l": lin}, 0.5)["l"].tolist() == [[1, 0], [1, 0]]


def test_input_norms_match_the_layer_input_computed_directly(tiny, texts):
    """q_proj of layer 0 sees input_layernorm(embeddings): its column norms over all tokens of all texts."""
    model, tok = tiny
    lin = {"q": model.model.layers[0].self_attn.q_proj}
    norms = input_norms(model, tok, texts[:3], lin)["q"]
    with torch.no_grad():
        xs = [model.model.layers[0].input_layernorm(model.model.embed_tokens(
            tok(t, return_tensors="pt", truncation=True, max_length=256)["input_ids"]))[0] for t in texts[:3]]
    want = torch.cat(xs).pow(2).sum(0).sqrt()
    assert torch.allclose(norms, want, rtol=1e-4)


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_sparsity_is_exact(tiny, texts, sparsity):
    """Per layer: round(s * numel) zeros in every layer; global: round(s * total) zeros overall, unevenly
    spread; wanda: round(s * in_features) zeros in every output row."""
    model, tok = tiny
    for method, scope in (("magnitude", "layer"), ("magnitude", "global"), ("wanda", "layer")):
        pruned, masks, _ = prune_model(model, tok, method, sparsity, scope=scope, texts=texts)
        layers = quantizable_linears(pruned)
        zeros = {n: int((m.weight == 0).sum()) for n, m in layers.items()}
        if scope == "global":
            total = sum(m.weight.numel() for m in layers.values())
            assert sum(zeros.values()) == round(sparsity * total)
            assert len({round(zeros[n] / layers[n].weight.numel(), 3) for n in layers}) > 1
        elif method == "magnitude":
            assert all(zeros[n] == round(sparsity * m.weight.numel()) for n, m in layers.items())
        else:
            for m in layers.values():
                assert ((m.weight == 0).sum(1) == round(sparsity * m.in_features)).all()
        assert all(torch.equal(masks[n] == 0, layers[n].weight == 0) for n in layers)
    assert sparsity_of(quantizable_linears(model)) == 0  # the fixture's model is untouched


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_recovery_keeps_the_mask_and_changes_the_rest(tiny, texts, mode):
    model, tok = tiny
    pruned, masks, _ = prune_model(model, tok, "wanda", 0.5, texts=texts)
    before = {n: m.weight.detach().clone() for n, m in quantizable_linears(pruned).items()}
    recovered, losses = recover(copy.deepcopy(pruned), tok, masks, texts, mode=mode, steps=3,
                                learning_rate=1e-2, progress=False)
    assert len(losses) == 3 and not hasattr(recovered, "peft_config")
    after = quantizable_linears(recovered)
    for name, mask in masks.items():
        w = after[name].weight
        assert torch.equal(w == 0, mask == 0), name  # exactly the pruned weights are zero
        assert not torch.equal(w, before[name]), name  # and the kept ones moved
    assert sparsity_of(after) == 0.5


def test_merging_lora_without_masking_again_would_densify(tiny, texts):
    """The reason recovery masks after merging: B A is dense, so a plain merge fills the zeros."""
    from alignkit.models import attach_lora, merge_lora

    model, tok = tiny
    pruned, masks, _ = prune_model(model, tok, "magnitude", 0.5)
    peft = attach_lora(pruned, r=2, alpha=4, dropout=0.0, target_modules=["q_proj"])
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p)
    merged = merge_lora(peft)
    assert (merged.model.layers[0].self_attn.q_proj.weight == 0).sum() == 0


def test_structured_gives_smaller_matrices_and_same_outputs_as_zeroing(tiny, texts, tmp_path):
    """Dropping MLP channels equals zeroing their gate/up rows and down columns in the full model."""
    model, tok = tiny
    pruned, masks, info = prune_model(model, tok, "structured", 0.5, texts=texts)
    assert masks == {} and info["intermediate_size_after"] == 32 and pruned.config.intermediate_size == 32
    for layer in pruned.model.layers:
        mlp = layer.mlp
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (32, 32)
        assert mlp.down_proj.weight.shape == (32, 32)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())

    zeroed = copy.deepcopy(model)
    for layer, scores in zip(zeroed.model.layers, mlp_channel_scores(model, tok, texts)):
        drop = torch.ones(64, dtype=torch.bool)
        drop[scores.topk(32).indices] = False
        with torch.no_grad():
            layer.mlp.gate_proj.weight[drop] = 0
            layer.mlp.up_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[:, drop] = 0
    assert torch.allclose(logits(pruned, tok), logits(zeroed, tok), atol=1e-5)
    assert not torch.allclose(logits(pruned, tok), logits(model, tok), atol=1e-3)

    out = save_pruned(pruned, tok, tmp_path / "s", info)
    loaded, _ = load_model(str(out), device="cpu")
    assert loaded.config.intermediate_size == 32
    assert torch.equal(logits(loaded, tok), logits(pruned, tok))


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_save_load_round_trip(tiny, texts, tmp_path, method):
    model, tok = tiny
    pruned, _, info = prune_model(model, tok, method, 0.5, texts=texts)
    out = save_pruned(pruned, tok, tmp_path / method, info)
    loaded, _ = load_model(str(out), device="cpu")
    assert torch.equal(logits(loaded, tok), logits(pruned, tok))
    assert sparsity_of(quantizable_linears(loaded)) == 0.5
    saved = json.loads((out / "prune.json").read_text())
    assert saved["method"] == method and saved["measured_sparsity"] == 0.5


def test_cli_prunes_and_recovers(tiny_model_dir, tmp_path):
    out = tmp_path / "w"
    result = runner.invoke(cli, ["compress", "prune", "--model", str(tiny_model_dir), "--method", "wanda",
                                 "--sparsity", "0.5", "--recovery", "full", "--recovery-steps", "2",
                                 "--calib-samples", "6", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "prune.json").read_text())
    assert info["measured_sparsity"] == 0.5 and len(info["recovery_losses"]) == 2
    assert "measured sparsity of the linear layers 0.5000" in result.output
    assert json.loads((out / "alignkit.json").read_text())["pruning"] == "wanda"


def test_bad_input_gives_clear_errors(tiny_model_dir, tmp_path):
    result = runner.invoke(cli, ["compress", "prune", "--model", str(tiny_model_dir), "--method", "random",
                                 "--out", str(tmp_path / "x")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "must be one of magnitude, wanda, structured" in result.output
    result = runner.invoke(cli, ["compress", "prune", "--model", str(tiny_model_dir), "--method", "magnitude",
                                 "--sparsity", "1.5", "--out", str(tmp_path / "x")])
    assert isinstance(result.exception, PruneError) and "--sparsity must be in [0, 1), got 1.5" in str(result.exception)
    assert not (tmp_path / "x").exists()
    with pytest.raises(PruneError, match="wanda pruning needs calibration text"):
        prune_model(nn.Linear(2, 2), None, "wanda", 0.5)
