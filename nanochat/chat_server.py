"""The chat server behind scripts/chat_web.py: a web page and an OpenAI-compatible API on one engine.

    GET  /                      the chat page (nanochat/assets/chat.html: one self-contained file)
    POST /v1/chat/completions   OpenAI Chat Completions: `stream: false` -> one `chat.completion` object
                                with `usage`; `stream: true` -> Server-Sent Events of `chat.completion.chunk`
                                objects ending with `data: [DONE]`
    GET  /v1/models             the loaded model
    GET  /health                ready?, workers busy / free, requests queued, the sampling defaults
    GET  /stats                 requests, tokens, time to first token, decode speed, per worker

Workers: one model (an Engine) per GPU, or on CPU as many copies as asked. Each worker decodes up to
`batch_size` requests together on its own thread (continuous batching, engine.BatchDecoder: a request
joins the running batch as soon as a row is free and leaves it when done); a request beyond that
waits in a queue for a free slot. The event loop keeps answering meanwhile (`/health` while a long
reply streams). A client that disconnects mid-stream sets the request's cancel flag; the worker
checks it every token and frees the slot. `batch_size` 1 runs each request alone on a thread.

Requests beyond the OpenAI fields: `top_k` (0 = off), and each content delta of a stream carries
`part`: "text", "python" (a calculator call), "python_output" (its result) or "marker" (the
`<<`, `=`, `>>` around a tool call in the content, so plain clients read `<<12*3=36>>`). The same
spans in an assistant message sent back are parsed into tool parts again.

Bad input is a 400 with an OpenAI-style `{"error": {"message", "type", "param", "code"}}` body.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import queue
import secrets
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from nanochat.chat_session import ChatError, ReplyStream, fit_prompt

# the reference server's limits (REFERENCE section 11)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 2 * 2 ** 20  # 32,000 characters fit many times over, even JSON-escaped
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)
MAX_TOKENS_RANGE = (1, 4096)
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status)


# ---------------------------------------------------------------------------------------------
# request validation


@dataclass
class ChatRequest:
    messages: list[dict]
    temperature: float
    top_k: int | None
    top_p: float | None
    max_tokens: int
    stream: bool
    seed: int
    include_usage: bool = False


def _number(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return int(value) if integer else float(value)


def _content_text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.content parts must be {{'type': 'text', 'text': str}} "
                                   f"(this model reads text only)", where)
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", where)


def normalize_messages(raw) -> list[dict]:
    """Validated messages: optional system first, then user/assistant alternating, ending with user
    (consecutive messages of one role are joined, 'developer' counts as system)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {'role', 'content'} objects", "messages")
    if len(raw) > MAX_MESSAGES:
        raise RequestError(f"too many messages: {len(raw)} (limit {MAX_MESSAGES})", "messages")
    out: list[dict] = []
    total = 0
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = msg.get("role")
        role = "system" if role == "developer" else role
        if role not in ROLES:
            raise RequestError(f"{where}.role {role!r} is not one of {', '.join(ROLES)}", where)
        text = _content_text(msg.get("content"), where)
        if len(text) > MAX_MESSAGE_CHARS:
            raise RequestError(f"{where} is {len(text):,} characters long (limit {MAX_MESSAGE_CHARS:,})", where)
        total += len(text)
        if role == "user" and not text.strip():
            raise RequestError(f"{where} is an empty user message", where)
        if role == "system" and out and out[-1]["role"] != "system":
            raise RequestError(f"{where}: a system message may only come first", where)
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + text
        else:
            out.append({"role": role, "content": text})
    if total > MAX_TOTAL_CHARS:
        raise RequestError(f"the messages hold {total:,} characters in all (limit {MAX_TOTAL_CHARS:,})", "messages")
    body = out[1:] if out[0]["role"] == "system" else out
    if not body or body[-1]["role"] != "user":
        raise RequestError("the last message must be from the user", "messages")
    if body[0]["role"] != "user":
        body.insert(0, {"role": "user", "content": ""})  # a reply with no question before it
    return ([out[0]] if out[0]["role"] == "system" else []) + body


def validate_request(body, defaults: dict) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = normalize_messages(body.get("messages"))
    temperature = _number(body, "temperature", defaults["temperature"], *TEMPERATURE_RANGE)
    top_k = _number(body, "top_k", defaults["top_k"], *TOP_K_RANGE, integer=True)
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise RequestError("top_p must be greater than 0", "top_p")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, defaults["max_tokens"], *MAX_TOKENS_RANGE, integer=True)
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    return ChatRequest(messages, temperature, top_k or None, top_p, max_tokens, stream,
                       seed if seed is not None else secrets.randbits(31), bool(options.get("include_usage")))


# ---------------------------------------------------------------------------------------------
# workers


@dataclass
class Worker:
    index: int
    engine: object
    busy: bool = False  # serving at least one request
    active: int = 0  # requests it is serving now (at most `rows`)
    rows: int = 1  # requests it decodes together (a BatchWorker when > 1)
    batcher: object = None
    requests: int = 0
    tokens: int = 0


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    errors: int = 0
    rejected: int = 0
    tokens: int = 0
    ttft: list = field(default_factory=list)  # seconds, last 1000 requests
    decode_rate: list = field(default_factory=list)  # tokens/s after the first token, last 1000

    def record(self, finish: str, tokens: int, ttft: float | None, rate: float | None) -> None:
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


class WorkerPool:
    """Free request slots in an asyncio queue: `await acquire()` waits for one; release on the event loop.

    A worker has `rows` slots: with rows > 1 its requests are decoded together by a BatchWorker (one
    forward per token for all of them), otherwise each runs alone on its own thread. Slots are queued
    round robin across workers, so requests spread over them before any worker takes a second one."""

    def __init__(self, engines: list, rows: int = 1):
        if not engines:
            raise ValueError("the server needs at least one model")
        if rows < 1:
            raise ValueError(f"--batch-size must be >= 1, got {rows}")
        self.workers = [Worker(i, e) for i, e in enumerate(engines)]
        if rows > 1:
            for w in self.workers:
                w.batcher = BatchWorker(w, rows)
                w.rows = w.batcher.decoder.rows  # capped by the KV cache's memory budget
        self._free: asyncio.Queue | None = None
        self.waiting = 0

    def _queue(self) -> asyncio.Queue:
        if self._free is None:
            self._free = asyncio.Queue()
            for slot in range(max(w.rows for w in self.workers)):
                for w in self.workers:
                    if slot < w.rows:
                        self._free.put_nowait(w)
        return self._free

    async def acquire(self) -> Worker:
        self.waiting += 1
        try:
            worker = await self._queue().get()
        finally:
            self.waiting -= 1
        worker.active += 1
        worker.busy = True
        worker.requests += 1
        return worker

    def release(self, worker: Worker) -> None:  # on the event loop
        worker.active -= 1
        worker.busy = worker.active > 0
        self._queue().put_nowait(worker)

    @property
    def busy(self) -> int:
        return sum(w.busy for w in self.workers)

    @property
    def active(self) -> int:
        return sum(w.active for w in self.workers)

    @property
    def slots(self) -> int:
        return sum(w.rows for w in self.workers)


class Generation:
    """One reply, generated on a worker thread (alone, or in a BatchWorker's batch); its pieces arrive
    through an asyncio queue. `feed` and `finish` run on the generating thread."""

    def __init__(self, pool: WorkerPool, stats: Stats, worker: Worker, req: ChatRequest, prompt: list[int]):
        self.pool, self.stats, self.worker, self.req, self.prompt = pool, stats, worker, req, prompt
        self.cancel = threading.Event()
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.completion_tokens = 0
        self.stream = ReplyStream(worker.engine.tokenizer)
        self.t0, self.t_first = time.perf_counter(), None
        if worker.batcher is not None:
            worker.batcher.submit(self)
        else:
            self.thread = threading.Thread(target=self._run, name=f"chat-worker-{worker.index}", daemon=True)
            self.thread.start()

    def _put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def feed(self, token: int, mask: int) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
        pieces = self.stream.feed(token, mask)
        if pieces:
            self._put(("pieces", pieces))

    def finish(self, error: str | None = None) -> None:
        """The reply is over (its stop token, its length, a cancel, or `error`): report it, free the slot."""
        stream = self.stream
        if error is not None:  # reported to the client as an error event, and counted
            finish = "error"
            self._put(("error", error))
        else:
            tail = stream.close()
            if tail:
                self._put(("pieces", tail))
            finish = stream.finish_reason or ("cancelled" if self.cancel.is_set() else "length")
            self.completion_tokens = stream.tokens
            self._put(("done", finish))
        t_end = time.perf_counter()
        ttft = (self.t_first - self.t0) if self.t_first is not None else None
        rate = (stream.tokens - 1) / (t_end - self.t_first) if self.t_first is not None and stream.tokens > 1 \
            and t_end > self.t_first else None
        self.worker.tokens += stream.tokens
        self.stats.record(finish, stream.tokens, ttft, rate)
        self.loop.call_soon_threadsafe(self.pool.release, self.worker)

    def _run(self) -> None:
        engine, req = self.worker.engine, self.req
        try:
            for ids, masks in engine.generate(self.prompt, max_tokens=req.max_tokens, temperature=req.temperature,
                                              top_k=req.top_k, top_p=req.top_p, seed=req.seed,
                                              should_stop=self.cancel.is_set):
                self.feed(ids[0], masks[0])
        except Exception as e:
            self.finish(error=f"generation failed: {type(e).__name__}: {e}")
            return
        self.finish()


class BatchWorker:
    """One thread decoding all of a worker's requests together (continuous batching, engine.BatchDecoder):
    a request joins the batch as soon as it arrives (its prompt prefilled alone), every forward then
    advances all of them by one token, and a finished or cancelled one leaves at once."""

    def __init__(self, worker: Worker, rows: int):
        self.worker = worker
        self.decoder = worker.engine.decoder(rows)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"chat-batch-{worker.index}", daemon=True)
        self.thread.start()

    def submit(self, gen: Generation) -> None:
        self.inbox.put(gen)

    def _admit(self, live: dict) -> None:
        while self.decoder.free:
            try:
                gen = self.inbox.get(block=not live)  # idle: sleep until a request comes
            except queue.Empty:
                return
            if gen.cancel.is_set():
                gen.finish()
                continue
            req = gen.req
            try:
                key = self.decoder.add(gen.prompt, req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                                       top_p=req.top_p, seed=req.seed)
            except Exception as e:
                gen.finish(error=f"generation failed: {type(e).__name__}: {e}")
                continue
            if key is None:  # the prompt fills the context: an empty reply
                gen.finish()
            else:
                live[key] = gen

    def _loop(self) -> None:
        live: dict[int, Generation] = {}
        while True:
            try:
                self._admit(live)
                for key, gen in list(live.items()):
                    if gen.cancel.is_set():  # the client went away
                        self.decoder.drop(key)
                        del live[key]
                        gen.finish()
                for key, token, mask, finished in self.decoder.step():
                    gen = live[key]
                    gen.feed(token, mask)
                    if finished:
                        del live[key]
                        gen.finish()
            except Exception as e:  # every request of the batch fails alike; the worker starts afresh
                for gen in live.values():
                    gen.finish(error=f"generation failed: {type(e).__name__}: {e}")
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


def create_app(engines: list, model_name: str, temperature: float = 0.6, top_k: int = 50,
               max_tokens: int = 512, batch_size: int = 1) -> FastAPI:
    """The FastAPI app serving `engines` (one per worker; each an Engine with its tokenizer). `batch_size`:
    requests each worker decodes together (continuous batching; 1: one at a time on its own thread)."""
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)
    pool = WorkerPool(engines, batch_size)
    stats = Stats()
    defaults = dict(temperature=temperature, top_k=top_k, max_tokens=max_tokens)
    context = engines[0].model.config.sequence_len
    tokenizer = engines[0].tokenizer
    app.state.pool, app.state.stats = pool, stats
    page = chat_page()

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):  # noqa: ARG001
        stats.rejected += 1
        return error_response(422, f"invalid request: {exc.errors()[:3]}")

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

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(stats.started),
                                            "owned_by": "nanochat", "context_length": context}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        try:
            raw = bytearray()
            async for chunk in request.stream():  # read at most MAX_BODY_BYTES, whatever Content-Length says
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    raise RequestError(f"the request body is larger than {MAX_BODY_BYTES // 2 ** 20} MiB "
                                       f"(messages may hold {MAX_TOTAL_CHARS:,} characters in all)", status=413)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON ({e})") from None
            req = validate_request(body, defaults)
            try:
                prompt = fit_prompt(tokenizer, req.messages, context, reserve=req.max_tokens).tokens
            except ChatError as e:
                raise RequestError(str(e), "messages") from None
        except RequestError as e:
            stats.rejected += 1
            return error_response(e.status, e.message, e.param)
        stats.requests += 1
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(_stream(req, prompt, cid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(req, prompt, cid, created)

    def _chunk(cid, created, delta: dict, finish=None) -> str:
        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
               "system_fingerprint": None, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                        "finish_reason": finish}]}
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def _usage(prompt, gen) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": gen.completion_tokens,
                "total_tokens": len(prompt) + gen.completion_tokens}

    async def _stream(req: ChatRequest, prompt, cid, created):
        gen = None
        worker = None
        try:
            worker = await pool.acquire()
            gen = Generation(pool, stats, worker, req, prompt)
            yield _chunk(cid, created, {"role": "assistant", "content": ""})
            while True:
                kind, *payload = await gen.events.get()
                if kind == "pieces":
                    for part, text in payload[0]:
                        yield _chunk(cid, created, {"content": text, "part": part})
                    continue
                if kind == "error":
                    err = {"error": {"message": payload[0], "type": "server_error", "param": None, "code": None}}
                    yield f"data: {json.dumps(err)}\n\n"
                else:
                    finish = "length" if payload[0] == "cancelled" else payload[0]
                    yield _chunk(cid, created, {}, finish)
                    if req.include_usage:
                        obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                               "choices": [], "usage": _usage(prompt, gen)}
                        yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:  # normal end, or the client went away (the task is cancelled here)
            if gen is not None:
                gen.cancel.set()
            elif worker is not None:
                pool.release(worker)

    async def _complete(req: ChatRequest, prompt, cid, created):
        worker = await pool.acquire()
        gen = Generation(pool, stats, worker, req, prompt)
        pieces, finish = [], None
        try:
            while finish is None:
                kind, *payload = await gen.events.get()
                if kind == "pieces":
                    pieces.extend(payload[0])
                elif kind == "error":
                    return error_response(500, payload[0], kind="server_error")
                else:
                    finish = payload[0]
        finally:
            gen.cancel.set()
        return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(t for _, t in pieces)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": _usage(prompt, gen)}

    return app


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
