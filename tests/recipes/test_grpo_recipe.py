"""GRPO recipe: a run trains only the adapter (or every weight in full fine-tuning), logs its phases,
probe and monitors, refuses groups of one, learns a synthetic reward both ways, resumes after SIGKILL
exactly, and 2 processes equal 1 with the same global batch."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alignkit.config import GRPOConfig, load_config
from alignkit.errors import ConfigError
from alignkit.models import generate, load_model
from alignkit.recipes import grpo

PROMPTS = ("Where is my order?\nCan I return shoes?\nHow long does a refund take?\nHi\n"
           "Do you ship abroad?\nMy parcel is late\nCan I cancel?\nI was charged twice\n")
VOWEL_REWARD = '''def vowel_share(prompts, completions):
    return [sum(ch in "aeiou" for ch in c) / max(len(c), 1) for c in completions]


def reward(prompts, completions):
    return [SIGN * s for s in vowel_share(prompts, completions)]
'''


def reward_fn(tmp_path, sign=1):
    """A Python reward (the share of vowels in a completion, times sign): cheap and deterministic."""
    path = tmp_path / f"vowels{'_neg' if sign < 0 else ''}.py"
    path.write_text(VOWEL_REWARD.replace("SIGN", str(sign)))
    return f"{path}:reward"


def config(tmp_path, model_dir, name, **over):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    cfg = {"model": str(model_dir), "data": {"prompts": str(prompts)}, "reward": reward_fn(tmp_path),
           "output_dir": str(tmp_path / "runs"), "run_name": name, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
           "learning_rate": 1e-2, "lr_scheduler": "constant", "rollout_batch": 2, "group_size": 4,
           "max_new_tokens": 6, "max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "device": "cpu", "seed": 0}
    cfg.update(over)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(GRPOConfig, path)


def records_of(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strip(records):
    """Records without wall-clock figures (they differ between any two runs)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def test_grpo_run_logs_phases_and_trains_the_adapter_only(tmp_path, tiny_model_dir):
    run_dir = grpo.main(config(tmp_path, tiny_model_dir, "smoke", num_iterations=2, minibatch_size=4))
    records = records_of(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("score", "kl", "response_length", "distinct_2", "loss", "clipfrac", "flat_group_share",
                "sampler_logprob_gap", "time_generate_s", "time_score_s", "time_reference_s", "time_update_s",
                "time_old_logprobs_s", "time_checkpoint_s"):
        assert all(key in r for r in records), key
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # step 1 samples from the reference itself
    assert records[-1]["kl"] != 0.0
    assert records[2]["time_checkpoint_s"] > 0 and records[1]["time_checkpoint_s"] == 0  # saved after step 2
    assert all(abs(r["ratio"] - 1.0) > 1e-6 for r in records)  # later minibatches see an updated policy
    assert all(r["sampler_logprob_gap"] < 1e-3 for r in records)  # the sampler is the policy
    state = load_file(run_dir / "checkpoints" / "step-000004" / "trainable.safetensors")
    assert state and all("lora_" in k for k in state)
    policy, _ = load_model(str(run_dir / "final"), device="cpu")
    assert hasattr(policy, "peft_config")


def test_group_of_one_is_refused_with_a_clear_message(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="group_size 1: a group needs at least 2 completions"):
        config(tmp_path, tiny_model_dir, "one", group_size=1)


def test_bad_minibatch_is_refused(tmp_path, tiny_model_dir):
    from alignkit.errors import AlignkitError

    with pytest.raises(AlignkitError, match="minibatch_size 3 must divide"):
        grpo.main(config(tmp_path, tiny_model_dir, "mb", minibatch_size=3))


def test_all_equal_rewards_give_zero_loss_and_no_nan(tmp_path, tiny_model_dir):
    """A constant reward: every group is flat (share 1), advantages 0, so without KL the policy loss
    is exactly 0 and the adapter does not move."""
    const = tmp_path / "const.py"
    const.write_text("def reward(prompts, completions):\n    return [1.0 for _ in completions]\n")
    run_dir = grpo.main(config(tmp_path, tiny_model_dir, "flat", reward=f"{const}:reward", kl_coef=0.0,
                               max_steps=2, advantage="rloo"))
    records = records_of(run_dir)
    assert all(r["flat_group_share"] == 1.0 and r["loss"] == 0.0 and r["advantage_abs_mean"] == 0.0
               for r in records)
    a = load_file(run_dir / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert all(torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if "lora_B" in k)


def test_full_fine_tuning_against_a_frozen_copy(tmp_path, tiny_model_dir):
    """lora.enabled=false: every weight trains and the reference is a frozen copy of the start, so
    the KL of step 1 is 0 and later it is not."""
    run_dir = grpo.main(config(tmp_path, tiny_model_dir, "full-ft", lora={"enabled": False}, max_steps=2,
                               learning_rate=1e-3, save_every=10))
    records = records_of(run_dir)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5) and records[1]["kl"] != 0.0
    base, _ = load_model(str(tiny_model_dir), device="cpu")
    tuned, _ = load_model(str(run_dir / "final"), device="cpu")
    tuned_params = dict(tuned.named_parameters())
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, tuned_params[n])]
    assert len(changed) == len(tuned_params)  # every weight moved


def test_probe_and_monitors(tmp_path, tiny_model_dir):
    """probe.every 2 over 5 steps: probe records at steps 0 (before training), 2, 4 and 5 (the end),
    none elsewhere; the last one's probe_proxy and probe_gold equal scoring the final policy's greedy
    replies to the same prompts with the reward and the gold judge. The monitors run on GRPO's
    records (the independent judge each step, a KL warning that stops the run when asked)."""
    from alignkit.evaluate.judges import load_judge
    from alignkit.evaluate.rewards import load_reward

    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: tox, judge: toxicity, weight: -1.0}\n")
    probe_file = tmp_path / "heldout.txt"
    probe_file.write_text("Is this jacket warm?\nMy order never came\nCan I pay later?\n")
    cfg = config(tmp_path, tiny_model_dir, "probe", max_steps=5, save_every=10, max_new_tokens=8,
                 monitors={"judge": str(judge)},
                 probe={"prompts": str(probe_file), "every": 2, "n": 2, "max_new_tokens": 10})
    run_dir = grpo.main(cfg)
    records = records_of(run_dir)
    assert [r["step"] for r in records if "probe_proxy" in r] == [0, 2, 4, 5]
    assert records[0].keys() == {"step", "probe_proxy", "probe_gold"}
    assert all(-1.0 <= r["judge"] <= 0.0 for r in records[1:])
    policy, tok = load_model(str(run_dir / "final"), device="cpu")
    prompts = ["Is this jacket warm?", "My order never came"]
    texts = generate(policy, tok, prompts, max_new_tokens=10).texts
    score, _ = load_reward(cfg.reward, "cpu")
    assert records[-1]["probe_proxy"] == pytest.approx(sum(score(prompts, texts)) / 2, abs=1e-5)
    gold = load_judge(judge).score(prompts, texts)
    assert records[-1]["probe_gold"] == pytest.approx(sum(gold) / 2, abs=1e-5)

    stop = grpo.main(config(tmp_path, tiny_model_dir, "stop", monitors={"max_kl": 1e-9, "stop_on_warning": True},
                            kl_estimator="k3"))
    records = records_of(stop)
    assert "warnings" not in records[0] and records[-1]["warnings"][0].startswith("KL to the reference")
    assert len(records) < 4 and (stop / "final").is_dir()


@pytest.mark.parametrize("sign", [1, -1])
def test_grpo_moves_a_synthetic_reward_the_right_way(tmp_path, peaky_model_dir, sign):
    """Reward = the share of vowels in a completion, or minus that. Over 48 steps of 4 prompts x 8
    completions, the mean vowel share of the last 12 steps must beat the first 12 in the rewarded
    direction: a flipped advantage sign would make one of the two cases fail. Measured when written,
    seeds 0-3: +0.037 to +0.054 (sign +1), -0.004 to -0.022 (sign -1; the share has a floor near
    0.05); at 24 steps of 4 x 4 two of the eight runs went the wrong way."""
    cfg = config(tmp_path, peaky_model_dir, "synthetic", reward=reward_fn(tmp_path, sign), max_steps=48,
                 save_every=100, rollout_batch=4, group_size=8, max_new_tokens=12, learning_rate=1e-2,
                 kl_coef=0.02,
                 lora={"r": 8, "alpha": 16, "dropout": 0.0,
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    records = records_of(grpo.main(cfg))
    first = sum(sign * r["score"] for r in records[:12]) / 12  # the vowel share itself
    last = sum(sign * r["score"] for r in records[-12:]) / 12
    assert (last - first) * sign > 0.01, (first, last)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny_model_dir, kill_and_resume):
    """Kill a GRPO process (SIGKILL) once its step-2 checkpoint exists, resume it, and compare with a
    run never interrupted: the same metrics (probe and checkpoint selection included) and the same
    final adapter."""
    probe_file = tmp_path / "heldout.txt"
    probe_file.write_text("Is this jacket warm?\nMy order never came\n")
    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: tox, judge: toxicity, weight: -1.0}\n")
    over = dict(max_steps=5, save_every=2, num_iterations=2, minibatch_size=4, kl_target=1.0, kl_horizon=100,
                probe={"prompts": str(probe_file), "every": 3, "n": 2}, monitors={"judge": str(judge)},
                select={"prompts": str(probe_file), "every": 3, "n": 2})
    config(tmp_path, tiny_model_dir, "full", **over)
    config(tmp_path, tiny_model_dir, "killed", **over)
    full, killed = tmp_path / "runs" / "full", tmp_path / "runs" / "killed"
    kill_and_resume("grpo", tmp_path / "full.yaml", tmp_path / "killed.yaml", killed)
    assert strip(records_of(killed)) == strip(records_of(full)) and len(records_of(full)) == 6  # step 0 probe + 5
    assert records_of(full)[-1]["kl_coef"] != 0.04  # the adaptive controller moved, and resumed with its state
    a = load_file(full / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_equal_one(tmp_path, tiny_model_dir, launch_two):
    """The same global batch (2 prompts x 4 completions, minibatches of 4, 2 iterations) in 1 process
    and in 2 (gloo, each sampling and training half of every minibatch): the same metrics and the
    same final adapter, up to float summation order."""
    over = dict(max_steps=3, save_every=3, num_iterations=2, minibatch_size=4)
    one = grpo.main(config(tmp_path, tiny_model_dir, "one", **over))
    config(tmp_path, tiny_model_dir, "two", **over)
    r = launch_two("train", "grpo", "--config", str(tmp_path / "two.yaml"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(2 process(es))" in r.stdout
    two = tmp_path / "runs" / "two"
    a, b = strip(records_of(one)), strip(records_of(two))
    assert len(a) == len(b) == 3 and a[-1]["kl"] != 0.0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-5), (ra["step"], k, ra[k], rb[k])
    wa = load_file(one / "final" / "adapter_model.safetensors")
    wb = load_file(two / "final" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_minibatches_are_reshuffled_between_iterations_the_same_for_any_number_of_processes(tmp_path,
                                                                                              tiny_model_dir):
    """4 prompts x 4 completions in minibatches of 4: every iteration uses each row once; iteration 0
    keeps the cut minibatches, later ones mix them (and differ from each other); and the rows of a
    minibatch are the same global rows whether 1, 2 or 4 processes hold them."""
    cfg = config(tmp_path, tiny_model_dir, "mb", rollout_batch=4, group_size=4, minibatch_size=4)

    def global_minibatches(iteration, world):
        per_rank = [[[grpo.my_rows(3, cfg, 4, rank, world)[i] for i in mb]
                     for mb in grpo.minibatch_order(3, iteration, cfg, 4, rank, world)] for rank in range(world)]
        return [sorted(r for rank in range(world) for r in per_rank[rank][m]) for m in range(4)]

    cut = [sorted(grpo.my_rows(3, cfg, 4, 0, 1)[m * 4:m * 4 + 4]) for m in range(4)]
    assert global_minibatches(0, 1) == cut
    later = [global_minibatches(i, 1) for i in (1, 2)]
    for mbs in later:
        assert sorted(r for mb in mbs for r in mb) == list(range(16))
        assert mbs != cut
    assert later[0] != later[1]
    for world in (2, 4):
        for iteration in range(3):
            assert global_minibatches(iteration, world) == global_minibatches(iteration, 1)


def test_select_keeps_the_policy_that_scored_best_on_the_validation_slice(tmp_path, tiny_model_dir):
    """select.every 2 over 5 steps: select_gold at steps 0, 2, 4 and 5, each equal to judging that
    step's greedy validation replies; best/ records the first step with the highest select_gold and
    final/ generates what that step's policy generates (and holds best/'s adapter). Which step wins is
    not fixed in advance; a config without monitors.judge is refused."""
    from alignkit.evaluate.judges import load_judge

    judge = tmp_path / "judge.yaml"
    judge.write_text("components:\n  - {name: tox, judge: toxicity, weight: -1.0}\n")
    val = tmp_path / "val.txt"
    val.write_text("Is this jacket warm?\nMy order never came\nCan I pay later?\n")
    cfg = config(tmp_path, tiny_model_dir, "select", max_steps=5, save_every=10, max_new_tokens=8,
                 monitors={"judge": str(judge)}, select={"prompts": str(val), "every": 2, "n": 3,
                                                         "guard": str(judge)})
    run_dir = grpo.main(cfg)
    records = records_of(run_dir)
    scored = {r["step"]: r["select_gold"] for r in records if "select_gold" in r}
    assert list(scored) == [0, 2, 4, 5]
    # The guard (here the same judge) is logged beside it, and held where it is at least step 0's.
    guarded = {r["step"]: (r["select_guard"], r["select_guard_held"]) for r in records if "select_gold" in r}
    assert guarded == {s: (g, g >= scored[0]) for s, g in scored.items()}
    best_step = max(scored, key=lambda s: (scored[s], -s))
    meta = json.loads((run_dir / "best" / "alignkit.json").read_text())["select"]
    assert meta == {"step": best_step, "select_gold": scored[best_step]}
    prompts = ["Is this jacket warm?", "My order never came", "Can I pay later?"]
    policy, tok = load_model(str(run_dir / "final"), device="cpu")
    texts = generate(policy, tok, prompts, max_new_tokens=8).texts
    assert sum(load_judge(judge).score(prompts, texts)) / 3 == pytest.approx(scored[best_step], abs=1e-5)
    a = load_file(run_dir / "final" / "adapter_model.safetensors")
    b = load_file(run_dir / "best" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = load_file(run_dir / "checkpoints" / "step-000005" / "trainable.safetensors")
    assert any(torch.count_nonzero(v) for k, v in last.items() if "lora_B" in k)  # the run moved the adapter
    if best_step == 0:  # (so far always: 5 steps leave the tiny model's greedy replies as they were)
        assert not any(torch.count_nonzero(v) for k, v in a.items() if "lora_B" in k)  # the untrained adapter

    with pytest.raises(ConfigError, match="monitors.judge"):
        config(tmp_path, tiny_model_dir, "nojudge", select={"prompts": str(val)})


def test_select_guard_passes_over_a_better_step_that_breaks_it(tmp_path):
    """Selection's choice with select.guard, its probe scripted (a test double: the scores are given,
    not generated): step 5 scores best but falls below step 0's guard, so best/ keeps step 3; a
    resumed run reads step 0's guard back from the metrics and applies the same floor."""
    from types import SimpleNamespace

    from alignkit.config import SelectSettings
    from alignkit.online import Selection

    val = tmp_path / "val.txt"
    val.write_text("a\nb\n")
    guard = tmp_path / "guard.yaml"
    guard.write_text("components:\n  - {name: tox, judge: toxicity, weight: -1.0}\n")
    cfg = SimpleNamespace(select=SelectSettings(prompts=val, every=1, n=2, guard=guard), max_new_tokens=8)
    scripted = {0: (0.40, -0.010), 3: (0.55, -0.009), 5: (0.70, -0.020), 6: (0.60, -0.010)}
    saved = []

    def run(selection, step):
        selection.probe.run = lambda *a: {"select_proxy": 0.0, "select_gold": scripted[step][0],
                                          "select_guard": scripted[step][1]}
        out = selection.run(step, None, None, None, None, lambda d, meta: saved.append(meta["select"]["step"]))
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **out}) + "\n")
        return out

    selection = Selection(cfg, tmp_path, 0, 0, 1, True)
    assert run(selection, 0)["select_guard_held"] is True
    assert run(selection, 3)["select_guard_held"] is True
    assert run(selection, 5)["select_guard_held"] is False  # the best gold, but more offensive than step 0
    assert selection.best == (0.55, 3) and saved == [0, 3]
    resumed = Selection(cfg, tmp_path, 5, 0, 1, True)
    assert resumed.floor == -0.010
    assert run(resumed, 6)["select_guard_held"] is True  # -0.010 >= step 0's -0.010
