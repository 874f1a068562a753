"""eval's completion cache: completions kept batch by batch, a stopped evaluation continues to the
file an uninterrupted one writes, and cached completions equal freshly generated ones."""

import pytest

from alignkit.evaluate.completion_cache import CompletionCache
from alignkit.io import ResumableJsonl
from alignkit.models import generate

PROMPTS = [f"Tell me about item {i}." for i in range(5)]


class Interrupted(Exception):
    """Raised in place of a kill, right after a batch has been appended."""


def test_stopped_evaluation_continues_to_the_uninterrupted_cache(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    models = {"base": "tiny", "other": "tiny-too"}
    cache = lambda path: CompletionCache(path, models, PROMPTS, max_new_tokens=6, batch_size=2)

    full = cache(tmp_path / "full.jsonl")
    gens = {name: full.generate(name, model, tok) for name in models}
    direct = generate(model, tok, PROMPTS, max_new_tokens=6)
    assert gens["base"].texts == direct.texts and gens["base"].tokens == direct.tokens
    assert gens["base"].prompt_ids == direct.prompt_ids and gens["base"].finished == direct.finished

    original = ResumableJsonl.append
    calls = []

    def append_then_stop(self, records, done):
        original(self, records, done)
        calls.append(done)
        if len(calls) == 4:  # inside the second model
            raise Interrupted

    monkeypatch.setattr(ResumableJsonl, "append", append_then_stop)
    part = cache(tmp_path / "part.jsonl")
    with pytest.raises(Interrupted):
        for name in models:
            part.generate(name, model, tok)
    monkeypatch.setattr(ResumableJsonl, "append", original)
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"model": "other", "ind')  # torn: dropped and redone
    resumed = cache(tmp_path / "part.jsonl")
    again = {name: resumed.generate(name, model, tok) for name in models}
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert again["other"].texts == gens["other"].texts and again["base"].tokens == gens["base"].tokens

    # A finished cache is reused whole: nothing is generated again.
    monkeypatch.setattr("alignkit.evaluate.completion_cache.generate_with_kl", lambda *a, **k: pytest.fail("generated"))
    reused = cache(tmp_path / "full.jsonl")
    assert reused.generate("other", model, tok).texts == gens["other"].texts
