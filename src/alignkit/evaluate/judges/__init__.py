"""Judges that score (prompt, completion) pairs, and their composition into one score.

A judge maps a batch of prompts and completions to one float per completion; each kind is a
module of this package, with its config schema beside it:

  toxicity    alt-profanity-check's probability that the completion is offensive, 0..1
  sentiment   VADER's compound polarity of the completion, -1 (negative) .. +1 (positive), not rescaled
  reward      a trained reward model (a ScalarHeadModel directory) on the chat-rendered prompt + completion
  classifier  a local Hugging Face text classifier: the softmax probability of one label, chosen by name
  llm         a language model asked a principle, read from its log-likelihoods: a 1..5 rating, or
              (pairwise) the probability that one completion is better than another
  relevance   cosine similarity of prompt and completion under a sentence-embedding model (MiniLM)
  repetition  the share of the completion's word n-grams that repeat an earlier one of it, 0..1 (with
              a negative weight: a repetition penalty beside a reward model)
  rubric      rule-based criteria (phrases present or absent, details of the prompt repeated, a
              length range), each passed or failed: the weighted share passed, 0..1

A JudgeConfig (config.py), loaded from YAML, composes judges into one score (compose.py): total =
sum of weight * score over named components, optionally mapped to named categories by thresholds.
One component with weight -1 is a scalar judge (reward = -toxicity); `categories` makes it
categorical (safe/borderline/toxic); several components make it multi-objective, and every result
keeps the per-component scores.
"""

from alignkit.evaluate.judges.base import ComponentBase, Judge, check_batch, pad_id, right_pad
from alignkit.evaluate.judges.classifier import ClassifierComponent, ClassifierJudge
from alignkit.evaluate.judges.compose import Categories, Component, ComposedJudge, Scored
from alignkit.evaluate.judges.config import ComponentConfig, JudgeConfig, build_judge, load_judge
from alignkit.evaluate.judges.llm import (
    LLM_JUDGE_FILE, PRINCIPLES_FILE, PROMPTS_DIR, ChoicePrompt, LLMComponent, LLMPairwiseJudge, LLMRatingJudge,
    load_choice_prompt, option_logprobs, win_rates,
)
from alignkit.evaluate.judges.relevance import RelevanceComponent, RelevanceJudge
from alignkit.evaluate.judges.repetition import RepetitionComponent, RepetitionJudge
from alignkit.evaluate.judges.reward import RewardComponent, RewardModelJudge
from alignkit.evaluate.judges.rubric import Criterion, RubricComponent, RubricJudge
from alignkit.evaluate.judges.sentiment import SentimentComponent, SentimentJudge
from alignkit.evaluate.judges.toxicity import ToxicityComponent, ToxicityJudge

__all__ = [
    "Categories", "ChoicePrompt", "ClassifierComponent", "ClassifierJudge", "Component", "ComponentBase",
    "ComponentConfig", "ComposedJudge", "Criterion", "Judge", "JudgeConfig", "LLMComponent",
    "LLMPairwiseJudge", "LLMRatingJudge", "LLM_JUDGE_FILE", "PRINCIPLES_FILE", "PROMPTS_DIR",
    "RelevanceComponent", "RelevanceJudge", "RepetitionComponent", "RepetitionJudge", "RewardComponent",
    "RewardModelJudge", "RubricComponent", "RubricJudge", "Scored", "SentimentComponent", "SentimentJudge",
    "ToxicityComponent", "ToxicityJudge",
    "build_judge", "check_batch", "load_choice_prompt", "load_judge", "option_logprobs", "pad_id",
    "right_pad", "win_rates",
]
