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

Workers (nanochat/serving.py): one model (an Engine) per GPU, or on CPU as many copies as asked. Each
worker decodes up to `batch_size` rows together on its own thread (continuous batching on
engine.BatchDecoder, the decode loop every generator shares): a request's `n` choices are rows of
that batch, joining as soon as enough rows are free and leaving when done; a request beyond that
waits in a queue (at most `max_queue`, then 503). The event loop keeps answering meanwhile. A client
that disconnects mid-stream sets the request's cancel flag; the worker drops its rows at the next token.

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
import statistics
import time
import uuid
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanochat.chat_session import ChatError, fit_prompt
from nanochat.openai_api import (MAX_BODY_BYTES, MAX_TOTAL_CHARS, RequestError, Sampling, chat_logprob,
                                 completion_logprobs, error_body, validate_chat, validate_completion)
from nanochat.serving import Generation, Stats, WorkerPool, log, prometheus


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(message, param, kind), status)


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

    app.add_middleware(StatusCounter, counts=stats.by_status)

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


class StatusCounter:
    """Counts API responses by (endpoint, status) as they start. A plain ASGI middleware: FastAPI's
    `@app.middleware("http")` would pass every streamed chunk through an extra task and memory stream
    (on the CPU benchmark one stream went from 251 to 367 tok/s when it was replaced by this; two runs
    minutes apart on a shared machine, so the size is rough, the direction is not)."""

    def __init__(self, app, counts: dict):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.app(scope, receive, send)
        endpoint = "/v1/models" if path.startswith("/v1/models") else path

        async def counting_send(message):
            if message["type"] == "http.response.start":
                key = (endpoint, message["status"])
                self.counts[key] = self.counts.get(key, 0) + 1
            await send(message)

        await self.app(scope, receive, counting_send)


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
