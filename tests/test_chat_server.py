"""The chat server for real: `python -m scripts.chat_web` on a free localhost port, a tiny trained model,
requests from httpx and from the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from nanochat.chat_server import SSEReader
from tests.chat_fixtures import EMOJI_REPLY, chat_base_dir, shared_server

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "hi"}]
CALC = [{"role": "user", "content": "What is 12 times 3?"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return chat_base_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(base):
    return shared_server(base, "sft")


@pytest.fixture(scope="module")
def long_server(base):
    return shared_server(base, "long")


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60, **kw)


def stream_events(server, body, max_events=None) -> list[dict | str]:
    """The data payloads of a streamed reply, read with our SSE reader from raw network chunks."""
    events = []
    reader = SSEReader()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=dict(body, stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            for data in reader.feed(chunk):
                events.append(data if data == "[DONE]" else json.loads(data))
                if max_events is not None and len(events) >= max_events:
                    return events
    return events


def content_of(events) -> str:
    chunks = [e for e in events if isinstance(e, dict) and e["choices"]]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in chunks)


def test_models_health_stats_and_page(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-sft-tiny-1"
    health = httpx.get(server.url + "/health").json()
    assert health["ready"] and health["workers"] == {"total": 2, "busy": 0, "free": 2}
    stats = httpx.get(server.url + "/stats").json()
    assert stats["context"] == 64 and len(stats["workers"]) == 2
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "createSSEParser" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for needle in ("http://", "https://", "//cdn", "src=\"//"):  # self-contained: nothing from elsewhere
        assert needle not in page.text


def test_no_cross_origin_access(server):
    """No CORS headers at all: another site's page in the user's browser cannot read the API."""
    pre = httpx.options(server.url + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    r = post(server, {"messages": HI, "max_tokens": 1}, headers={"Origin": "https://evil.example"})
    for resp in (pre, r):
        assert not any(h.lower().startswith("access-control-allow") for h in resp.headers)


def test_non_streaming_completion_with_usage(server, base):
    from nanochat.tokenizer import get_tokenizer

    tok = get_tokenizer(base)
    r = post(server, {"model": "x", "messages": HI, "temperature": 0})
    assert r.status_code == 200
    obj = r.json()
    assert obj["object"] == "chat.completion" and obj["id"].startswith("chatcmpl-")
    choice = obj["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": EMOJI_REPLY} and choice["finish_reason"] == "stop"
    prompt = tok.encode("hi", prepend="<|bos|>")
    n_prompt = len(prompt) + 3  # <|user_start|> <|user_end|> <|assistant_start|>
    n_reply = len(tok.encode(EMOJI_REPLY)) + 1  # + <|assistant_end|>
    assert obj["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": n_reply, "total_tokens": n_prompt + n_reply}


def test_max_tokens_gives_finish_length(server):
    obj = post(server, {"messages": HI, "temperature": 0, "max_tokens": 3}).json()
    assert obj["choices"][0]["finish_reason"] == "length" and obj["usage"]["completion_tokens"] == 3
    assert EMOJI_REPLY.startswith(obj["choices"][0]["message"]["content"])


def test_streaming_chunks_follow_the_openai_format(server):
    events = stream_events(server, {"messages": HI, "temperature": 0, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert content_of(chunks) == EMOJI_REPLY
    assert all("\ufffd" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    usage = post(server, {"messages": HI, "temperature": 0}).json()["usage"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage  # the same as without streaming


def test_tool_call_streams_as_parts(server):
    events = stream_events(server, {"messages": CALC, "temperature": 0})
    assert content_of(events) == "It is <<12*3=36>>, so 36."
    parts = {}
    for e in events:
        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content"):
            d = e["choices"][0]["delta"]
            parts[d["part"]] = parts.get(d["part"], "") + d["content"]
    assert parts["python"] == "12*3" and parts["python_output"] == "36" and parts["marker"] == "<<=>>"


def test_openai_client_streams_and_completes(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["nanochat-sft-tiny-1"]
    stream = client.chat.completions.create(model="nanochat-sft-tiny-1", messages=HI, stream=True, temperature=0)
    pieces, finish = [], None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == EMOJI_REPLY and finish == "stop"
    resp = client.chat.completions.create(model="nanochat-sft-tiny-1", messages=CALC, temperature=0, max_tokens=64)
    assert resp.choices[0].message.content == "It is <<12*3=36>>, so 36." and resp.usage.total_tokens > 0
    # the conversation goes back to the server with the tool call spelled <<expr=result>>: parsed again
    follow = client.chat.completions.create(
        model="m", temperature=0, max_tokens=20,
        messages=CALC + [{"role": "assistant", "content": resp.choices[0].message.content}] + HI)
    assert follow.choices[0].finish_reason in ("stop", "length")
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="m", messages=HI, temperature=3)


BAD = {
    "malformed JSON": b'{"messages": [',
    "not an object": b"[1, 2]",
    "no messages": {"temperature": 0.5},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "message not an object": {"messages": ["hi"]},
    "empty user message": {"messages": [{"role": "user", "content": "   "}]},
    "last message not user": {"messages": HI + [{"role": "assistant", "content": "yo"}]},
    "image content": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    "too many messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 250
                          + HI},
    "message too long": {"messages": [{"role": "user", "content": "a" * 8001}]},
    "too long in all": {"messages": [{"role": "user", "content": "a" * 7000},
                                     {"role": "assistant", "content": "b" * 7000}] * 2 + [
                                         {"role": "user", "content": "c" * 7000}] * 1 + [
                                         {"role": "assistant", "content": "d" * 4000}, HI[0]]},
    "temperature below 0": {"messages": HI, "temperature": -0.1},
    "temperature above 2": {"messages": HI, "temperature": 2.5},
    "temperature not a number": {"messages": HI, "temperature": "hot"},
    "top_k above 200": {"messages": HI, "top_k": 201},
    "top_k negative": {"messages": HI, "top_k": -1},
    "top_k fractional": {"messages": HI, "top_k": 2.5},
    "max_tokens 0": {"messages": HI, "max_tokens": 0},
    "max_tokens above 4096": {"messages": HI, "max_tokens": 4097},
    "top_p 0": {"messages": HI, "top_p": 0},
    "n beyond the limit": {"messages": HI, "n": 9},
    "tools with tool_choice required": {"messages": HI, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]},
    "response_format json_object": {"messages": HI, "response_format": {"type": "json_object"}},
    "logit_bias": {"messages": HI, "logit_bias": {"5": 10}},
    "five stop strings": {"messages": HI, "stop": ["a", "b", "c", "d", "e"]},
    "stop not a string": {"messages": HI, "stop": [1]},
    "top_logprobs without logprobs": {"messages": HI, "top_logprobs": 3},
    "top_logprobs above 20": {"messages": HI, "logprobs": True, "top_logprobs": 21},
    "presence_penalty above 2": {"messages": HI, "presence_penalty": 2.5},
    "frequency_penalty below -2": {"messages": HI, "frequency_penalty": -3},
    "stream not a bool": {"messages": HI, "stream": "yes"},
    "system not first": {"messages": HI + [{"role": "assistant", "content": "x"}, {"role": "system", "content": "s"}]
                         + HI},
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_with_a_message(server, case):
    body = BAD[case]
    if isinstance(body, bytes):
        r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                       headers={"content-type": "application/json"})
    else:
        r = post(server, body)
    assert r.status_code == 400, (case, r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and len(err["message"]) > 10


def test_oversized_body_is_a_413(server):
    body = json.dumps({"messages": HI, "padding": "x" * (3 * 2 ** 20)}).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than 2 MiB" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["ready"]


def test_eight_concurrent_streams_all_complete(server):
    """2 workers, 8 clients at once: the rest wait in the queue; every reply is whole and the same as alone."""
    results, errors = {}, []

    def client(i):
        try:
            results[i] = stream_events(server, {"messages": HI if i % 2 else CALC, "temperature": 0})
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 8
    for i, events in results.items():
        assert events[-1] == "[DONE]"
        assert content_of(events) == (EMOJI_REPLY if i % 2 else "It is <<12*3=36>>, so 36.")
    stats = httpx.get(server.url + "/stats").json()
    assert stats["requests"]["queued"] == 0 and sum(w["requests"] for w in stats["workers"]) >= 8
    assert all(w["requests"] > 0 for w in stats["workers"])  # both workers served


def test_health_answers_while_streaming_and_disconnect_frees_the_worker(long_server):
    before = httpx.get(long_server.url + "/stats").json()
    body = {"messages": HI, "temperature": 1.0, "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", long_server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        reader, n, chunks = SSEReader(), 0, r.iter_raw()  # kept referenced: the connection stays open
        while n < 5:
            n += len(reader.feed(next(chunks)))
        t0 = time.perf_counter()
        health = httpx.get(long_server.url + "/health", timeout=5).json()
        assert time.perf_counter() - t0 < 2.0  # the event loop is free while the worker generates
        assert health["workers"]["busy"] == 1
        n += len(reader.feed(next(chunks)))  # still streaming
    # the client is gone: the worker must come back long before 4000 tokens (~25 s here) are generated
    deadline = time.time() + 10
    while httpx.get(long_server.url + "/health").json()["workers"]["busy"] and time.time() < deadline:
        time.sleep(0.1)
    stats = httpx.get(long_server.url + "/stats").json()
    assert stats["workers"][0]["busy"] is False
    assert stats["requests"]["cancelled"] == before["requests"]["cancelled"] + 1
    assert stats["tokens_generated"] - before["tokens_generated"] < 2000
    # and it serves the next request
    obj = post(long_server, {"messages": HI, "max_tokens": 5}).json()
    assert obj["usage"]["completion_tokens"] == 5


def test_one_worker_decodes_concurrent_streams_together_and_frees_each_row(long_server):
    """chat_web's default --batch-size 8: three clients on the one worker are all being decoded at once
    (three busy slots, none queued); each that disconnects gives its row back."""
    before = httpx.get(long_server.url + "/stats").json()
    assert before["workers"][0]["batch"] == 8
    body = {"messages": HI, "temperature": 1.0, "max_tokens": 4000, "stream": True}
    with contextlib.ExitStack() as stack:
        streams = []
        for _ in range(3):
            r = stack.enter_context(httpx.stream("POST", long_server.url + "/v1/chat/completions", json=body,
                                                 timeout=60))
            streams.append((SSEReader(), r.iter_raw()))
        for reader, chunks in streams:  # every stream is producing tokens
            n = 0
            while n < 3:
                n += len(reader.feed(next(chunks)))
        health = httpx.get(long_server.url + "/health", timeout=5).json()
        assert health["slots"] == {"total": 8, "busy": 3} and health["queued"] == 0
        assert health["workers"]["busy"] == 1
    deadline = time.time() + 10
    while httpx.get(long_server.url + "/health").json()["slots"]["busy"] and time.time() < deadline:
        time.sleep(0.1)
    stats = httpx.get(long_server.url + "/stats").json()
    assert stats["workers"][0]["active"] == 0 and stats["workers"][0]["busy"] is False
    assert stats["requests"]["cancelled"] == before["requests"]["cancelled"] + 3


def test_history_longer_than_the_context_is_trimmed(server):
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question number {i} about the quick brown fox"},
                    {"role": "assistant", "content": "the lazy dog " * 3}]
    obj = post(server, {"messages": history + HI, "temperature": 0, "max_tokens": 20}).json()
    assert obj["choices"][0]["finish_reason"] in ("stop", "length")
    assert obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"] <= 64


def test_a_failing_batch_reports_the_error_and_the_worker_recovers(base, monkeypatch):
    """In process (fastapi's TestClient): a decode step that raises fails the requests of that batch with
    a 500 naming the error, and the next request is served by a fresh decoder."""
    from fastapi.testclient import TestClient

    from nanochat.chat_server import create_app
    from nanochat.engine import BatchDecoder, Engine
    from nanochat.tokenizer import get_tokenizer
    from tests.chat_fixtures import _endless_model

    tok = get_tokenizer(base)
    app = create_app([Engine(_endless_model(tok), tok)], "endless", batch_size=4)
    real_step, calls = BatchDecoder.step, []

    def flaky_step(self):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_step(self)

    monkeypatch.setattr(BatchDecoder, "step", flaky_step)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 5})
        assert r.status_code == 500 and "generation failed: RuntimeError: boom" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        stats = client.get("/stats").json()
        assert stats["requests"]["errors"] == 1 and stats["workers"][0]["active"] == 0
