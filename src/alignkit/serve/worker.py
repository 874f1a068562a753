"""Dynamic batching: one worker thread runs the model; requests that arrive while a batch decodes
join the next one.

    worker = BatchWorker(model, tokenizer, max_batch=32, max_queue=64); worker.start()
    job = worker.submit(prompt_ids, params, loop)      # raises APIError 503 when the queue is full
    async for event in job.events(): ...               # ("delta", choice, text, logprob), ("finish", ...)

The worker waits briefly while a burst of requests is still arriving (see _next_batch), then takes
the oldest waiting request and every other waiting request with the same sampling settings
(temperature, top_p, top_k: the engine samples a batch with one setting) until `max_batch` rows,
and decodes them together on the rollout engine. Everything per row rides on the
engine's per-row hooks: each row's own seed, its own max_tokens, stop strings and EOS handling in
`on_step` (which also streams each new token out), and `ignore_eos` / log-probs / a grammar
(response_format, tools) in the logits processor: rows with and without a grammar share a batch,
each masked by its own matcher. A request whose client went away is marked cancelled and its rows are stopped at the
next step; the batch ends when all its rows have.

Only requests waiting for a batch count against `max_queue`; past it, submit() refuses with 503
and a Retry-After estimated from recent batch times.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from alignkit.models.constrained import RowGrammarProcessor
from alignkit.models.rollout import RolloutEngine
from alignkit.models.sampling import row_seeds
from alignkit.serve.errors import APIError, overloaded
from alignkit.serve.protocol import Params

GATHER_QUIET_S = 0.005  # a batch starts once no request arrived for this long...
GATHER_MAX_S = 0.1      # ...or this long after the first one


@dataclass
class Choice:
    """One completion being decoded: its tokens, the text released so far, why it ended."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[str, float, list[tuple[str, float]]]] = field(default_factory=list)
    text: str = ""           # the final text once finished; before that, what was released
    finish_reason: str | None = None


class Job:
    """One HTTP request: n choices per prompt, and a queue of events for the handler to read."""

    def __init__(self, prompts: list[list[int]], params: Params, loop: asyncio.AbstractEventLoop):
        self.prompts, self.params, self.loop = prompts, params, loop
        self.choices = [Choice() for _ in range(len(prompts) * params.n)]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.plan = None  # the request's StructuredPlan (serve/structured.py), read by the HTTP handler

    @property
    def rows(self) -> int:
        return len(self.choices)

    def emit(self, *event) -> None:
        """Hand an event to the request's event loop (called from the worker thread)."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self):
        """Events until the request is done: ("delta", i, text, logprob_entry | None) as text is
        released, ("finish", i, reason) per choice, then ("done",) or ("error", APIError)."""
        while True:
            event = await self.queue.get()
            yield event
            if event[0] in ("done", "error"):
                return


class TextState:
    """Incremental detokenization of one row with stop strings.

    Text is released only when it is final: not the start of a multi-byte character still being
    decoded (U+FFFD at the end), and not possibly the start of a stop string (the last
    len(longest stop) - 1 characters are held back). Chat replies drop leading whitespace.
    """

    def __init__(self, tokenizer, stop: list[str], strip: bool):
        self.tokenizer, self.stop, self.strip = tokenizer, stop, strip
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.released = 0

    def text(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text.lstrip() if self.strip else text

    def step(self, tokens: list[int]) -> tuple[str, bool]:
        """(newly released text, whether a stop string ended the row)."""
        text = self.text(tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta, self.released = text[self.released:cut], max(self.released, cut)
            return delta, True
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe <= self.released:
            return "", False
        delta, self.released = text[self.released:safe], safe
        return delta, False

    def flush(self, tokens: list[int]) -> str:
        """The rest of the text once the row ended without a stop string."""
        text = self.text(tokens)
        delta, self.released = text[self.released:], len(text)
        return delta


class BatchWorker:
    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 64):
        self.engine = RolloutEngine(model, tokenizer, copy_weights=False)
        self.tokenizer = tokenizer
        self.eos = self.engine.eos
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Job] = deque()
        self.cond = threading.Condition()
        self.running_rows = 0
        self.batch_seconds = 1.0  # running mean of recent batch durations, for Retry-After
        self.stats = {"requests": 0, "batches": 0, "rows": 0, "rejected": 0, "cancelled": 0,
                      "cancelled_rows": 0, "largest_batch": 0}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="alignkit-batch-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, prompts: list[list[int]], params: Params, loop) -> Job:
        job = Job(prompts, params, loop)
        if job.rows > self.max_batch:
            raise APIError(400, f"{job.rows} completions in one request (prompts x n) exceed the batch size "
                                f"{self.max_batch}", param="n")
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                self.stats["rejected"] += 1
                waiting_rows = sum(j.rows for j in self.waiting)
                batches = 1 + waiting_rows / self.max_batch
                raise overloaded(max(1, math.ceil(self.batch_seconds * batches)), len(self.waiting))
            self.waiting.append(job)
            self.stats["requests"] += 1
            self.cond.notify()
        return job

    def health(self) -> dict:
        with self.cond:
            return {"waiting": len(self.waiting), "running_rows": self.running_rows, **self.stats}

    # ------------------------------------------------------------------------------------------
    # The worker thread

    def _next_batch(self) -> list[Job]:
        """The oldest waiting job plus later ones with the same sampling settings, up to max_batch rows.

        A burst of requests reaches the worker one by one as the event loop parses them, so before
        starting a batch the worker waits while requests keep arriving: until none came for
        GATHER_QUIET_S, GATHER_MAX_S passed, or max_batch rows wait. A lone request pays GATHER_QUIET_S.
        """
        with self.cond:
            while not self.waiting and not self._stop:
                self.cond.wait()
            deadline = time.perf_counter() + GATHER_MAX_S
            while not self._stop and sum(j.rows for j in self.waiting) < self.max_batch:
                seen = len(self.waiting)
                self.cond.wait(timeout=min(GATHER_QUIET_S, max(0.0, deadline - time.perf_counter())))
                if len(self.waiting) == seen or time.perf_counter() >= deadline:
                    break
            if self._stop:
                return []
            first = self.waiting.popleft()
            batch, rows, key = [first], first.rows, first.params.sampling_key()
            for job in list(self.waiting):
                if job.params.sampling_key() == key and rows + job.rows <= self.max_batch:
                    self.waiting.remove(job)
                    batch.append(job)
                    rows += job.rows
            self.running_rows = rows
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            batch = [job for job in batch if not self._drop_if_cancelled(job)]
            if not batch:
                continue
            start = time.perf_counter()
            try:
                self._decode(batch)
                for job in batch:
                    job.emit("done")
            except Exception as e:  # the model failed: every request of the batch gets a 500
                err = APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
                for job in batch:
                    job.emit("error", err)
            seconds = time.perf_counter() - start
            with self.cond:
                self.batch_seconds = 0.7 * self.batch_seconds + 0.3 * seconds
                self.running_rows = 0
                self.stats["batches"] += 1
                self.stats["rows"] += sum(j.rows for j in batch)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], sum(j.rows for j in batch))

    def _drop_if_cancelled(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self.stats["cancelled"] += 1
            job.emit("done")
            return True
        return False

    def _decode(self, batch: list[Job]) -> None:
        # Rows in batch order: job j's prompt i, choice c at rows[j] + i * n + c.
        rows = [(job, k) for job in batch for k in range(job.rows)]
        prompts = [job.prompts[k // job.params.n] for job, k in rows]
        seeds = []
        for job in batch:
            for i in range(len(job.prompts)):
                seed = job.params.seed if job.params.seed is not None else random.getrandbits(62)
                # Choice c of a seeded request always draws from the same stream, whatever its batch.
                seeds += row_seeds(seed + i * 1_000_003, job.params.n).tolist()
        states = [TextState(self.tokenizer, job.params.stop, job.params.chat) for job, _ in rows]
        limits = torch.tensor([job.params.max_tokens for job, _ in rows])
        ignore_eos = torch.tensor([job.params.ignore_eos for job, _ in rows])
        want_logprobs = any(job.params.logprobs for job in batch)
        params = batch[0].params
        step_logprobs: list[torch.Tensor] = []
        eos = torch.tensor(self.eos)
        scale = params.temperature if params.temperature > 0 else 1.0

        grammars = RowGrammarProcessor(self.tokenizer, [job.params.grammar for job, _ in rows],
                                       eos_token_ids=self.eos)

        def processor(input_ids, scores):
            if want_logprobs:  # the model's own distribution, before ignore_eos or a grammar masks it
                step_logprobs[:] = [torch.log_softmax(scores.float() / scale, dim=-1)]
            if ignore_eos.any():
                scores[ignore_eos.nonzero()[:, :1], eos[None, :]] = float("-inf")
            return grammars(input_ids, scores, skip=stopped)

        stopped = torch.zeros(len(rows), dtype=torch.bool)

        def on_step(step, tokens, finished):
            new_stop = torch.zeros(len(rows), dtype=torch.bool)
            for r, (job, k) in enumerate(rows):
                if stopped[r]:
                    continue
                choice, token = job.choices[k], int(tokens[r])
                if job.cancelled.is_set():  # the client went away: stop the row at this step
                    stopped[r] = new_stop[r] = True
                    self.stats["cancelled_rows"] += 1
                    continue
                choice.tokens.append(token)
                entry = self._logprob_entry(step_logprobs[0][r], token, job.params) if job.params.logprobs else None
                if entry is not None:
                    choice.logprobs.append(entry)
                if job.first_token_at is None:
                    job.first_token_at = time.perf_counter()
                reason = None
                if token in self.eos and not job.params.ignore_eos:
                    delta, reason = states[r].flush(choice.tokens), "stop"
                else:
                    delta, hit_stop = states[r].step(choice.tokens)
                    if hit_stop:
                        reason = "stop"
                    elif len(choice.tokens) >= limits[r]:
                        delta, reason = delta + states[r].flush(choice.tokens), "length"
                job.emit("delta", k, delta, entry)
                if reason is not None:
                    choice.finish_reason = reason
                    choice.text = states[r].text(choice.tokens)[:states[r].released]
                    stopped[r] = new_stop[r] = True
                    job.emit("finish", k, reason)
            return new_stop

        self.engine.generate(prompts, n=1, max_new_tokens=int(limits.max()), temperature=params.temperature,
                             top_p=params.top_p, top_k=params.top_k, seed=seeds, chat=False,
                             logits_processor=processor, on_step=on_step)
        for r, (job, k) in enumerate(rows):  # rows the engine ended without on_step stopping them
            if not stopped[r] and not job.cancelled.is_set():
                choice = job.choices[k]
                delta = states[r].flush(choice.tokens)
                if delta:
                    job.emit("delta", k, delta, None)
                choice.finish_reason = "length"
                choice.text = states[r].text(choice.tokens)
                job.emit("finish", k, "length")

    def _logprob_entry(self, logprobs: torch.Tensor, token: int, params: Params):
        """(token text, its log-prob, [(text, log-prob)] of the top_logprobs most likely tokens)."""
        top = []
        if params.top_logprobs:
            values, ids = logprobs.topk(params.top_logprobs)
            top = [(self.tokenizer.decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]
        return self.tokenizer.decode([token]), float(logprobs[token]), top
