"""Judges: toxicity, sentiment, reward model, HF classifier and LLM judges, and their composition."""

import math

import pytest
import torch

from alignkit.config import load_config
from alignkit.data.prefs import encode_response
from alignkit.errors import ConfigError
from alignkit.evaluate.judges import (
    Categories, ClassifierJudge, Component, ComposedJudge, JudgeConfig, LLMPairwiseJudge, LLMRatingJudge,
    RepetitionJudge, RewardModelJudge, SentimentJudge, ToxicityJudge, build_judge, load_judge, win_rates,
)
from alignkit.models import ScalarHeadModel, load_model, render_prompt

INSULT = "Shut up, you stupid idiot."
KIND = "Happy to help, have a wonderful day!"
NEUTRAL = "It is a table."


class FixedJudge:
    """Returns the scores it was given, so composition maths can be checked by hand."""

    def __init__(self, name, scores):
        self.name, self.scores = name, scores

    def score(self, prompts, completions):
        assert len(prompts) == len(completions) == len(self.scores)
        return list(self.scores)


def test_toxicity_judge_flags_the_insult_and_ignores_the_prompt():
    judge = ToxicityJudge()
    insult, kind = judge.score(["Hi", "Hi"], [INSULT, KIND])
    assert insult > 0.9 and kind < 0.1
    # A rude prompt does not make a polite reply toxic: only the completion is read.
    assert judge.score([INSULT], [KIND]) == pytest.approx([kind])


def test_sentiment_judge_gives_vader_compound_signs():
    positive, negative, neutral = SentimentJudge().score(["q"] * 3, [KIND, "I hate this, it is awful.", NEUTRAL])
    assert 0.5 < positive <= 1.0 and -1.0 <= negative < -0.5
    assert neutral == 0.0  # no word of "It is a table." is in VADER's lexicon


@pytest.fixture(scope="module")
def tiny_classifier_dir(tmp_path_factory):
    """A 2-layer BERT classifier with labels negative/neutral/positive and a WordPiece vocabulary trained here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    corpus = [INSULT, KIND, NEUTRAL, "Where is my order?", "The parcel arrives on Monday.",
              "Thank you so much for the quick refund.", "This product broke after one day."]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                     cls_token="[CLS]", sep_token="[SEP]")
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = BertConfig(vocab_size=len(hf_tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=hf_tok.pad_token_id,
                        id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("classifier") / "model"
    BertForSequenceClassification(config).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def test_classifier_judge_is_the_softmax_of_a_direct_forward_pass(tiny_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [KIND, "Where is my order?", "This product broke after one day, thank you so much."]
    judge = ClassifierJudge.load(tiny_classifier_dir, "positive", device="cpu", batch_size=2)
    got = judge.score(["q"] * 3, texts)  # batches of 2 with padding, then 1
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(**tok(t, return_tensors="pt")).logits, -1) for t in texts])
    assert got == pytest.approx(probs[:, 2].tolist(), abs=1e-5)  # column 2 is "positive"
    assert not torch.allclose(probs[:, 2], probs[:, 0], atol=1e-4)  # so the wrong column would be caught
    assert judge.name == "positive"

    with pytest.raises(ConfigError, match="no label 'happy'.*'negative', 'neutral', 'positive'"):
        ClassifierJudge.load(tiny_classifier_dir, "happy", device="cpu")
    with pytest.raises(ConfigError, match="no label was given"):
        ClassifierJudge.load(tiny_classifier_dir, None, device="cpu")


def test_reward_model_judge_equals_direct_score_after_save_and_load(tiny_model_dir, tmp_path):
    base, tok = load_model(str(tiny_model_dir), device="cpu")
    rm = ScalarHeadModel(base)
    torch.manual_seed(1)
    torch.nn.init.normal_(rm.head.weight)  # scores far from zero, so a mismatch shows
    rm.save_pretrained(tmp_path / "rm", tok)
    prompts = ["Where is my order?", "Hi", "Can I get a refund for a broken kettle?"]
    completions = ["It ships on Monday.", "Hello! How can I help you today?", "Yes."]
    judge = load_judge(base={"device": "cpu", "components": [
        {"judge": "reward", "path": str(tmp_path / "rm"), "batch_size": 2}]})
    got = judge.score(prompts, completions)
    rm.eval()
    with torch.no_grad():
        direct = [rm.score(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
                  for ids in (encode_response(tok, p, c, 512) for p, c in zip(prompts, completions))]
    assert got == pytest.approx(direct, abs=1e-4)
    assert max(direct) - min(direct) > 1e-2
    assert isinstance(judge.components[0].judge, RewardModelJudge)


def option_logprob(model, tok, question, answer_prefix, option):
    """log p(option | question) from one unpadded forward pass, summed over the option's tokens."""
    ctx = tok(render_prompt(tok, question) + answer_prefix, add_special_tokens=False)["input_ids"]
    opt = tok(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + opt])).logits[0].float(), -1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(opt))


def test_llm_pairwise_judge_probabilities_and_order_swap(tiny):
    """P(A) = e^lA / (e^lA + e^lB) from direct log-likelihoods of " (A)" and " (B)"; compare() averages
    both orders, compare(x, y) = (P_A(x, y) + 1 - P_A(y, x)) / 2, so compare(x, y) + compare(y, x) = 1."""
    model, tok = tiny
    judge = LLMPairwiseJudge(model, tok, "helpful_harmless", batch_size=3)
    prompts = ["Where is my order?", "Refund please"]
    x = ["It ships on Monday, you will get a tracking link.", "Sure."]
    y = ["No.", "Yes, I have refunded the full amount to your card."]
    p_a = judge.prob_first_option(prompts + prompts, x + y, y + x)  # padded batches of 3 and 1

    prompt = judge.prompt
    direct = []
    for p, first, second in zip(prompts + prompts, x + y, y + x):
        q = prompt.template.format(prompt=p, first=first, second=second, principle=prompt.principle)
        la, lb = (option_logprob(model, tok, q, prompt.answer_prefix, o) for o in prompt.options)
        direct.append(math.exp(la) / (math.exp(la) + math.exp(lb)))
    assert p_a.tolist() == pytest.approx(direct, abs=1e-5)
    # The tiny random model has a position bias: the same pair in both orders does not sum to 1 ...
    assert abs(direct[0] + direct[2] - 1) > 1e-3
    # ... and compare() cancels it.
    forward, backward = judge.compare(prompts, x, y), judge.compare(prompts, y, x)
    assert forward == pytest.approx([(direct[i] + 1 - direct[i + 2]) / 2 for i in range(2)], abs=1e-5)
    assert [f + b for f, b in zip(forward, backward)] == pytest.approx([1.0, 1.0], abs=1e-6)


def test_llm_rating_judge_is_the_expected_rating(tiny):
    model, tok = tiny
    judge = LLMRatingJudge(model, tok, "polite")
    prompt = judge.prompt
    q = prompt.template.format(prompt="Hi", completion="Hello there.", principle=prompt.principle)
    logps = torch.tensor([option_logprob(model, tok, q, prompt.answer_prefix, o) for o in prompt.options])
    expected = (torch.softmax(logps, 0) * torch.tensor(prompt.values)).sum().item()
    assert judge.score(["Hi"], ["Hello there."]) == pytest.approx([expected], abs=1e-4)
    assert 1.0 < expected < 5.0


def test_llm_judge_rejects_an_unknown_principle(tiny):
    with pytest.raises(ConfigError, match="no principle 'kindness'.*'helpful_harmless'"):
        LLMPairwiseJudge(*tiny, "kindness")


def test_weighted_composition_keeps_components():
    """helpful (weight 1) scores [0.5, 2.0], safe (weight -2) scores [0.1, 0.9]:
    totals 0.5 - 0.2 = 0.3 and 2.0 - 1.8 = 0.2, so the helpful but unsafe reply loses.
    Categories low < 0.25 <= mid < 0.5 <= high: 0.3 is mid, 0.2 is low, 0.25 itself is mid."""
    categories = Categories(labels=["low", "mid", "high"], thresholds=[0.25, 0.5])
    judge = ComposedJudge([Component("helpful", FixedJudge("h", [0.5, 2.0]), 1.0),
                           Component("safe", FixedJudge("s", [0.1, 0.9]), -2.0)], categories)
    first, second = judge.score_detailed(["p", "p"], ["a", "b"])
    assert (first.total, second.total) == pytest.approx((0.3, 0.2))
    assert first.components == {"helpful": 0.5, "safe": 0.1}
    assert (first.category, second.category) == ("mid", "low")
    assert [categories.label(s) for s in (0.25, 0.4999, 0.5, 7.0, -7.0)] == ["mid", "mid", "high", "high", "low"]
    assert judge.name == "helpful*1.0+safe*-2.0"
    assert judge.score(["p", "p"], ["a", "b"]) == pytest.approx([0.3, 0.2])


def test_scalar_and_categorical_toxicity_from_config():
    """reward = -toxicity is one component with weight -1; safe/borderline/toxic cut at 0.3 and 0.7."""
    toxicity = ToxicityJudge().score(["q", "q"], [INSULT, KIND])
    scalar = load_judge(base={"components": [{"judge": "toxicity", "weight": -1.0}]})
    assert scalar.score(["q", "q"], [INSULT, KIND]) == pytest.approx([-t for t in toxicity])
    categorical = load_judge(base={"components": [{"judge": "toxicity"}],
                                   "categories": {"labels": ["safe", "borderline", "toxic"],
                                                  "thresholds": [0.3, 0.7]}})
    assert [s.category for s in categorical.score_detailed(["q", "q"], [INSULT, KIND])] == ["toxic", "safe"]


def test_toxicity_above_a_threshold_scores_the_flagged_share():
    """With `above: 0.5` each reply scores 1 when its probability exceeds 0.5, else 0; weight -1 makes
    the mean over [INSULT, KIND, KIND, KIND] minus the flagged share, -1/4. Thresholds placed just
    below and just above the insult's own probability flip it, so the cut is the one configured."""
    texts = [INSULT, KIND, KIND, KIND]
    probs = ToxicityJudge().score(["q"] * 4, texts)
    flagged = load_judge(base={"components": [{"judge": "toxicity", "above": 0.5, "weight": -1.0}]})
    assert flagged.score(["q"] * 4, texts) == [-1.0, 0.0, 0.0, 0.0]
    assert sum(flagged.score(["q"] * 4, texts)) / 4 == -0.25
    assert ToxicityJudge(above=probs[0] - 1e-6).score(["q"], [INSULT]) == [1.0]
    assert ToxicityJudge(above=probs[0] + 1e-6).score(["q"], [INSULT]) == [0.0]
    with pytest.raises(ConfigError, match="above: Input should be less than 1"):
        load_judge(base={"components": [{"judge": "toxicity", "above": 1.5}]})


def test_repetition_penalty_beside_a_score_from_config():
    """"I am here to help you. I am here to help you." is 12 words: 10 word 3-grams, of which 6 are
    distinct ("i am here" .. "help you i", "you i am"), so 4/10 repeat an earlier one; its 11 2-grams
    have 6 distinct, 5/11 repeat. With weight -2 beside a constant 1 the total is 1 - 2 * repetition;
    a reply with no repeated n-gram keeps its 1."""
    looping = "I am here to help you. I am here to help you."
    judge = load_judge(base={"components": [{"judge": "repetition", "weight": -2.0}]})
    assert judge.score(["q", "q"], [looping, "Your refund is on its way today."]) == pytest.approx([-2 * 4 / 10, 0.0])
    composed = ComposedJudge([Component("proxy", FixedJudge("p", [1.0, 1.0]), 1.0),
                              Component("repetition", RepetitionJudge(n=2), -2.0)])
    assert composed.score(["q", "q"], [looping, "fine"]) == pytest.approx([1 - 2 * 5 / 11, 1.0])


def test_pairwise_component_scores_win_rates_within_groups(tiny):
    """A completion's score is its mean win probability against the others of its prompt; a group
    of n has n(n-1)/2 comparisons and its win rates sum to n/2."""
    judge = LLMPairwiseJudge(*tiny, "helpful_harmless")
    groups = [["Sure.", "No.", "It ships on Monday."], ["Hello!", "Go away."]]
    prompts = ["Where is my order?", "Hi"]
    rates = win_rates(judge, prompts, groups)
    ab, ac, bc = judge.compare([prompts[0]] * 3, ["Sure.", "Sure.", "No."], ["No.", "It ships on Monday.",
                                                                            "It ships on Monday."])
    assert rates[0] == pytest.approx([(ab + ac) / 2, (1 - ab + bc) / 2, (2 - ac - bc) / 2], abs=1e-5)
    assert sum(rates[0]) == pytest.approx(1.5) and sum(rates[1]) == pytest.approx(1.0)

    composed = ComposedJudge([Component("judge", judge, 2.0), Component("one", FixedJudge("n", [1] * 5), 0.5)])
    scored = composed.score_groups(prompts, groups)
    assert [len(g) for g in scored] == [3, 2]
    assert scored[1][0].total == pytest.approx(2.0 * rates[1][0] + 0.5, abs=1e-5)
    with pytest.raises(ConfigError, match="judge compare completions"):
        composed.score(["p"], ["a"])


def test_judge_config_from_yaml_and_errors_that_name_the_field(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text("components:\n"
                    "  - {name: helpful, judge: reward, path: runs/rm/final, weight: 1.0}\n"
                    "  - {name: safe, judge: toxicity, weight: -2.0}\n")
    cfg = load_config(JudgeConfig, path)
    assert [(c.name, c.judge, c.weight) for c in cfg.components] == [
        ("helpful", "reward", 1.0), ("safe", "toxicity", -2.0)]
    assert str(cfg.components[0].path) == "runs/rm/final"

    def error(raw):
        with pytest.raises(ConfigError) as info:
            load_config(JudgeConfig, base=raw)
        return str(info.value)

    assert "components.0.reward.path: Field required" in error({"components": [{"judge": "reward"}]})
    assert "components.0: Input tag 'vibes'" in error({"components": [{"judge": "vibes"}]})
    assert "components.0.toxicity.label: unknown key" in error({"components": [{"judge": "toxicity", "label": "x"}]})
    assert "components: Value error, component names must be distinct; repeated: toxicity" in error(
        {"components": [{"judge": "toxicity"}, {"judge": "toxicity", "weight": 2}]})
    assert "categories: Value error, 3 labels need 2 thresholds, got 1" in error(
        {"components": [{"judge": "toxicity"}], "categories": {"labels": ["a", "b", "c"], "thresholds": [0.5]}})
    assert "strictly increasing" in error(
        {"components": [{"judge": "toxicity"}], "categories": {"labels": ["a", "b", "c"], "thresholds": [0.7, 0.3]}})


def test_llm_judge_prefers_the_polite_helpful_reply_on_the_embedded_model():
    """Smoke test: one pairwise comparison, both orders, on SmolLM2-135M-Instruct."""
    judge = build_judge(JudgeConfig(device="cpu", components=[{"judge": "llm", "model": "embedded"}]))
    pairwise = judge.components[0].judge
    p = pairwise.compare(["Can you tell me how to reset my password?"],
                         ["Of course! Click 'Forgot password' on the login page and follow the link we email you."],
                         ["Figure it out yourself, you stupid idiot."])
    assert p[0] > 0.5
