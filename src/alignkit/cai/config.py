"""The typed config of the Constitutional AI pipeline (`alignkit cai pipeline --config configs/cai.yaml`).

The training stages take the fields of their own recipes (SFTConfig, RewardConfig, PPOConfig) as
plain mappings; the pipeline fills in model, data and run directory and validates them before the
first stage runs, so a typo in `ppo:` fails at once rather than an hour in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from alignkit.config import Strict


class RedteamSettings(Strict):
    seeds: Path | None = None
    """Red-team seed prompts, JSONL {"prompt","category"?}; default the shipped cai/redteam_seeds.jsonl."""
    held_out: int = Field(12, ge=1)
    """Seeds kept aside (after a seeded shuffle) for the final evaluation; never used in training."""
    max_seeds: int | None = Field(None, ge=1)
    """Most training seeds to use (the rest of the shuffled seeds are dropped); null uses all."""
    variations: int = Field(1, ge=0)
    """Model-written rephrasings asked per training seed; kept only when non-empty and distinct."""
    variation_temperature: float = Field(0.8, ge=0)
    """Sampling temperature of the rephrasings (0 is greedy: one variation per seed at most)."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens per response (and per variation)."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature for responses; 0 is greedy."""
    toxicity_threshold: float = Field(0.5, ge=0, le=1)
    """A response with toxicity above this is flagged harmful."""
    judge: Path | None = None
    """Optional judge YAML (higher = better, e.g. an LLM harmlessness rating) that also flags responses."""
    judge_threshold: float | None = None
    """With `judge`: a response scoring below this is flagged harmful."""


class ReviseSettings(Strict):
    rounds: int = Field(1, ge=1)
    """Critique -> revision rounds per prompt, each under a freshly sampled principle."""
    max_new_tokens: int = Field(64, ge=1)
    """Most tokens per critique and per revision."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature for critiques and revisions; 0 is greedy."""


class LabelSettings(Strict):
    mode: Literal["logprob", "judge"] = "logprob"
    """'logprob': the feedback model's log-likelihood of (A) vs (B) (the CAI paper); 'judge': a judge YAML."""
    feedback_model: str = "embedded"
    """The model asked the multiple-choice question (logprob mode)."""
    judge: Path | None = None
    """Judge YAML for judge mode."""
    template: Path | None = None
    """Multiple-choice template YAML; default the shipped cai/prompts/compare.yaml."""
    order_swap: bool = True
    """Ask both orders and average, cancelling the feedback model's preference for one letter."""
    margin: Literal["none", "log_odds"] = "none"
    """Also write margin = log(p / (1 - p)) for the reward model's Bradley-Terry loss with margin."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens per sampled response."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the two responses per prompt."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling threshold of the two responses."""
    batch_size: int = Field(4, ge=1)
    """Sequences per forward pass of the feedback model."""


class EvalSettings(Strict):
    benign: Path | None = None
    """Benign prompts for helpfulness (JSONL or one per line); default the shipped cai/benign_prompts.jsonl."""
    max_benign: int | None = Field(None, ge=1)
    """Most benign prompts to evaluate on; null uses all."""
    max_new_tokens: int = Field(48, ge=1)
    """Most tokens per completion (greedy)."""
    harmless_judge: dict | Path = {"components": [{"name": "harmless", "judge": "llm", "mode": "rating",
                                                   "principle": "harmless"}]}
    """Independent judge (YAML path or inline mapping) scored on held-out red-team prompts; higher is
    more harmless. It should not be the labeler: by default an LLM rating with a judge principle."""
    helpful_judge: dict | Path = {"components": [{"name": "helpful", "judge": "llm", "mode": "rating",
                                                  "principle": "helpful"}]}
    """Judge (YAML path or inline mapping) scored on benign prompts; higher is more helpful."""
    helpful_reward: Path | None = None
    """Optional reward model or judge YAML for helpfulness on benign prompts (e.g. a reward model
    trained on helpfulness pairs); the pipeline's own reward model is reported on both sets anyway."""


class CAIConfig(Strict):
    model: str = "embedded"
    """The base model: 'embedded', a Hugging Face directory, an adapter directory or a .gguf file."""
    output_dir: Path = Path("runs")
    """Parent directory of the run directory."""
    run_name: str = "cai"
    """The run directory under output_dir; every stage writes its own subdirectory there."""
    principles: str = "human_rights,platform_terms,dialogue_rules"
    """Principle selection: comma-separated constitution names or YAML paths, each optionally
    narrowed to ids, e.g. 'human_rights:privacy+no_torture,dialogue_rules'."""
    seed: int = 0
    """Seed for the held-out split, principle sampling and every sampled generation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' uses CUDA when present."""
    batch_size: int = Field(8, ge=1)
    """Sequences generated at once."""
    redteam: RedteamSettings = RedteamSettings()
    """Red-team prompts, responses and flags."""
    revise: ReviseSettings = ReviseSettings()
    """Critique and revision."""
    sft: dict = {}
    """SFTConfig fields for SL-CAI (see `alignkit train sft --help`); model, data and run directory are set by the pipeline."""
    label: LabelSettings = LabelSettings()
    """RLAIF labeling of response pairs sampled from the SL-CAI model."""
    reward: dict = {}
    """RewardConfig fields for the preference model; model (default the base), data and run directory are set."""
    ppo: dict = {}
    """PPOConfig fields for RL-CAI; model (the SL-CAI adapter), prompts, reward and run directory are set."""
    evaluate: EvalSettings = EvalSettings()
    """Base vs SL-CAI vs RL-CAI: harmlessness on held-out red-team prompts, helpfulness on benign prompts."""
