"""The chat server behind scripts/chat_web.py: a web page and an OpenAI-compatible API on one engine.

    GET  /                      the chat page (nanochat/assets/chat.html: one self-contained file)
    POST /v1/chat/completions   OpenAI Chat Completions (`stream` false: one `chat.completion`; true:
                                Server-Sent Events of `chat.completion.chunk` objects ending `data: [DONE]`)
    POST /v1/completions        OpenAI (legacy) Completions, for base models and evaluation harnesses:
                                `echo` + `logprobs` score a prompt (lm-evaluation-harness `local-completions`)
    GET  /v1/models, /v1/models/{id}
    POST /tokenize, /detokenize, GET /tokenizer_info   the model's tokenizer (vLLM's shapes, which
                                lm-evaluation-harness's `tokenizer_backend=remote` reads)
    GET  /health                ready?, workers and slots busy / free, requests queued, the sampling defaults
    GET  /stats                 requests, tokens, time to first token, decode speed, per worker
    GET  /metrics               the same and more in Prometheus text format

The fields each endpoint honours, and those refused with a 400, are in nanochat/openai_api.py and
README's API table; every error (400, 404, 405, 413, 500, 503) has OpenAI's `{"error": {...}}` shape.

Workers: one model (an Engine) per GPU, or on CPU as many copies as asked. Each worker decodes up to
`batch_size` rows together on its own thread (continuous batching on engine.BatchDecoder, the decode
loop every generator shares): a request's `n` choices are rows of that batch, joining as soon as
enough rows are free and leaving when done; a request beyond that waits in a queue (at most
`max_queue`, then 503). The event loop keeps answering meanwhile. A client that disconnects
mid-stream sets the request's cancel flag; the worker drops its rows at the next token.

Stop strings end a choice in the engine (matched on decoded text across token boundaries) and are
cut from the content here, where a stream holds back any tail that could still become one. A chat
prompt too long for the context loses its oldest turns (chat_session.fit_prompt): the reply says so
in the `X-Nanochat-Prompt-Trimmed` header, and the server logs it. Completions are never cropped.

Requests beyond the OpenAI fields: `top_k` (0 = off), and each content delta of a chat stream carries
`part`: "text", "python" (a calculator call), "python_output" (its result) or "marker" (the
`<<`, `=`, `>>` around a tool call in the content, so plain clients read `<<12*3=36>>`). The same
spans in an assistant message sent back are parsed into tool parts again.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import queue
import statistics
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanochat.chat_session import ChatError, ReplyStream, fit_prompt
from nanochat.engine import StopText, StreamDecoder
from nanochat.openai_api import (MAX_BODY_BYTES, MAX_N, MAX_TOTAL_CHARS, RequestError, Sampling,
                                 chat_logprob, completion_logprobs, error_body, validate_chat, validate_completion)


def log(message: str) -> None:
    print(f"chat_web: {message}", file=sys.stderr, flush=True)


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status)


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
        self.chat, self.events, self.score = chat, events, score
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


# ---------------------------------------------------------------------------------------------
# the app


def chat_page() -> str:
    return resources.files("nanochat").joinpath("assets/chat.html").read_text(encoding="utf-8")


# the page is self-contained: no script, style, font or image from anywhere else
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engines: list, model_name: str, temperature: float = 0.6, top_k: int = 50,
               max_tokens: int = 512, batch_size: int = 8, max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving `engines` (one per worker; each an Engine with its tokenizer). `batch_size`:
    rows each worker decodes together (continuous batching; 1: one request at a time)."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    pool = WorkerPool(engines, batch_size, max_queue)
    stats = Stats()
    defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    context = engines[0].model.config.sequence_len
    vocab_size = engines[0].model.config.vocab_size
    tokenizer = engines[0].tokenizer
    app.state.pool, app.state.stats = pool, stats
    page = chat_page()
    specials = set(tokenizer.get_special_tokens())

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(stats.started), "owned_by": "nanochat",
                "context_length": context}

    @app.middleware("http")
    async def count_status(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):
            endpoint = "/v1/models" if path.startswith("/v1/models") else path
            key = (endpoint, response.status_code)
            stats.by_status[key] = stats.by_status.get(key, 0) + 1
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):  # noqa: ARG001
        stats.rejected += 1
        return error_response(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, what, kind=kind)

    @app.exception_handler(Exception)
    async def _server_error(request, exc):  # noqa: ARG001
        log(f"internal error: {type(exc).__name__}: {exc}")
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/favicon.ico")
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "model": model_name, "context": context, "defaults": defaults,
                "workers": {"total": len(pool.workers), "busy": pool.busy, "free": len(pool.workers) - pool.busy},
                "slots": {"total": pool.slots, "busy": pool.active}, "queued": pool.waiting}

    @app.get("/stats")
    async def get_stats():
        def summary(xs, scale=1.0):
            return {"mean": round(statistics.fmean(xs) * scale, 3), "p50": round(statistics.median(xs) * scale, 3),
                    "n": len(xs)} if xs else None

        return {"model": model_name, "context": context, "uptime_s": round(time.time() - stats.started, 1),
                "requests": {"total": stats.requests, "completed": stats.completed, "cancelled": stats.cancelled,
                             "errors": stats.errors, "rejected": stats.rejected, "queued": pool.waiting},
                "tokens_generated": stats.tokens, "ttft_ms": summary(stats.ttft, 1000.0),
                "decode_tok_per_s": summary(stats.decode_rate),
                "workers": [{"index": w.index, "device": str(w.engine.model.get_device()), "busy": w.busy,
                             "active": w.active, "batch": w.rows, "requests": w.requests, "tokens": w.tokens}
                            for w in pool.workers]}

    @app.get("/metrics")
    async def metrics():
        return Response(prometheus(stats, pool), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error_response(404, f"the model {model_id!r} does not exist (this server serves {model_name!r})",
                                  "model", kind="not_found_error")
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        chat = "<|assistant_end|>" in specials
        return {"bos_token": "<|bos|>", "eos_token": "<|assistant_end|>" if chat else "<|bos|>", "pad_token": None,
                "chat_template": None, "model_max_length": context, "vocab_size": vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            return error_response(400, "prompt must be a string", "prompt")
        tokens = [tokenizer.encode_special(text)] if text in specials else tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in tokens):
            return error_response(400, f"tokens must be a list of token ids (0-{vocab_size - 1})", "tokens")
        return {"prompt": tokenizer.decode(tokens)}

    async def _json(request: Request):
        raw = bytearray()
        try:
            async for chunk in request.stream():  # read at most MAX_BODY_BYTES, whatever Content-Length says
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise RequestError(f"the request body is larger than {MAX_BODY_BYTES // 2 ** 20} MiB "
                                       f"(messages may hold {MAX_TOTAL_CHARS:,} characters in all)", status=413)
        except ClientDisconnect:
            raise _ClientGone() from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})") from None

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):  # noqa: ARG001
        stats.rejected += 1
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(_ClientGone)
    async def _gone(request, exc):  # noqa: ARG001
        log(f"a client went away while uploading its request to {request.url.path}")
        return Response(status_code=400)

    # --- chat completions ----------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t0 = time.perf_counter()
        req = validate_chat(await _json(request), defaults, pool.max_n)
        s = req.sampling
        try:
            fitted = fit_prompt(tokenizer, req.messages, context, reserve=s.max_tokens)
        except ChatError as e:
            raise RequestError(str(e), "messages") from None
        headers = {}
        if fitted.dropped_messages or fitted.cropped:
            note = f"dropped_messages={fitted.dropped_messages}; cropped={str(fitted.cropped).lower()}"
            headers["X-Nanochat-Prompt-Trimmed"] = note
            log(f"prompt trimmed to fit the {context}-token context ({note})")
        prompt = fitted.tokens
        pool.check_queue()
        stats.requests += 1
        stats.prompt_tokens += len(prompt)
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if s.stream:
            return StreamingResponse(_chat_stream(s, prompt, cid, created, t0), media_type="text/event-stream",
                                     headers={**SSE_HEADERS, **headers})
        return JSONResponse(await _chat_complete(s, prompt, cid, created, t0), headers=headers)

    def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _chat_entries(entries) -> list:
        return [chat_logprob(tokenizer, t, lp, top) for t, lp, top in entries]

    async def _start(s: Sampling, prompt, chat: bool, events, first_index=0, score=None, t0=None) -> Generation:
        worker = await pool.acquire(s.n)
        return Generation(pool, stats, worker, s, prompt, chat, events, first_index, score, t0)

    async def _chat_stream(s: Sampling, prompt, cid, created, t0):
        def chunk(choices) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "system_fingerprint": None, "choices": choices})

        events: asyncio.Queue = asyncio.Queue()
        gen = None
        try:
            gen = await _start(s, prompt, True, events, t0=t0)
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(s.n)])
            open_choices = s.n
            while open_choices:
                kind, *payload = await events.get()
                if kind == "pieces":
                    i, pieces, entries = payload
                    logprobs = {"content": _chat_entries(entries), "refusal": None} if s.logprobs is not None \
                        else None
                    if not pieces:
                        yield chunk([{"index": i, "delta": {"content": ""}, "logprobs": logprobs,
                                      "finish_reason": None}])
                    for k, (part, text) in enumerate(pieces):
                        yield chunk([{"index": i, "delta": {"content": text, "part": part},
                                      "logprobs": logprobs if k == 0 else None, "finish_reason": None}])
                elif kind == "done":
                    i, finish = payload
                    open_choices -= 1
                    yield chunk([{"index": i, "delta": {}, "logprobs": None,
                                  "finish_reason": "length" if finish == "cancelled" else finish}])
                elif kind == "error":
                    yield sse(error_body(payload[0], kind="server_error"))
                    break
            if s.include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "system_fingerprint": None, "choices": [],
                           "usage": _usage(len(prompt), gen.completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the task is cancelled here)
            if gen is not None:
                gen.cancel.set()

    async def _chat_complete(s: Sampling, prompt, cid, created, t0) -> dict:
        events: asyncio.Queue = asyncio.Queue()
        gen = await _start(s, prompt, True, events, t0=t0)
        texts = [[] for _ in range(s.n)]
        entries = [[] for _ in range(s.n)]
        finish: list = [None] * s.n
        try:
            while None in finish:
                kind, *payload = await events.get()
                if kind == "pieces":
                    texts[payload[0]] += [t for _, t in payload[1]]
                    entries[payload[0]] += payload[2]
                elif kind == "done":
                    finish[payload[0]] = payload[1]
                elif kind == "error":
                    raise RequestError(payload[0], status=500, kind="server_error")
        finally:
            gen.cancel.set()
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(texts[i])},
                    "logprobs": {"content": _chat_entries(entries[i]), "refusal": None}
                    if s.logprobs is not None else None, "finish_reason": finish[i]} for i in range(s.n)]
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None, "choices": choices, "usage": _usage(len(prompt), gen.completion_tokens)}

    # --- completions ---------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(request: Request):
        t0 = time.perf_counter()
        req = validate_completion(await _json(request), defaults, tokenizer, vocab_size, context, pool.max_n)
        pool.check_queue()
        stats.requests += 1
        stats.prompt_tokens += sum(len(t) for t, _ in req.prompts)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        runner = _Completion(req, cid, created, t0)
        if req.sampling.stream:
            return StreamingResponse(runner.stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        return await runner.complete()

    class _Completion:
        """One /v1/completions request: a Generation per prompt (each holding `n` rows), their events merged."""

        def __init__(self, req, cid, created, t0):
            self.req, self.cid, self.created, self.t0 = req, cid, created, t0
            s = req.sampling
            self.events: asyncio.Queue = asyncio.Queue()
            self.n_choices = s.n * len(req.prompts)
            self.gens: list[Generation] = []
            self.tasks: list[asyncio.Task] = []
            # choice index -> (prompt tokens, echoed text); per choice: text so far, logprob entries
            self.prompt_of = [i // s.n for i in range(self.n_choices)]
            self.scores: dict[int, list] = {}
            self.offset = [len(req.prompts[p][1]) if req.echo else 0 for p in self.prompt_of]

        async def _launch(self) -> None:
            s = self.req.sampling
            score = s.logprobs if (self.req.echo and s.logprobs is not None) else None

            async def one(p: int):
                try:
                    self.gens.append(await _start(s, self.req.prompts[p][0], False, _Tagged(self.events, p),
                                                  p * s.n, score, self.t0))
                except Exception as e:  # reported on the response instead of lost in a task
                    self.events.put_nowait(("error", p, f"{type(e).__name__}: {e}"))

            self.tasks = [asyncio.create_task(one(p)) for p in range(len(self.req.prompts))]

        def _echo(self, choice: int) -> tuple[str, list | None]:
            """Echoed prompt text and, with logprobs, its entries (the first token's logprob is null)."""
            tokens, text = self.req.prompts[self.prompt_of[choice]]
            if self.req.sampling.logprobs is None:
                return text, None
            scores = self.scores.get(self.prompt_of[choice])
            entries, offset = [], 0
            for k, t in enumerate(tokens):
                lp, top = (None, None) if k == 0 else scores[k - 1]
                entries.append((t, lp, top, offset))
                offset += len(tokenizer.decode([t]))
            return text, entries

        def _entries(self, entries: list, start: int) -> list:
            """[(token, logprob, top)] of generated tokens -> with their text offsets from `start`."""
            out, offset = [], start
            for t, lp, top in entries:
                out.append((t, lp, top, offset))
                offset += len(tokenizer.decode([t]))
            return out

        async def _next(self):
            kind, p, *payload = await self.events.get()
            if kind == "prompt_logprobs":
                self.scores[p] = payload[0]
                return await self._next()
            return kind, payload

        def _cleanup(self) -> None:
            for task in self.tasks:
                task.cancel()
            for gen in self.gens:
                gen.cancel.set()

        def _usage(self) -> dict:
            prompt_tokens = sum(len(t) for t, _ in self.req.prompts)
            return _usage(prompt_tokens, sum(g.completion_tokens for g in self.gens))

        def _choice(self, i, text, logprobs, finish) -> dict:
            return {"text": text, "index": i, "logprobs": logprobs, "finish_reason": finish}

        async def complete(self):
            s = self.req.sampling
            await self._launch()
            texts = [[] for _ in range(self.n_choices)]
            entries = [[] for _ in range(self.n_choices)]
            finish: list = [None] * self.n_choices
            try:
                while None in finish:
                    kind, payload = await self._next()
                    if kind == "pieces":
                        i, pieces, ents = payload
                        texts[i] += [t for _, t in pieces]
                        entries[i] += ents
                    elif kind == "done":
                        finish[payload[0]] = "length" if payload[1] == "cancelled" else payload[1]
                    else:
                        return error_response(500, payload[0], kind="server_error")
            finally:
                self._cleanup()
            choices = []
            for i in range(self.n_choices):
                text, lp_entries = "".join(texts[i]), None
                head = ""
                if self.req.echo:
                    head, echo_entries = self._echo(i)
                    lp_entries = echo_entries
                if s.logprobs is not None:
                    lp_entries = (lp_entries or []) + self._entries(entries[i], len(head))
                choices.append(self._choice(i, head + text, completion_logprobs(tokenizer, lp_entries)
                                            if lp_entries is not None else None, finish[i]))
            return {"id": self.cid, "object": "text_completion", "created": self.created, "model": model_name,
                    "system_fingerprint": None, "choices": choices, "usage": self._usage()}

        def _chunk(self, choices, usage=None) -> str:
            obj = {"id": self.cid, "object": "text_completion", "created": self.created, "model": model_name,
                   "system_fingerprint": None, "choices": choices}
            if usage is not None:
                obj["usage"] = usage
            return sse(obj)

        async def stream(self):
            s = self.req.sampling
            try:
                await self._launch()
                offsets = list(self.offset)
                echoed = [not self.req.echo] * self.n_choices
                open_choices = self.n_choices
                while open_choices:
                    kind, payload = await self._next()
                    if kind == "error":
                        yield sse(error_body(payload[0], kind="server_error"))
                        break
                    i = payload[0]
                    if not echoed[i]:  # the echoed prompt comes first (after its scores arrived)
                        echoed[i] = True
                        text, ents = self._echo(i)
                        yield self._chunk([self._choice(i, text, completion_logprobs(tokenizer, ents)
                                                        if ents is not None else None, None)])
                    if kind == "pieces":
                        _, pieces, ents = payload
                        text = "".join(t for _, t in pieces)
                        lp = None
                        if s.logprobs is not None:
                            lp = completion_logprobs(tokenizer, self._entries(ents, offsets[i]))
                        offsets[i] += len(text)
                        yield self._chunk([self._choice(i, text, lp, None)])
                    else:
                        open_choices -= 1
                        yield self._chunk([self._choice(i, "", None,
                                                        "length" if payload[1] == "cancelled" else payload[1])])
                if s.include_usage:
                    yield self._chunk([], self._usage())
                yield "data: [DONE]\n\n"
            finally:
                self._cleanup()

    return app


class _ClientGone(Exception):
    """The client disconnected while its request body was still arriving."""


class _Tagged:
    """An asyncio queue view that tags each event with the prompt it belongs to (completions merge the
    events of several prompts into one queue)."""

    def __init__(self, events: asyncio.Queue, prompt: int):
        self.events, self.prompt = events, prompt

    def put_nowait(self, item) -> None:
        kind, *rest = item
        self.events.put_nowait((kind, self.prompt, *rest))


# ---------------------------------------------------------------------------------------------
# the SSE reader (the Python twin of the page's JavaScript reader; tests and the benchmark use it)


class SSEReader:
    """Bytes from the network, in chunks of any size -> the `data:` payloads of complete events.

    A chunk may end inside an event, inside a line, or inside a multi-byte character: the decoder and
    the buffer keep what is incomplete until the next chunk.
    """

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += self._decoder.decode(chunk, final=False)
        self._buffer = self._buffer.replace("\r\n", "\n")
        events = []
        while "\n\n" in self._buffer:
            block, self._buffer = self._buffer.split("\n\n", 1)
            data = [line[5:].removeprefix(" ") for line in block.split("\n") if line.startswith("data:")]
            if data:
                events.append("\n".join(data))
        return events
