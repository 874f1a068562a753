"""Decoding one prompt at a time while keeping the key/value cache of everything already read.

An agent calls its model again and again with prompts that begin alike: every step of a request is
the previous step's prompt plus the reply and the observation, and every request begins with the
same system prompt, tool descriptions and worked examples. `PrefixCachedDecoder` keeps one static
cache (transformers' `StaticCache`, as the rollout engine uses) and the token ids whose keys and
values it holds. A new prompt is compared with those ids: the cache is cut back to the longest
shared prefix (in place, no copy: the columns after it are simply written over) and only the rest
of the prompt goes through the model, so the shared prefix is computed once and read by every
later step and request.

    decoder = PrefixCachedDecoder(model, tokenizer)
    new_ids = decoder.generate(prompt_ids, max_new_tokens=96, logits_processor=grammar_processor)
    decoder.reused_tokens  # prompt tokens of the last call that were not run through the model again

The weights are the rollout engine's (`alignkit.models.rollout.engine_for`): a plain model decodes
from its own tensors, a LoRA (peft) model from a merged copy, re-synced when its weights change; a
change of weights also empties the cache, since the cached keys and values belong to the old ones.
The decode loop is the engine's (LM head on the last position only, the engine's seeded sampler);
it is written out here because the engine starts every batch from an empty cache.

`reuse=False` re-reads every prompt from the start: the same decoding, for measuring what reuse buys.

Greedy replies also draft tokens from what was read (prompt-lookup decoding, Saxena 2023; the
n-gram case of speculative decoding, Leviathan et al. 2023) and from the decoder's earlier replies
(`models.drafting`): when the last tokens of prompt + reply occurred before, the tokens that followed
them there are proposed (those the grammar allows), run
through the model in the same forward pass as the next token, and kept for as long as each is the
token greedy decoding picks at its position; the first that is not is replaced by the picked one.
An agent's replies copy much of what it read (order ids, SQL of the worked examples, JSON keys), so
several tokens often come from one pass. The tokens are greedy decoding's own; only the batching of
the passes differs (up to float rounding, and on CPUs with AMX the multi-token passes' products run
in bfloat16, `alignkit.models.cpu_linear`). `draft=0` (this class's default) turns it off; the agents'
`LocalBackend` drafts 8 (on the ShopBot 3.1 against 7.1 s per request, README).

Once the cache holds something, every pass (one token, forced tokens, drafts, a prompt's unread rest)
runs through `models.llama_decode` where the engine's model is one it supports, as the rollout
engine's decode steps do; a pass into an empty cache, and other models, take transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alignkit.errors import AlignkitError
from alignkit.models import llama_decode
from alignkit.models.drafting import ReplyHistory, lookup_draft
from alignkit.models.generation import eos_ids
from alignkit.models.sampling import row_seeds, sample, uniforms

MIN_CAPACITY = 1024
"""Smallest cache allocated, in tokens (46 kB per token for the embedded model in fp32)."""


def shared_prefix_length(cached: list[int], ids: list[int]) -> int:
    """Tokens at the start of `ids` whose keys and values `cached` already holds, leaving the last token
    of `ids` to be run (its logits give the first new token)."""
    n = 0
    for a, b in zip(cached, ids[:-1]):
        if a != b:
            break
        n += 1
    return n


class PrefixCachedDecoder:
    """Greedy or sampled decoding of a batch of one, reusing the cache of the longest prefix already read."""

    def __init__(self, model, tokenizer, *, reuse: bool = True, draft: int = 0):
        self.source, self.tokenizer, self.reuse, self.draft = model, tokenizer, reuse, draft
        self.eos = eos_ids(tokenizer, model)
        self.cache = None
        self.capacity = 0
        self.ids: list[int] = []
        """The tokens whose keys and values fill the cache's first len(ids) columns."""
        self._weights = None
        self._lean = False
        self.prompt_tokens = self.reused_tokens = self.forward_passes = 0
        self.drafted_tokens = self.accepted_tokens = 0
        """Of the last call: tokens proposed by lookup, and those kept."""
        self.history = ReplyHistory()
        """Earlier replies, where drafts are also looked up (models.drafting)."""

    def _model(self):
        """The engine's generation model; the cache is emptied when it or its weights changed."""
        from alignkit.models.rollout import engine_for

        engine = engine_for(self.source, self.tokenizer)
        weights = (id(engine.model), engine.version)
        if weights != self._weights:
            self._weights, self.ids = weights, []
        self._lean = engine.lean_decode and llama_decode.supports(engine.model)
        return engine.model

    def _cut(self, model, keep: int, needed: int) -> None:
        """Keep the cache's first `keep` columns and make room for `needed` in all."""
        from alignkit.models.rollout import filled_static_cache

        if needed > self.capacity:  # a new, bigger cache: what it should keep is read again
            self.capacity = max(MIN_CAPACITY, 1 << (needed - 1).bit_length())
            self.cache, keep = filled_static_cache(model.config, self.capacity), 0
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(keep)  # where the next keys are written
            layer.filled = keep  # how many columns attention reads
        del self.ids[keep:]

    @torch.inference_mode()
    def generate(self, ids: list[int], *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, grammar: str | None = None,
                 logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 stop: Callable[[list[int]], bool] | None = None) -> list[int]:
        """The new token ids after the prompt `ids`, up to and including EOS when it is produced.

        grammar: an llguidance grammar (`alignkit.models.constrained`): every drawn token is one the
        grammar allows, tokens the grammar forces are appended without drawing and run through the
        model together in one forward pass (jump-forward decoding), and the reply ends as soon as the
        grammar is complete. logits_processor(input_ids (1, T), scores (1, V)) -> scores, as in the
        rollout engine. stop(new_ids) -> True ends the reply after the token just drawn. With
        `draft` > 0, greedy (temperature 0) replies draft tokens by lookup in the prompt and in earlier
        replies (module docstring).
        """
        from alignkit.models.cpu_linear import rows_first_linears

        if not ids:
            raise ValueError("the prompt is empty")
        model = self._model()
        device = next(model.parameters()).device
        keep = shared_prefix_length(self.ids, ids) if self.reuse else 0
        needed = len(ids) + max_new_tokens
        self._cut(model, keep, needed)
        keep = len(self.ids)
        self.prompt_tokens, self.reused_tokens, self.forward_passes = len(ids), keep, 0
        self.drafted_tokens = self.accepted_tokens = 0
        if max_new_tokens <= 0:
            return []
        new: list[int] = []
        matcher = None
        if grammar is not None:
            matcher, bitmask = grammar_matcher(self.tokenizer, grammar, model.config.vocab_size, self.eos)
            new = matcher.compute_ff_tokens()[:max_new_tokens]  # what every reply begins with: read with the prompt
            if new and not matcher.consume_tokens(new):
                raise AlignkitError(f"the grammar's forced tokens broke it: {matcher.get_error()}")
            if matcher.is_stopped():
                return new
        feed = ids[keep:] + new  # tokens not in the cache yet
        seeds = row_seeds(seed, 1)
        drafting = self.draft > 0 and temperature == 0
        step = 0
        with rows_first_linears(model):
            while True:
                draft = (lookup_draft(ids + new, min(self.draft, max_new_tokens - len(new) - 1), history=self.history)
                         if drafting else [])
                if draft and matcher is not None:
                    draft = draft[:matcher.validate_tokens(draft)]
                run = feed + draft
                if self._lean and self.cache.layers[0].is_initialized:  # models.llama_decode
                    logits = llama_decode.read_block(model, torch.tensor(run, device=device), self.cache,
                                                     keep=len(draft) + 1)
                else:
                    logits = model(input_ids=torch.tensor([run], device=device),
                                   position_ids=torch.arange(len(self.ids), len(self.ids) + len(run), device=device)[None],
                                   past_key_values=self.cache, use_cache=True, logits_to_keep=len(draft) + 1).logits[0]
                cached = len(self.ids) + len(feed)  # columns that stay: the feed, then each draft token kept
                self.ids.extend(run)
                self.forward_passes += 1
                self.drafted_tokens += len(draft)
                done, forced = False, []
                for i in range(len(draft) + 1):  # position i predicts the token after run[len(feed) - 1 + i]
                    scores = logits[i:i + 1].float()
                    if logits_processor is not None:
                        scores = logits_processor(torch.tensor([ids + new], device=device), scores)
                    if matcher is not None:
                        mask_scores(matcher, bitmask, scores)
                    token = int(sample(scores, uniforms(seeds, step).to(device), temperature, top_k, top_p))
                    step += 1
                    new.append(token)
                    in_cache = i < len(draft) and token == draft[i]  # the drafted token, already run
                    cached += in_cache
                    self.accepted_tokens += in_cache
                    if matcher is not None:
                        if not matcher.consume_token(token):
                            raise AlignkitError(f"token {token} broke the grammar: {matcher.get_error()}")
                        if matcher.is_stopped():  # complete: only the end of the reply could follow
                            done = True
                            break
                        forced = matcher.compute_ff_tokens()[:max_new_tokens - len(new)]
                        if forced and not matcher.consume_tokens(forced):
                            raise AlignkitError(f"the grammar's forced tokens broke it: {matcher.get_error()}")
                    if token in self.eos or (stop is not None and stop(new)) or len(new) + len(forced) >= max_new_tokens:
                        done = True
                        break
                    if forced or not in_cache:  # drafts after this point no longer follow the reply
                        break
                self._cut(model, cached, needed)  # drop the columns of drafts not kept
                if done:
                    new += forced
                    break
                feed = ([] if in_cache else [new[-1]]) + forced
                new += forced
        if drafting:
            self.history.add(new)
        return new


def grammar_matcher(tokenizer, grammar: str, n_vocab: int, eos: list[int]):
    """(llguidance matcher of `grammar`, its token bitmask), over the tokenizer's vocabulary."""
    import llguidance
    import llguidance.torch as llt

    from alignkit.models.constrained import _ll_tokenizer  # built once per tokenizer (about a second)

    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, n_vocab, tuple(eos)), grammar)
    if matcher.is_error():
        raise AlignkitError(f"the grammar cannot be used: {matcher.get_error()}")
    return matcher, llt.allocate_token_bitmask(1, n_vocab)


def mask_scores(matcher, bitmask: torch.Tensor, scores: torch.Tensor) -> None:
    """Set the scores (1, V) of every token the grammar does not allow next to -inf, in place."""
    import llguidance.torch as llt

    from alignkit.models.constrained import apply_bitmask

    llt.fill_next_token_bitmask(matcher, bitmask, 0)
    apply_bitmask(scores, bitmask)
