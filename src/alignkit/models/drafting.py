"""Draft tokens for greedy decoding by lookup: in what the reply read (prompt lookup, Saxena 2023) and in
the replies decoded before it (the retrieval case of speculative decoding: REST, He et al. 2024, draws
drafts from a datastore of earlier text; here the datastore is the decoder's own recent replies).

The drafts are only proposals: the decoder runs them through the model with the next token and keeps
each only while it is the token greedy decoding picks there (`models.prefix_cache`), so where a draft
comes from never changes a reply, only how many forward passes it takes.

Why earlier replies: an agent writes the same structures again and again. The ShopBot's first step
of every request is a SQL query of the same shape (`SELECT o.id, c.email FROM customers c JOIN orders
o ...`) that its prompt does not contain, so prompt lookup kept 4 of 97 drafted tokens there; the
previous request's query predicts most of it.

    history = ReplyHistory()
    draft = lookup_draft(prompt + reply, 8, history=history)   # [] when nothing matches
    history.add(reply)                                         # after each reply
"""

from __future__ import annotations

from collections import deque

NGRAMS = (3, 2)
"""Lengths of the context's last tokens looked up, longest first."""


class ReplyHistory:
    """The most recent replies (at most `max_tokens` tokens in all), with the latest occurrence of each
    n-gram indexed, so a lookup costs one dictionary probe per n."""

    def __init__(self, max_tokens: int = 4096, ngrams: tuple[int, ...] = NGRAMS):
        self.max_tokens, self.ngrams = max_tokens, ngrams
        self.replies: deque[tuple[int, list[int]]] = deque()  # (serial number, tokens), oldest first
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (serial, position after it)
        self.tokens = 0
        self._serial = 0

    def add(self, reply: list[int]) -> None:
        """Remember `reply`; the oldest replies are forgotten once more than max_tokens are held."""
        if not reply:
            return
        reply = list(reply[-self.max_tokens:])
        serial = self._serial
        self._serial += 1
        self.replies.append((serial, reply))
        self.tokens += len(reply)
        for n in self.ngrams:
            for end in range(n, len(reply)):  # an n-gram with at least one token after it
                self.index[tuple(reply[end - n:end])] = (serial, end)
        while self.tokens > self.max_tokens:
            gone, old = self.replies.popleft()
            self.tokens -= len(old)
            for n in self.ngrams:  # its index entries, where no later reply took them over
                for end in range(n, len(old)):
                    key = tuple(old[end - n:end])
                    if self.index.get(key, (None,))[0] == gone:
                        del self.index[key]

    def lookup(self, tail: list[int], max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest occurrence of `tail` in a remembered reply."""
        hit = self.index.get(tuple(tail))
        if hit is None or max_tokens <= 0:
            return []
        serial, end = hit
        first = self.replies[0][0] if self.replies else serial + 1
        if serial < first:  # that reply was forgotten
            return []
        return self.replies[serial - first][1][end:end + max_tokens]


def lookup_draft(context: list[int], max_tokens: int, ngrams: tuple[int, ...] = NGRAMS,
                 history: ReplyHistory | None = None) -> list[int]:
    """Up to `max_tokens` tokens that followed an earlier occurrence of the context's last n tokens,
    trying each n of `ngrams` in turn (longest first): the latest occurrence in the context itself,
    else the latest in `history`'s replies. [] when none occurred before."""
    if max_tokens <= 0:
        return []
    for n in ngrams:
        if len(context) <= n:
            continue
        tail = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start:start + n] == tail:
                return context[start + n:start + n + max_tokens]
        if history is not None:
            found = history.lookup(tail, max_tokens)
            if found:
                return found
    return []
