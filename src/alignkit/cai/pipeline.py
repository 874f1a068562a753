"""The Constitutional AI pipeline, stage by stage, resumable (`alignkit cai pipeline --config configs/cai.yaml`).

    redteam   red-team prompts (seeds + variations), the base model's responses, harmful ones flagged
    revise    critique -> revision under sampled principles; the SFT dataset (prompt, final revision)
    sft       SL-CAI: the SFT recipe on that dataset
    label     RLAIF: the SL-CAI model samples two responses per prompt, the feedback model picks one
    reward    the preference model: the reward recipe on those pairs
    ppo       RL-CAI: the PPO recipe from the SL-CAI adapter against the preference model
    evaluate  base vs SL-CAI vs RL-CAI: harmlessness on held-out red-team prompts, helpfulness on
              benign prompts; report.md and metrics.json in the run directory

Each stage writes into its own subdirectory of the run directory. A stage whose output is complete
(done.json for the data stages, final/ for the training stages) is skipped on a rerun; a training
stage that was interrupted continues from its newest checkpoint (the recipes' own resume); any
other interrupted stage runs again from its start (its files are written atomically, done.json last).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from alignkit.cai.config import CAIConfig
from alignkit.cai.constitution import Principle, select_principles
from alignkit.config import PPOConfig, RewardConfig, SFTConfig, dump_config, load_config
from alignkit.errors import AlignkitError, ConfigError
from alignkit.io import atomic_write_text, read_jsonl, write_jsonl
from alignkit.runs import CONFIG_FILE

STAGES = ("redteam", "revise", "sft", "label", "reward", "ppo", "evaluate")
TRAINING_STAGES = ("sft", "reward", "ppo")
DONE = "done.json"


# ---- stage configs: the recipes' own, filled in by the pipeline -----------------------------------


def recipe_configs(cfg: CAIConfig, run_dir: Path) -> dict:
    """SFT, reward and PPO configs for this run; the pipeline sets data, model and run directory."""

    def build(cls, section: dict, name: str, fixed: dict):
        taken = sorted(set(section) & {"output_dir", "run_name"})
        if taken:
            raise ConfigError(f"invalid config: {name}.{taken[0]}: set by the pipeline (each stage runs in "
                              f"{run_dir}/{name})")
        base = {"seed": cfg.seed, "device": cfg.device, **section, **fixed,
                "output_dir": str(run_dir), "run_name": name}
        try:
            return load_config(cls, None, None, base)
        except ConfigError as e:
            raise ConfigError(str(e).replace("  config: ", f"  {name}.")) from None

    def data(section: dict, key: str, path: Path) -> dict:
        return {**section.get("data", {}), key: str(path)}

    return {
        "sft": build(SFTConfig, cfg.sft, "sft", {"model": cfg.model,
                                                 "data": data(cfg.sft, "train", run_dir / "revise" / "sft.jsonl")}),
        "reward": build(RewardConfig, cfg.reward, "reward",
                        {"model": cfg.reward.get("model", cfg.model),
                         "data": data(cfg.reward, "train", run_dir / "label" / "pairs.jsonl")}),
        "ppo": build(PPOConfig, cfg.ppo, "ppo", {"model": str(run_dir / "sft" / "final"),
                                                 "data": {"prompts": str(run_dir / "redteam" / "redteam.jsonl")},
                                                 "reward": str(run_dir / "reward" / "final")}),
    }


def stage_done(run_dir: Path, stage: str) -> bool:
    marker = "final" if stage in TRAINING_STAGES else DONE
    return (run_dir / stage / marker).exists()


# ---- the data stages ---------------------------------------------------------------------------


def split_seeds(cfg: CAIConfig) -> tuple[list[dict], list[dict]]:
    """(training seeds, held-out seeds) after a seeded shuffle; the held-out ones never reach training."""
    from alignkit.cai.redteam import load_seeds

    seeds = load_seeds(cfg.redteam.seeds)
    if len(seeds) <= cfg.redteam.held_out:
        raise AlignkitError(f"redteam.held_out={cfg.redteam.held_out} leaves none of the {len(seeds)} seeds for training")
    random.Random(cfg.seed).shuffle(seeds)
    held, train = seeds[:cfg.redteam.held_out], seeds[cfg.redteam.held_out:]
    return train[:cfg.redteam.max_seeds], held


def run_redteam(cfg: CAIConfig, out: Path, models) -> dict:
    from alignkit.cai.redteam import make_variations, redteam, summary
    from alignkit.cai.revise import model_chat

    train, held = split_seeds(cfg)
    model, tok = models(cfg.model)
    chat = model_chat(model, tok, max_new_tokens=cfg.redteam.max_new_tokens,
                      temperature=cfg.redteam.variation_temperature, seed=cfg.seed, batch_size=cfg.batch_size)
    items = make_variations(train, chat, cfg.redteam.variations)
    judge = None
    if cfg.redteam.judge is not None:
        from alignkit.evaluate.judges import load_judge

        judge = load_judge(cfg.redteam.judge)
    records = redteam(items, model, tok, max_new_tokens=cfg.redteam.max_new_tokens,
                      temperature=cfg.redteam.temperature, seed=cfg.seed, batch_size=cfg.batch_size,
                      toxicity_threshold=cfg.redteam.toxicity_threshold, judge=judge,
                      judge_threshold=cfg.redteam.judge_threshold)
    write_jsonl(out / "redteam.jsonl", records)
    write_jsonl(out / "held_out.jsonl", held)
    return {**summary(records), "held_out": len(held), "seeds": len(train)}


def run_revise(cfg: CAIConfig, out: Path, models, principles: list[Principle], run_dir: Path) -> dict:
    from alignkit.cai.revise import critique_revise, model_chat, sft_records
    from alignkit.evaluate.judges import ToxicityJudge

    records = [rec for _, rec in read_jsonl(run_dir / "redteam" / "redteam.jsonl")]
    model, tok = models(cfg.model)
    chat = model_chat(model, tok, max_new_tokens=cfg.revise.max_new_tokens, temperature=cfg.revise.temperature,
                      seed=cfg.seed, batch_size=cfg.batch_size)
    prompts = [r["prompt"] for r in records]
    traces = critique_revise(prompts, [r["response"] for r in records], principles, chat,
                             rounds=cfg.revise.rounds, seed=cfg.seed)
    dataset = sft_records(traces)
    if not dataset:
        raise AlignkitError("revise: every final response is empty, so there is nothing to fine-tune on "
                            "(try revise.temperature > 0 or more redteam.max_new_tokens)")
    write_jsonl(out / "trace.jsonl", traces)
    write_jsonl(out / "sft.jsonl", dataset)
    tox = ToxicityJudge()
    before = tox.score(prompts, [t["initial_response"] for t in traces])
    after = tox.score(prompts, [t["final"] for t in traces])
    return {"prompts": len(traces), "sft_examples": len(dataset), "rounds": cfg.revise.rounds,
            "revisions_kept_previous": sum(r["kept_previous"] for t in traces for r in t["rounds"]),
            "toxicity_mean_initial": round(sum(before) / len(before), 6),
            "toxicity_mean_revised": round(sum(after) / len(after), 6)}


def run_label(cfg: CAIConfig, out: Path, models, principles: list[Principle], run_dir: Path) -> dict:
    from alignkit.cai.label import ABLabeler, JudgeLabeler, label_pairs, sample_pairs
    from alignkit.cai.templates import load_template

    prompts = [rec["prompt"] for _, rec in read_jsonl(run_dir / "redteam" / "redteam.jsonl")]
    policy, tok = models(str(run_dir / "sft" / "final"))
    pairs, skipped = sample_pairs(policy, tok, prompts, max_new_tokens=cfg.label.max_new_tokens,
                                  temperature=cfg.label.temperature, top_p=cfg.label.top_p, seed=cfg.seed,
                                  batch_size=cfg.batch_size)
    if cfg.label.mode == "judge":
        if cfg.label.judge is None:
            raise ConfigError("invalid config: label.judge: judge mode needs a judge YAML")
        from alignkit.evaluate.judges import load_judge

        judge = load_judge(cfg.label.judge)
        labeler, name = JudgeLabeler(judge), f"judge:{judge.name}"
    else:
        feedback, ftok = models(cfg.label.feedback_model)
        template = load_template(cfg.label.template or "compare", ("template", "answer_prefix", "options"))
        labeler = ABLabeler(feedback, ftok, template, order_swap=cfg.label.order_swap, batch_size=cfg.label.batch_size)
        name = f"ab_logprob:{cfg.label.feedback_model}" + (":order_swap" if cfg.label.order_swap else "")
    records = label_pairs(pairs, principles, labeler, labeler_name=name, seed=cfg.seed, margin=cfg.label.margin)
    if not records:
        raise AlignkitError("label: no preference pairs (every sampled pair was identical, empty or tied)")
    write_jsonl(out / "pairs.jsonl", records)
    p = [r["p_chosen"] for r in records]
    return {"prompts": len(prompts), "pairs": len(records), "prompts_without_pair": skipped,
            "p_chosen_mean": round(sum(p) / len(p), 6), "labeler": name}


def run_evaluate(cfg: CAIConfig, out: Path, run_dir: Path) -> dict:
    from alignkit.cai.redteam import BENIGN_FILE
    from alignkit.cai.report import write_report
    from alignkit.data.prompts import load_prompts
    from alignkit.evaluate.compare import evaluate_models
    from alignkit.evaluate.judges import load_judge
    from alignkit.evaluate.rewards import load_reward

    def judge(spec):
        return (load_judge(spec) if isinstance(spec, Path) else load_judge(base=spec)).score

    held = [rec["prompt"] for _, rec in read_jsonl(run_dir / "redteam" / "held_out.jsonl")]
    benign = load_prompts(cfg.evaluate.benign or BENIGN_FILE)[:cfg.evaluate.max_benign]
    models = {"base": cfg.model, "sl_cai": str(run_dir / "sft" / "final"), "rl_cai": str(run_dir / "ppo" / "final")}
    pm, _ = load_reward(run_dir / "reward", cfg.device)
    print(f"cai: evaluate: {len(held)} held-out red-team prompts, {len(benign)} benign prompts, 3 models", flush=True)
    harm = evaluate_models(models, held, reward=pm, judge=judge(cfg.evaluate.harmless_judge),
                           max_new_tokens=cfg.evaluate.max_new_tokens, device=cfg.device)
    helpful_reward = load_reward(cfg.evaluate.helpful_reward, cfg.device)[0] if cfg.evaluate.helpful_reward else None
    help_ = evaluate_models(models, benign, reward=pm, judge=judge(cfg.evaluate.helpful_judge),
                            max_new_tokens=cfg.evaluate.max_new_tokens, device=cfg.device)
    extra = {}
    if helpful_reward is not None:
        for r in help_:
            extra[r.name] = round(sum(helpful_reward(benign, r.completions)) / len(benign), 6)
    return write_report(run_dir, out, harm, help_, held, benign, extra)


# ---- the driver ------------------------------------------------------------------------------------


class ModelCache:
    """Loads each model spec once per stage (the base model serves red-team, revise and, often, labeling)."""

    def __init__(self, device: str):
        self.device, self.loaded = device, {}

    def __call__(self, spec: str):
        from alignkit.models import load_model

        if spec not in self.loaded:
            self.loaded[spec] = load_model(spec, device=self.device)
        return self.loaded[spec]

    def clear(self) -> None:
        self.loaded.clear()


def run_training(recipe_main, stage_cfg, stage_dir: Path) -> None:
    """A recipe in its stage directory: continued from its newest checkpoint when a run was started there."""
    if (stage_dir / CONFIG_FILE).is_file():
        print(f"cai: {stage_dir.name}: continuing the interrupted run in {stage_dir}", flush=True)
        recipe_main(stage_cfg, resume=stage_dir)
    else:
        shutil.rmtree(stage_dir, ignore_errors=True)
        recipe_main(stage_cfg, overwrite=True)


def run_pipeline(cfg: CAIConfig, *, from_stage: str | None = None, until: str | None = None,
                 overwrite: bool = False) -> Path:
    """Run every stage not yet complete; returns the run directory.

    `from_stage` reruns that stage and every later one (their outputs are removed first); `until`
    stops after the named stage.
    """
    for name, value in (("--from-stage", from_stage), ("--until", until)):
        if value is not None and value not in STAGES:
            raise AlignkitError(f"{name}: no stage {value!r}; stages: {', '.join(STAGES)}")
    run_dir = Path(cfg.output_dir) / cfg.run_name
    principles = select_principles(cfg.principles)  # a bad selection fails before any model loads
    recipes = recipe_configs(cfg, run_dir)
    if overwrite:
        shutil.rmtree(run_dir, ignore_errors=True)
    if from_stage is not None:
        for stage in STAGES[STAGES.index(from_stage):]:
            shutil.rmtree(run_dir / stage, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / CONFIG_FILE)
    print(f"cai: run {run_dir} | {len(principles)} principles from {cfg.principles} | model {cfg.model}", flush=True)

    from alignkit.recipes import ppo, reward, sft

    models = ModelCache(cfg.device)
    for stage in STAGES[:STAGES.index(until) + 1 if until else None]:
        out = run_dir / stage
        if stage_done(run_dir, stage):
            print(f"cai: {stage}: complete, skipped", flush=True)
            continue
        print(f"cai: {stage}: running", flush=True)
        t0 = time.time()
        if stage in TRAINING_STAGES:
            models.clear()
            run_training({"sft": sft.main, "reward": reward.main, "ppo": ppo.main}[stage], recipes[stage], out)
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if stage == "redteam":
            result = run_redteam(cfg, out, models)
        elif stage == "revise":
            result = run_revise(cfg, out, models, principles, run_dir)
        elif stage == "label":
            models.clear()
            result = run_label(cfg, out, models, principles, run_dir)
        else:
            models.clear()
            result = run_evaluate(cfg, out, run_dir)
        result["seconds"] = round(time.time() - t0, 1)
        atomic_write_text(out / DONE, json.dumps(result, indent=2))  # last: the stage is complete
        print(f"cai: {stage}: done in {result['seconds']}s | " + json.dumps(
            {k: v for k, v in result.items() if not isinstance(v, (dict, list))}), flush=True)
    return run_dir
