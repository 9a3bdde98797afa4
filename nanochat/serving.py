"""Serving machinery under the chat server (nanochat/chat_server.py), apart from HTTP: workers and their
batches, the requests decoded on them, and the counters /stats and /metrics report.

- `WorkerPool` hands out rows of the workers' batches: a request with `n` choices waits (first come,
  first served) until one worker has n rows free.
- `BatchWorker` is one thread per worker decoding every request it holds together on an
  engine.BatchDecoder (the decode loop every generator shares): a request joins as soon as it arrives
  (its prompt prefilled alone, its other choices forked from it), a finished or cancelled row leaves.
- `Generation` is one request on a worker; each of its `Choice`s turns tokens into text pieces, cuts
  stop strings out (holding back a tail that could still become one) and releases logprob entries
  with the text they belong to. Events reach the event loop through an asyncio queue.
- `Stats` and `prometheus()`: requests by status, tokens, time to first token and latency histograms.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from nanochat.chat_session import ReplyStream
from nanochat.engine import StopText, StreamDecoder
from nanochat.openai_api import MAX_N, RequestError, Sampling


def log(message: str) -> None:
    print(f"chat_web: {message}", file=sys.stderr, flush=True)

# ---------------------------------------------------------------------------------------------
# metrics


class Histogram:
    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

    def __init__(self):
        self.counts = [0] * len(self.BUCKETS)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.BUCKETS):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    ttft: list = field(default_factory=list)  # seconds, last 1000 requests
    decode_rate: list = field(default_factory=list)  # tokens/s after the first token, last 1000
    by_status: dict = field(default_factory=dict)  # (endpoint, status) -> requests
    ttft_hist: Histogram = field(default_factory=Histogram)
    latency_hist: Histogram = field(default_factory=Histogram)

    def record(self, finish: str, tokens: int, ttft: float | None, rate: float | None, latency: float) -> None:
        self.tokens += tokens
        if finish == "cancelled":
            self.cancelled += 1
        elif finish == "error":
            self.errors += 1
        else:
            self.completed += 1
        for series, value in ((self.ttft, ttft), (self.decode_rate, rate)):
            if value is not None:
                series.append(value)
                del series[:-1000]
        if ttft is not None:
            self.ttft_hist.observe(ttft)
        self.latency_hist.observe(latency)


def prometheus(stats: Stats, pool: "WorkerPool") -> str:
    lines = ["# HELP nanochat_requests_total API requests answered, by endpoint and HTTP status",
             "# TYPE nanochat_requests_total counter"]
    for (endpoint, status), n in sorted(stats.by_status.items()):
        lines.append(f'nanochat_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
    for name, kind, value, doc in (
            ("nanochat_prompt_tokens_total", "counter", stats.prompt_tokens, "prompt tokens of accepted requests"),
            ("nanochat_completion_tokens_total", "counter", stats.tokens, "tokens generated"),
            ("nanochat_queue_depth", "gauge", pool.waiting, "requests waiting for free rows"),
            ("nanochat_slots_busy", "gauge", pool.active, "decode rows in use"),
            ("nanochat_slots_free", "gauge", pool.slots - pool.active, "decode rows free")):
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    for name, hist, doc in (("nanochat_time_to_first_token_seconds", stats.ttft_hist,
                             "request received -> first token generated"),
                            ("nanochat_request_duration_seconds", stats.latency_hist,
                             "request received -> last token generated")):
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} histogram"] + hist.lines(name)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# workers


@dataclass
class Worker:
    index: int
    engine: object
    rows: int = 1  # rows it decodes together
    active: int = 0  # rows held by its requests now
    batcher: object = None
    requests: int = 0
    tokens: int = 0

    @property
    def busy(self) -> bool:
        return self.active > 0


class WorkerPool:
    """Rows of the workers' batches, handed to requests: `await acquire(n)` waits (first come, first
    served) until one worker has n free rows, preferring the least loaded; `release` runs on the event loop.
    `check_queue()` (before a request is accepted) refuses it with a 503 when `max_queue` already wait."""

    def __init__(self, engines: list, rows: int = 8, max_queue: int = 256):
        if not engines:
            raise ValueError("the server needs at least one model")
        if rows < 1:
            raise ValueError(f"--batch-size must be >= 1, got {rows}")
        self.workers = [Worker(i, e) for i, e in enumerate(engines)]
        for w in self.workers:
            w.batcher = BatchWorker(w, rows)
            w.rows = w.batcher.decoder.rows  # capped by the KV cache's memory budget
        self.max_queue = max_queue
        self._waiters: deque = deque()

    @property
    def waiting(self) -> int:
        return sum(not f.done() for _, f in self._waiters)

    @property
    def max_n(self) -> int:
        return min(MAX_N, max(w.rows for w in self.workers))

    def _pick(self, n: int) -> Worker | None:
        fits = [w for w in self.workers if w.rows - w.active >= n]
        return min(fits, key=lambda w: (w.active / w.rows, w.index)) if fits else None

    def _take(self, worker: Worker, n: int) -> Worker:
        worker.active += n
        worker.requests += 1
        return worker

    async def acquire(self, n: int = 1) -> Worker:
        worker = None if self._waiters else self._pick(n)
        if worker is not None:
            return self._take(worker, n)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # rows granted just as the client went away
                self.release(fut.result(), n)
            raise

    def check_queue(self) -> None:
        if self.waiting >= self.max_queue and self._pick(1) is None:
            raise RequestError(f"the server is busy: {self.waiting} requests are queued (limit {self.max_queue}); "
                               f"retry later", status=503, kind="server_error")

    def release(self, worker: Worker, n: int) -> None:  # on the event loop
        worker.active -= n
        while self._waiters:
            need, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            w = self._pick(need)
            if w is None:
                return
            self._waiters.popleft()
            fut.set_result(self._take(w, need))

    @property
    def busy(self) -> int:
        return sum(w.busy for w in self.workers)

    @property
    def active(self) -> int:
        return sum(w.active for w in self.workers)

    @property
    def slots(self) -> int:
        return sum(w.rows for w in self.workers)


class _TextStream:
    """Plain decoded text as (part, text) pieces, the completions' twin of ReplyStream."""

    def __init__(self, tokenizer):
        self._decoder = StreamDecoder(tokenizer)

    def feed(self, token: int, mask: int = 1) -> list[tuple[str, str]]:
        text = self._decoder.push(token)
        return [("text", text)] if text else []

    def close(self) -> list[tuple[str, str]]:
        text = self._decoder.flush()
        return [("text", text)] if text else []


class Choice:
    """One choice of a request: tokens -> pieces of text, stop strings cut out (with a possible stop
    prefix held back), logprob entries released with the text they belong to."""

    def __init__(self, index: int, tokenizer, chat: bool, stop: tuple[str, ...]):
        self.index = index
        self.text = ReplyStream(tokenizer) if chat else _TextStream(tokenizer)
        self.stop = StopText(stop)
        self.pending: deque = deque()  # pieces [part, text] not yet released
        self.entries: deque = deque()  # (start char, entry) not yet released
        self.pushed = 0  # characters of text pushed so far
        self.released = 0  # ... and released
        self.tokens = 0
        self.finish: str | None = None

    def _take(self, n: int) -> list[tuple[str, str]]:
        out = []
        while n > 0 and self.pending:
            part, text = self.pending[0]
            if len(text) <= n:
                out.append((part, text))
                self.pending.popleft()
                n -= len(text)
            else:
                out.append((part, text[:n]))
                self.pending[0][1] = text[n:]
                n = 0
        return out

    def _entries(self, final: bool) -> list:
        out = []
        while self.entries and (final or self.entries[0][0] < self.released):
            out.append(self.entries.popleft()[1])
        return out

    def feed(self, token: int, mask: int, entry=None) -> tuple[list, list]:
        """(pieces, logprob entries) now safe to send."""
        self.tokens += 1
        if entry is not None:
            self.entries.append((self.pushed, entry))
        out = []
        for part, text in self.text.feed(token, mask):
            if self.stop.hit:
                break
            self.pending.append([part, text])
            self.pushed += len(text)
            released = self.stop.push(text)
            out += self._take(len(released))
            self.released += len(released)
            if self.stop.hit:
                self.pending.clear()
                self.entries = deque(e for e in self.entries if e[0] < self.released)
        return out, self._entries(False)

    def close(self) -> tuple[list, list]:
        out = []
        if not self.stop.hit:
            for part, text in self.text.close():
                self.pending.append([part, text])
            out = self._take(sum(len(t) for _, t in self.pending))
        return out, self._entries(True)


class Generation:
    """One request on a worker: its `n` choices are rows of the worker's batch. Events reach the event
    loop through an asyncio queue: ("pieces", choice, pieces, entries), ("done", choice, finish_reason),
    ("prompt_logprobs", [(logprob, top)]), ("error", message). `feed`, `finish` and `fail` run on the
    worker's thread."""

    def __init__(self, pool: WorkerPool, stats: Stats, worker: Worker, sampling: Sampling, prompt: list[int],
                 chat: bool, events: asyncio.Queue, first_index: int = 0, score: int | None = None,
                 t0: float | None = None):
        self.pool, self.stats, self.worker, self.sampling, self.prompt = pool, stats, worker, sampling, prompt
        self.events, self.score = events, score
        tok = worker.engine.tokenizer
        self.tokenizer = tok
        self.choices = [Choice(first_index + i, tok, chat, sampling.stop) for i in range(sampling.n)]
        self.cancel = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.t0, self.t_first = t0 or time.perf_counter(), None
        self.open = sampling.n
        self.failed = False
        worker.batcher.submit(self)

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def prompt_logprobs(self, scores) -> None:
        self._put(("prompt_logprobs", scores))

    def feed(self, i: int, token: int, mask: int, logprob=None, top=None) -> bool:
        """Token of choice i; True when its text just hit a stop string (the caller ends the row)."""
        if self.t_first is None:
            self.t_first = time.perf_counter()
        c = self.choices[i]
        entry = None  # a stop token is no part of the content: no logprob entry either
        if logprob is not None and not (mask == 1 and token in self.worker.batcher.decoder.stops):
            entry = (token, logprob, top)
        hit_before = c.stop.hit
        pieces, entries = c.feed(token, mask, entry)
        if pieces or entries:
            self._put(("pieces", c.index, pieces, entries))
        return c.stop.hit and not hit_before

    def finish(self, i: int, reason: str) -> None:
        """Choice i is over: "stop", "length" or "cancelled"."""
        c = self.choices[i]
        if c.finish is not None:
            return
        pieces, entries = c.close()
        if pieces or entries:
            self._put(("pieces", c.index, pieces, entries))
        if c.stop.hit or getattr(c.text, "finish_reason", None) == "stop":
            reason = "stop"
        c.finish = reason
        self._put(("done", c.index, reason))
        self.open -= 1
        if self.open == 0:
            self._close(reason)

    def fail(self, message: str) -> None:
        if self.failed or self.open == 0:
            return
        self.failed = True
        self.open = 0
        self._put(("error", message))
        self._close("error")

    def finish_all(self, reason: str) -> None:
        for i in range(len(self.choices)):
            self.finish(i, reason)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def _close(self, finish: str) -> None:
        t_end = time.perf_counter()
        tokens = self.completion_tokens
        ttft = (self.t_first - self.t0) if self.t_first is not None else None
        rows = len(self.choices)
        rate = (tokens / rows - 1) / (t_end - self.t_first) if self.t_first is not None and tokens > rows \
            and t_end > self.t_first else None
        self.worker.tokens += tokens
        self.stats.record(finish, tokens, ttft, rate, t_end - self.t0)
        self.loop.call_soon_threadsafe(self.pool.release, self.worker, rows)


class BatchWorker:
    """One thread decoding all of a worker's requests together (continuous batching, engine.BatchDecoder):
    a request joins the batch as soon as it arrives (its prompt prefilled alone, its other choices
    forked from it), every forward then advances all rows by one token, and a finished or cancelled
    row leaves at once."""

    def __init__(self, worker: Worker, rows: int):
        self.worker = worker
        self.decoder = worker.engine.decoder(rows)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"chat-batch-{worker.index}", daemon=True)
        self.thread.start()

    def submit(self, gen: Generation) -> None:
        self.inbox.put(gen)

    def _start(self, gen: Generation, live: dict) -> None:
        s = gen.sampling
        if gen.score is not None:  # echo + logprobs: the prompt's own token logprobs
            gen.prompt_logprobs(self.decoder.score(gen.prompt, gen.score))
        if s.max_tokens == 0:
            gen.finish_all("length")
            return
        first = self.decoder.add(gen.prompt, s.max_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                 seed=s.seed, presence_penalty=s.presence_penalty,
                                 frequency_penalty=s.frequency_penalty, logprobs=s.logprobs, stop=s.stop)
        if first is None:  # the prompt fills the context: empty replies
            gen.finish_all("length")
            return
        keys = [first] + [self.decoder.fork(first, s.seed + i) for i in range(1, s.n)]
        for i, key in enumerate(keys):
            live[key] = (gen, i)

    def _admit(self, live: dict) -> None:
        while self.decoder.free:
            try:
                gen = self.inbox.get(block=not live)  # idle: sleep until a request comes
            except queue.Empty:
                return
            if gen.cancel.is_set():
                gen.finish_all("cancelled")
                continue
            try:
                self._start(gen, live)
            except Exception as e:
                for key in [k for k, (g, _) in live.items() if g is gen]:
                    self.decoder.drop(key)
                    del live[key]
                gen.fail(f"generation failed: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        live: dict[int, tuple[Generation, int]] = {}
        while True:
            try:
                self._admit(live)
                for key, (gen, i) in list(live.items()):
                    if gen.cancel.is_set():  # the client went away
                        self.decoder.drop(key)
                        del live[key]
                        gen.finish(i, "cancelled")
                for ev in self.decoder.step():
                    gen, i = live[ev.key]
                    hit = gen.feed(i, ev.token, ev.mask, ev.logprob, ev.top)
                    if hit and not ev.finished:  # a stop string seen in the content (tool markers included)
                        self.decoder.drop(ev.key)
                    if ev.finished or hit:
                        del live[ev.key]
                        gen.finish(i, ev.reason or "stop")
            except Exception as e:  # every request of the batch fails alike; the worker starts afresh
                for gen, _ in live.values():
                    gen.fail(f"generation failed: {type(e).__name__}: {e}")
                live.clear()
                self.decoder = self.worker.engine.decoder(self.decoder.rows)
