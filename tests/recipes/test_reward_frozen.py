"""Frozen-backbone reward model (`frozen:` in the reward config): pooled features, a fitted linear head,
held-out accuracy, and the saved model scoring the same when loaded back through every reward path."""

import json

import pytest
import torch

from alignkit.config import RewardConfig
from alignkit.errors import AlignkitError
from alignkit.evaluate.rewards import load_reward
from alignkit.models import load_model
from alignkit.models.pooled_head import PooledHeadModel, truncate
from alignkit.recipes import reward, reward_frozen


FROZEN = {"lora": {"enabled": False}, "frozen": {"layer": 2}}  # the keys of a frozen-backbone run


def test_frozen_head_learns_a_held_out_preference_and_loads_back(tiny_model_dir, pair_files, reward_config):
    run_dir = reward.main(reward_config(FROZEN, run_name="rm"))
    (record,) = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["eval_accuracy"] >= 0.9, record
    assert record["accuracy"] >= record["eval_accuracy"] - 0.1
    meta = json.loads((run_dir / "final" / "alignkit.json").read_text())
    assert meta["kind"] == "pooled_head" and meta["layer"] == 2 and meta["base_model"] == str(tiny_model_dir)
    assert not list((run_dir / "final").glob("model*.safetensors"))  # no backbone weights copied
    # loaded back as a training reward (PPO, GRPO, eval), it ranks the held-out pairs as recorded
    score, name = load_reward(run_dir, "cpu")
    held = [json.loads(l) for l in pair_files[1].read_text().splitlines()]
    c = score([p["prompt"] for p in held], [p["chosen"] for p in held])
    r = score([p["prompt"] for p in held], [p["rejected"] for p in held])
    assert sum(a > b for a, b in zip(c, r)) / len(held) == pytest.approx(record["eval_accuracy"])
    assert "reward model" in name


def test_pooled_features_are_the_mean_of_the_replys_hidden_states(tiny_model_dir):
    model, tok = PooledHeadModel.from_base(str(tiny_model_dir), layer=1, device="cpu")
    prompts = ["Where is my order?", "Where is my order?", "Can I return shoes?"]
    replies = ["It ships tomorrow.", "Soon, I promise.", "Yes."]
    feats = model.features(tok, prompts, replies)
    # by hand: a plain forward pass of layer 1 of the untruncated model, averaged over the reply + EOS
    from alignkit.data.prefs import encode_split

    full, _ = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    for i, (p, c) in enumerate(zip(prompts, replies)):
        ids, n_prompt = encode_split(tok, p, c, 512)
        with torch.no_grad():
            hs = full.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0]
        torch.testing.assert_close(feats[i], hs[n_prompt:].mean(dim=0), atol=1e-5, rtol=1e-4)


def test_fit_head_folds_the_standardisation_and_centres_the_rewards():
    torch.manual_seed(0)
    good, bad = torch.randn(40, 3) + torch.tensor([2.0, 0, 0]), torch.randn(40, 3)
    pairs = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 40
    cfg = RewardConfig.model_validate({"model": "m", "data": {"train": "t.jsonl"}, "lora": {"enabled": False},
                                       "frozen": {"weight_decay": 0.01}})
    texts = torch.cat([good, bad])
    w, b = reward_frozen.fit_head(good, bad, pairs, cfg, texts)
    assert w[0] > 0 and w[0].abs() > 3 * w[1:].abs().max()  # the informative feature carries the weight
    assert (texts @ w + b).mean().item() == pytest.approx(0.0, abs=1e-4)
    assert ((good @ w) > (bad @ w)).float().mean() >= 0.75  # 0.92 expected: the shift is 2, the pair noise sd 1.4


def test_frozen_with_lora_enabled_is_refused(reward_config):
    with pytest.raises(AlignkitError, match="set lora.enabled: false"):
        reward.main(reward_config(FROZEN, run_name="bad", lora={"enabled": True}))


def test_truncate_refuses_a_layer_the_model_does_not_have(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(ValueError, match="decoder layers"):
        truncate(model, 99)


def test_plain_path_when_rows_share_nothing(tiny_model_dir):
    """One reply per prompt: no shared prefix, the plain pass gives the same features as one at a time."""
    model, tok = PooledHeadModel.from_base(str(tiny_model_dir), layer=2, device="cpu")
    prompts, replies = ["Hi", "Where is my order?"], ["Hello!", "It ships tomorrow."]
    together = model.features(tok, prompts, replies)
    alone = torch.cat([model.features(tok, [p], [c]) for p, c in zip(prompts, replies)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
