"""Fixtures for the RAG tests: the shipped MiniLM embedder and tokenizer, and a BPE tokenizer trained on the spot.

The embedder is loaded once per session (about 10 s of imports and weights); everything else is small.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

CORPUS = Path(__file__).resolve().parents[3] / "src" / "alignkit" / "data" / "rag_corpus"


@pytest.fixture(scope="session")
def embedder():
    from alignkit.apps.rag.embed import DEFAULT_MODEL_NAME, load_embedder

    return load_embedder(DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from alignkit.apps.rag.embed import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (400 tokens) trained on the shipped corpus, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.read_text(encoding="utf-8") for p in sorted((CORPUS / "docs").rglob("*")) if p.is_file()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
