"""Typed configs, one per recipe, loaded from YAML plus `key.sub=value` overrides, with clear errors.

Every field carries its default and unit in its docstring; `alignkit train sft --help` prints them.
Relative paths are taken relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alignkit.errors import ConfigError
from alignkit.io import read_text_file


class Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class LoraSettings(Strict):
    enabled: bool = True
    """Train LoRA adapters (true) or every weight of the model (false)."""
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling numerator: the update is (alpha / r) * B A."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "v_proj"]
    """Names of the linear layers that get adapters."""


class SFTData(Strict):
    train: Path
    """JSONL file of {"prompt","completion"} or {"messages":[...]} records."""
    eval: Path | None = None
    """Optional held-out JSONL file in the same format, for eval loss."""
    max_length: int = Field(512, ge=8)
    """Tokens per example; longer examples are cut from the right."""


class TrainSettings(Strict):
    """Settings every training recipe shares; each recipe's config adds its own."""

    model: str = "embedded"
    """'embedded', a Hugging Face model directory, an adapter directory or a .gguf file."""
    output_dir: Path = Path("runs")
    """Parent directory of run directories."""
    run_name: str | None = None
    """Run directory name under output_dir; default <recipe>-<date>-<time>."""
    lora: LoraSettings = LoraSettings()
    """LoRA settings; lora.enabled=false means full fine-tuning."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold (L2 norm)."""
    micro_batch_size: int = Field(4, ge=1)
    """Examples per forward pass, per process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step, per process; global batch = micro_batch_size * grad_accum * processes."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data; ignored when max_steps is set."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; overrides epochs."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    """Learning-rate decay after warm-up."""
    eval_every: int = Field(0, ge=0)
    """Steps between evaluations; 0 means only before and after training."""
    save_every: int = Field(50, ge=1)
    """Steps between checkpoints (a checkpoint is also written at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many of the newest checkpoints to keep."""
    seed: int = 0
    """Seed for data order, initialisation and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' uses CUDA when present, else the CPU."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """'bfloat16' on a CPU multiplies the frozen weights (LoRA's base, a tied LM head) in bfloat16
    while the adapters, attention, norms and the loss stay float32: several times faster matrix
    products on CPUs with AMX (Intel Sapphire Rapids and later), slower elsewhere; with full
    fine-tuning nothing is frozen, so it stays float32. On CUDA it is bfloat16 autocast. 'auto' is
    bfloat16 on CUDA and on CPUs with AMX, float32 on other CPUs (the environment variable
    ALIGNKIT_TRAIN_PRECISION=float32 makes it float32 on every CPU). 'float32' is float32 everywhere."""


class SFTConfig(TrainSettings):
    data: SFTData
    """Training and eval data."""


class RewardData(Strict):
    train: Path
    """Pairs JSONL: {"prompt","chosen","rejected","margin"?}."""
    eval: Path | None = None
    """Optional held-out pairs, for accuracy and loss."""
    eval_fraction: float = Field(0.0, ge=0, lt=1)
    """Without `eval`: hold out this share of the training prompts (all their pairs, chosen by the
    seed) as the held-out set, e.g. 0.1; 0 holds out nothing."""
    max_length: int = Field(512, ge=8)
    """Tokens per prompt+completion; longer ones keep their last max_length tokens."""


class FrozenBackbone(Strict):
    layer: int | None = Field(None, ge=1)
    """The decoder layer whose output is averaged over the reply's tokens; empty: 3/4 of the depth."""
    weight_decay: float = Field(0.1, ge=0)
    """L2 penalty on the head's weights (over standardised features)."""
    max_iterations: int = Field(300, ge=1)
    """L-BFGS iterations of the head's fit."""


class RewardConfig(TrainSettings):
    data: RewardData
    """Training and eval pairs."""
    frozen: FrozenBackbone | None = None
    """Train only a linear head on the frozen model's pooled hidden states (features computed once,
    the head fitted in seconds) instead of the LoRA / full fine-tuning steps; requires lora.enabled:
    false. The step settings (max_steps, learning_rate, ...) are then not used. It may rank pairs
    well and still be easy for RL to push along its one direction: probe the gold score (README)."""
    center_coef: float = Field(0.0, ge=0)
    """Weight of the reward-centering term mean((r_chosen + r_rejected)^2); 0 turns it off."""
    use_margin: bool = True
    """Subtract a pair's "margin" field inside the Bradley-Terry loss when present."""
    soft_labels: bool = False
    """Train on each pair's "p_chosen" (the probability that chosen is better, as `alignkit cai
    label` writes) with the soft-label loss -(p log s(d) + (1-p) log s(-d)); pairs without it count
    as p = 1. Margins are not used then."""


class DPOConfig(TrainSettings):
    data: RewardData
    """Training and eval pairs (the same files as the reward model)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the implicit KL penalty toward the reference (higher stays closer)."""
    learning_rate: float = Field(5e-5, gt=0)
    """Peak learning rate (AdamW); DPO wants a smaller one than SFT."""


class MonitorSettings(Strict):
    judge: Path | None = None
    """Judge YAML for an independent judge scored every step (not used for the reward), e.g.
    configs/judge_safety.yaml; its trend is compared with the reward's."""
    max_kl: float | None = Field(None, gt=0)
    """Warn when the mean KL per response exceeds this (nats)."""
    length_drift: float = Field(0.5, gt=0)
    """Warn when mean response length moves more than this fraction away from the first step."""
    min_distinct_2: float = Field(0.3, ge=0, le=1)
    """Warn when distinct-2 (unique bigrams / bigrams) falls below this: repetitive output."""
    max_repetition: float = Field(0.3, ge=0, le=1)
    """Warn when the mean per-reply repetition (share of a reply's word 3-grams repeating an earlier
    one of the same reply) exceeds this: one reply looping on itself."""
    window: int = Field(3, ge=1)
    """Steps per window when comparing the reward's and the judge's trends."""
    stop_on_warning: bool = False
    """Stop the run (after a checkpoint) at the first warning."""


class PPOData(Strict):
    prompts: Path
    """Prompts to sample from: JSONL with a "prompt" field, or one prompt per line."""


class ProbeSettings(Strict):
    prompts: Path
    """Held-out prompts (JSONL with a "prompt" field, or one per line); the first `n` are used."""
    every: int = Field(5, ge=1)
    """Steps between probes; a probe also runs before the first step and after the last."""
    n: int = Field(16, ge=1)
    """How many of the file's prompts to probe."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Most tokens per greedy probe reply; null uses the recipe's max_new_tokens."""


class SelectSettings(Strict):
    prompts: Path
    """Validation prompts (JSONL with a "prompt" field, or one per line); the first `n` are used.
    Never the prompts the policy is evaluated on afterwards: choosing on them is tuning on the test."""
    every: int = Field(5, ge=1)
    """Steps between scorings; the policy is also scored before the first step and after the last."""
    n: int = Field(48, ge=1)
    """How many of the file's prompts to score."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Most tokens per greedy reply; null uses the recipe's max_new_tokens."""
    guard: Path | None = None
    """A judge YAML whose mean over the same replies must not fall below the starting policy's (step
    0) for a step to be chosen, higher being better (e.g. the offensive-language classifier with
    `above: 0.5` and weight -1: no step with more replies flagged offensive than the start on the
    slice is kept). Logged as select_guard.
    The starting policy always qualifies, so a run where no step holds the guard keeps it."""


class PPOConfig(TrainSettings):
    data: PPOData
    """Prompt set."""
    reward: Path
    """A reward-model directory (alignkit train reward; its run directory works too), a judge YAML
    (components with weights, as for `alignkit prefs judge`), or a Python function
    'file.py:function' / 'package.module:function' called as fn(prompts, completions) -> scores."""
    rollout_batch: int = Field(8, ge=1)
    """Prompts sampled per PPO step."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens per sampled response."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold for rollouts."""
    ppo_epochs: int = Field(2, ge=1)
    """Passes over each batch of rollouts."""
    minibatch_size: int = Field(4, ge=1)
    """Rollouts per gradient step within a PPO epoch."""
    clip: float = Field(0.2, gt=0)
    """Policy ratio clip epsilon."""
    vf_clip: float = Field(0.2, gt=0)
    """Value clip range around the rollout-time values."""
    vf_coef: float = Field(0.1, ge=0)
    """Weight of the value loss."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount per token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over each batch's response tokens."""
    kl_coef: float = Field(0.05, ge=0)
    """Initial coefficient of the per-token KL penalty against the reference."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimator in the reward: k1 = log p - log q, k3 = (q/p - 1) - log(q/p)."""
    kl_target: float | None = Field(None, gt=0)
    """Target KL per response for the adaptive controller; null keeps kl_coef fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller horizon, in rollouts."""
    reward_clip: float | None = Field(None, gt=0)
    """Clip scores to [-reward_clip, reward_clip]; null leaves them."""
    normalize_reward: bool = False
    """Whiten scores across each rollout batch (zero mean, unit variance)."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a response cut off at max_new_tokens without EOS."""
    reward_threshold: float | None = None
    """Stop early once a batch's mean score reaches this."""
    monitors: MonitorSettings = MonitorSettings()
    """Reward-hacking monitors: warnings in the log and metrics, optionally an early stop."""
    probe: ProbeSettings | None = None
    """Held-out probe: every probe.every steps, greedy replies to the first probe.n prompts of
    probe.prompts, logged as probe_proxy (mean training reward) and probe_gold (mean of
    monitors.judge, when set). Null: no probe."""


class GRPOConfig(TrainSettings):
    data: PPOData
    """Prompt set."""
    reward: Path
    """Where scores come from, as for PPO: a reward-model run, a judge YAML, or 'file.py:function'."""
    rollout_batch: int = Field(4, ge=1)
    """Prompts (groups) per step; each gets group_size completions."""
    group_size: int = Field(4, ge=1)
    """Completions sampled per prompt; the group's rewards are each completion's baseline (at least 2)."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens per completion."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature; log-probs are taken at the same temperature."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling threshold."""
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    """Group advantage: grpo = (r - mean) / std; dr_grpo = r - mean (pair with loss_aggregation
    fixed); rloo = r - mean of the group's other rewards."""
    num_iterations: int = Field(1, ge=1)
    """Updates per batch of completions (GRPO's mu); above 1 the clipped ratio matters."""
    minibatch_size: int | None = Field(None, ge=1)
    """Completions per gradient step within an iteration; null takes the whole batch
    (rollout_batch * group_size) in one step."""
    clip: float = Field(0.2, gt=0)
    """Ratio clip epsilon (lower side, and upper side unless clip_high is set)."""
    clip_high: float | None = Field(None, gt=0)
    """Upper ratio clip epsilon (DAPO's clip-higher, e.g. 0.28); null uses clip."""
    loss_aggregation: Literal["token", "sequence", "fixed"] = "token"
    """token: every response token of the batch weighs the same; sequence: mean over completions of
    each one's token mean (the GRPO paper); fixed: token sum / (completions * max_new_tokens), no
    length normalisation (Dr. GRPO)."""
    kl_coef: float = Field(0.04, ge=0)
    """KL coefficient (beta) toward the reference (the adapter-disabled base, or a frozen copy in full
    fine-tuning); 0 skips the reference pass."""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss: beta * k3 per token added to the loss (GRPO); reward: beta * the sequence's summed
    per-token KL (kl_estimator) subtracted from its score before advantages (RLOO, PPO)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token estimator for kl_in=reward (the loss always uses k3) and for the logged kl."""
    kl_target: float | None = Field(None, gt=0)
    """Target KL per completion for the adaptive controller; null keeps kl_coef fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller horizon, in completions."""
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a completion cut off at max_new_tokens without EOS."""
    reward_threshold: float | None = None
    """Stop early once a batch's mean score reaches this."""
    monitors: MonitorSettings = MonitorSettings()
    """Reward-hacking monitors, as for PPO."""
    probe: ProbeSettings | None = None
    """Held-out probe, as for PPO (probe_proxy, probe_gold in the step's metrics)."""
    select: SelectSettings | None = None
    """Checkpoint selection on a validation slice (early stopping on the labeler, not on the proxy):
    before the first step, every select.every steps and after the last, greedy replies to the first
    select.n prompts of select.prompts are scored by monitors.judge (required) and logged as
    select_gold; the policy of the best-scoring step so far is kept in best/, and final/ holds it at
    the end (step 0, the starting policy, counts too: RL may not have helped). Null: final/ holds
    the last step's policy."""

    @model_validator(mode="after")
    def _select_needs_a_judge(self):
        if self.select is not None and self.monitors.judge is None:
            raise ValueError("select scores the validation replies with monitors.judge: set monitors.judge "
                             "to a judge YAML (the labeler), or drop select")
        return self

    @field_validator("group_size")
    @classmethod
    def _groups_need_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"group_size {v}: a group needs at least 2 completions, the others being each "
                             "one's baseline (for one completion per prompt use alignkit train ppo)")
        return v


def field_help(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per config key: dotted name, default and description (for --help)."""
    lines = []
    for name, info in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(field_help(ann, f"{key}."))
            continue
        default = "required" if info.is_required() else f"default {info.default!r}"
        lines.append(f"{key} ({default}): {info.description or ''}")
    return lines


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, f"{key}.")

    walk(yaml.compose(text), "")
    return lines


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def load_config(cls: type[Strict], path: Path | None = None, overrides: list[str] | None = None,
                base: dict | None = None):
    """Build a `cls` from an optional YAML file (or a `base` dict) and `key.sub=value` overrides.

    Raises ConfigError naming the file, line and field of every problem.
    """
    raw: dict = dict(base or {})
    lines: dict[str, int] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        text = read_text_file(path, "config")
        try:
            loaded = yaml.safe_load(text)
            lines = _key_lines(text) if loaded else {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f":{mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{at}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        raw.update(loaded)
    overridden = set()
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value (for example lora.r=16)")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        _set_dotted(raw, key.strip(), parsed)
        overridden.add(key.strip())
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if key in overridden:
                place = "override"
            else:
                line = lines.get(key) or lines.get(key.rsplit(".", 1)[0])
                place = f"{where}:{line}" if line else where
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err['input']!r})"
            problems.append(f"{place}: {key}: {msg}{got}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def dump_config(cfg: BaseModel, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from alignkit.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
