"""The ShopBot out of the box: the adapter shipped with the package, how the demo picks its model, shipping a
trained adapter, evaluating with and without prefix reuse, and what `agent run` says about the ShopBot's tools.

The end-to-end test runs the embedded model with the shipped adapter on the real services; the others use
the tiny model or no model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # the example is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from alignkit.apps.agents.backends import LocalBackend  # noqa: E402
from alignkit.apps.agents.trace import read_trace  # noqa: E402
from alignkit.errors import AlignkitError  # noqa: E402
from examples.shopbot import app  # noqa: E402
from examples.shopbot.app import SHIPPED_ADAPTER, CustomerRequest, ShopServices, answer, outcome  # noqa: E402
from examples.shopbot.db import load_seed  # noqa: E402
from examples.shopbot.evaluate import compare_modes  # noqa: E402
from examples.shopbot.ship_adapter import ship  # noqa: E402

SEED = load_seed()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with ShopServices.start(tmp_path_factory.mktemp("shop"), SEED) as running:
        yield running


def test_the_adapter_ships_with_the_package_small_and_with_its_training_record():
    files = {f.name: f for f in SHIPPED_ADAPTER.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "alignkit.json", "train_config.yaml",
            "train_metrics.jsonl"} <= set(files)
    assert sum(f.stat().st_size for f in files.values()) < 8e6  # a few MB: LoRA r=8 in float16
    config = json.loads(files["adapter_config.json"].read_text())
    assert config["base_model_name_or_path"] == "embedded" and config["r"] == 8
    assert json.loads(files["alignkit.json"].read_text())["base_model"] == "embedded"
    losses = [json.loads(line)["loss"] for line in files["train_metrics.jsonl"].read_text().splitlines()]
    assert len(losses) >= 20 and max(losses[-5:]) < losses[0] / 10  # it was trained, and it learned


def test_the_demo_prefers_a_fresh_training_run_then_the_shipped_adapter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    model, why = app.choose_model()
    assert model == str(SHIPPED_ADAPTER) and "shipped" in why
    assert app.choose_model("embedded")[0] == "embedded"
    trained = tmp_path / "runs" / "shopbot" / "final"
    trained.mkdir(parents=True)
    (trained / "adapter_config.json").write_text("{}")
    model, why = app.choose_model()
    assert model == "runs/shopbot/final" and "make shopbot-train" in why
    monkeypatch.setattr(app, "SHIPPED_ADAPTER", tmp_path / "nowhere")
    (trained / "adapter_config.json").unlink()
    model, why = app.choose_model()
    assert model == "embedded" and "does not follow the ReAct format" in why


def test_ship_writes_float16_weights_and_names_the_base_model_not_a_path(tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    weights = {"a.lora_A.weight": torch.randn(8, 16), "a.lora_B.weight": torch.randn(16, 8) * 1e-3}
    save_file(weights, run / "final" / "adapter_model.safetensors")
    (run / "final" / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "/x/cache/m"}))
    (run / "final" / "alignkit.json").write_text(json.dumps({"kind": "adapter", "base_model": "embedded"}))
    with pytest.raises(AlignkitError, match="config.yaml"):
        ship(run, tmp_path / "out")
    (run / "config.yaml").write_text("max_steps: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.5}\n')
    change = ship(run, tmp_path / "out")
    shipped = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float16 for t in shipped.values())
    for name, t in weights.items():
        torch.testing.assert_close(shipped[name].float(), t, atol=change, rtol=0)
    assert 0 < change < 1e-2
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"
    assert (tmp_path / "out" / "train_metrics.jsonl").read_text() == '{"step": 1, "loss": 1.5}\n'


@pytest.mark.parametrize("what,modes", [("prefix_reuse", ("reuse", "no_reuse")),
                                        ("drafting", ("drafting", "no_drafting"))])
def test_compare_modes_answers_every_request_in_both_modes_alike(tiny, services, what, modes):
    model, tokenizer = tiny
    backend = LocalBackend.from_loaded(model, tokenizer, name="tiny")
    requests = [CustomerRequest(33, "Could you help me send the umbrella back?", expected_order=1080),
                CustomerRequest(None, "Good morning! I need to return the blender from my order.")]
    results = compare_modes(backend, what, requests, services, SEED)
    assert set(results) == set(modes)
    on, off = results[modes[0]]["runs"], results[modes[1]]["runs"]
    assert [r["request"] for r in on] == [r["request"] for r in off] == [q.question() for q in requests]
    # Greedy decoding from the same weights: the same replies whether the prefix came from the cache or
    # not, and whether tokens were drafted or not.
    assert [(r["turns"], r["answer"], r["prompt_tokens"]) for r in on] == \
        [(r["turns"], r["answer"], r["prompt_tokens"]) for r in off]


def test_agent_run_says_exactly_why_the_shopbot_tools_cannot_run_there():
    from alignkit.apps.agents.agent_cli import load_tools

    with pytest.raises(AlignkitError) as error:
        load_tools(str(ROOT / "examples" / "shopbot" / "tools.py"))
    message = str(error.value)
    assert "cannot run under `alignkit agent run`" in message
    assert "signed-in customer" in message and "must be running" in message
    assert "python -m examples.shopbot.run_demo --customer" in message and "make shopbot-demo" in message


def test_the_shipped_adapter_handles_a_held_out_return_end_to_end(services, tmp_path):
    """The embedded model with the shipped adapter, on the real services, under the ReAct grammar: a
    held-out customer (33) in a held-out phrasing gets the label of the right order mailed to the
    address on file, and the trace is well formed."""
    backend = LocalBackend(str(SHIPPED_ADAPTER), device="cpu")
    request = CustomerRequest(33, "Could you help me send the umbrella back?", expected_order=1080)
    before = len(services.mail.messages)
    trace_file = tmp_path / "run.jsonl"
    result = answer(backend, services, request, trace_path=trace_file)
    judged = outcome(request, result, services.mail.messages[before:], SEED)
    assert judged.success, judged.why
    records = read_trace(trace_file)
    assert records[0]["event"] == "start" and records[-1]["event"] == "end"
    steps = [r for r in records if r["event"] == "step"]
    assert len(steps) == len(result.steps) and all(r["protocol"] == "grammar" for r in steps)
    assert backend.reused_tokens > 0  # later steps read the earlier ones from the cache
