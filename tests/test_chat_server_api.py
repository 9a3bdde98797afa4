"""The OpenAI API features real clients use, through the official `openai` client against the real server
(`python -m scripts.chat_web` on a free port): stop strings, logprobs, n, penalties, /v1/completions with
echo, /v1/models/{id}, errors, refusals, the trimmed-prompt header, /metrics, start-up and upload checks.

Expected values come from the model itself, loaded from the same checkpoint in the test and run
without the server (full forwards, no KV cache): log-softmax for logprobs, `loss_eval.per_token_loss`
for echoed prompt scores, a plain greedy loop with OpenAI's penalty formula for penalties."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.chat_fixtures import EMOJI_REPLY, REPO_ROOT, chat_base_dir, shared_server, subprocess_env
from tests.chat_helpers import penalized_greedy

pytestmark = pytest.mark.slow
HI = [{"role": "user", "content": "hi"}]
TEXT = "The quick brown fox jumps over the lazy dog. Hello there, how are you today?"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return chat_base_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def server(base):
    return shared_server(base, "sft")


@pytest.fixture(scope="module")
def long_server(base):
    return shared_server(base, "long")


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def long_client(long_server):
    from openai import OpenAI

    return OpenAI(base_url=long_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _load(base, phase, tag):
    from nanochat.checkpoint_manager import load_model

    model, tok, _ = load_model(phase, "cpu", model_tag=tag, base_dir=base)
    return model, tok


@pytest.fixture(scope="module")
def sft_model(base):
    return _load(base, "sft", "tiny")


@pytest.fixture(scope="module")
def long_model(base):
    return _load(base, "base", "long")


def chat(client, stream, **kw):
    """(content, finish_reasons by index, logprob entries by index, usage) of a chat completion."""
    kw = dict(dict(model="m", messages=HI, temperature=0), **kw)
    if not stream:
        r = client.chat.completions.create(**kw)
        return ({c.index: c.message.content for c in r.choices}, {c.index: c.finish_reason for c in r.choices},
                {c.index: (c.logprobs.content if c.logprobs else None) for c in r.choices}, r.usage)
    texts, finish, entries, usage = {}, {}, {}, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
            if c.logprobs is not None and c.logprobs.content:
                entries.setdefault(c.index, []).extend(c.logprobs.content)
    return texts, finish, entries, usage


# ---------------------------------------------------------------------------------------------
# stop strings


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["how", ["zzz", "re 😀 h"], "😀", "Hello"])
def test_stop_strings_end_the_reply_and_never_appear(client, stream, stop):
    stops = [stop] if isinstance(stop, str) else stop
    cut = min(EMOJI_REPLY.find(s) for s in stops if s in EMOJI_REPLY)
    texts, finish, _, usage = chat(client, stream, stop=stop)
    assert texts[0] == EMOJI_REPLY[:cut] and finish[0] == "stop"
    assert not any(s in texts[0] for s in stops)
    assert 0 < usage.completion_tokens  # the tokens generated up to the stop are counted


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_that_never_comes_changes_nothing(client, stream):
    texts, finish, _, _ = chat(client, stream, stop=["nowhere", "xyz"])
    assert texts[0] == EMOJI_REPLY and finish[0] == "stop"


def test_stop_string_in_a_stream_is_held_back_not_taken_back(server):
    """Streamed deltas only ever extend the text: the held-back prefix of a stop string is released when
    the next token shows it was not one, and never sent when it was."""
    import json

    from nanochat.chat_server import SSEReader

    for stop, expect in (("there X", EMOJI_REPLY), ("there 😀", "Hello ")):
        body = {"messages": HI, "temperature": 0, "stream": True, "stop": stop}
        seen, reader = "", SSEReader()
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for raw in r.iter_raw():
                for data in reader.feed(raw):
                    if data != "[DONE]":
                        for c in json.loads(data)["choices"]:
                            seen += c["delta"].get("content") or ""
                            assert stop not in seen and expect.startswith(seen)
        assert seen == expect


# ---------------------------------------------------------------------------------------------
# logprobs


def _model_logprobs(model, tok, prompt_ids, reply_ids):
    """log-softmax of the model's logits at each reply position, from one full forward (no cache)."""
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(ids)[0].float()
    return torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1:-1]  # predicts each reply token


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_are_the_model_distribution(client, sft_model, stream):
    model, tok = sft_model
    texts, _, entries, _ = chat(client, stream, logprobs=True, top_logprobs=5)
    got = entries[0]
    reply_bytes = b"".join(bytes(e.bytes) for e in got)
    assert reply_bytes.decode() == texts[0] == EMOJI_REPLY  # one entry per content token, stop token excluded
    prompt = tok.encode("hi", prepend="<|bos|>")
    prompt = [prompt[0], tok.encode_special("<|user_start|>"), *prompt[1:], tok.encode_special("<|user_end|>"),
              tok.encode_special("<|assistant_start|>")]
    reply = tok.encode(EMOJI_REPLY)
    assert len(got) == len(reply)
    expect = _model_logprobs(model, tok, prompt, reply)
    for k, e in enumerate(got):
        assert len(e.top_logprobs) == 5
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
        assert e.top_logprobs[0].logprob == e.logprob  # temperature 0: the sampled token is the argmax
        assert bytes(e.top_logprobs[0].bytes) == bytes(e.bytes)
        assert int(expect[k].argmax()) == reply[k]
        assert abs(e.logprob - float(expect[k, reply[k]])) < 1e-4
        top = expect[k].topk(5).values.tolist()
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top, abs=1e-4)


def test_logprobs_without_top_and_off_by_default(client):
    _, _, entries, _ = chat(client, False, logprobs=True)
    assert entries[0] and all(e.top_logprobs == [] for e in entries[0])
    _, _, entries, _ = chat(client, False)
    assert entries[0] is None


# ---------------------------------------------------------------------------------------------
# n


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_decode_together_and_usage_counts_them_all(long_client, stream):
    texts, finish, entries, usage = chat(long_client, stream, n=3, temperature=1.0, seed=5, max_tokens=6,
                                         logprobs=True)
    assert sorted(texts) == [0, 1, 2] and all(finish[i] == "length" for i in range(3))
    assert len(set(texts.values())) == 3  # each choice samples with its own generator
    assert usage.completion_tokens == 18 and all(len(entries[i]) == 6 for i in range(3))
    again, _, _, _ = chat(long_client, stream, n=3, temperature=1.0, seed=5, max_tokens=6)
    assert again == texts  # the seed reproduces them
    alone, _, _, _ = chat(long_client, stream, n=1, temperature=1.0, seed=5, max_tokens=6)
    assert alone[0] == texts[0]  # choice 0 does not depend on its batch mates


# ---------------------------------------------------------------------------------------------
# penalties


def _text(tok, ids):
    """What a completion's text shows of `ids`: special tokens are skipped (as vLLM's default)."""
    specials = set(tok.special_tokens.values())
    return tok.decode([t for t in ids if t not in specials])


@pytest.mark.parametrize("presence,frequency", [(0.0, 0.0), (0.0, 1.5), (2.0, 0.0), (-1.0, 0.7)])
def test_penalties_match_openais_definition(long_client, long_model, presence, frequency):
    model, tok = long_model
    prompt = tok.encode("Hello there, how are", prepend="<|bos|>")
    expect = penalized_greedy(model, prompt, 24, presence, frequency)
    r = long_client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                       presence_penalty=presence, frequency_penalty=frequency)
    assert r.choices[0].text == _text(tok, expect)
    if presence or frequency:  # the penalty changed the reply (the test is not vacuous)
        assert expect != penalized_greedy(model, prompt, 24, 0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# /v1/completions


def _losses(model, tok, text):
    from nanochat.loss_eval import per_token_loss

    ids = tok.encode(text, prepend="<|bos|>")
    with torch.no_grad():
        loss = per_token_loss(model, torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))[0]
    return ids, loss.tolist()


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs_equal_our_per_token_losses(long_server, long_client, long_model, max_tokens):
    model, tok = long_model
    ids, losses = _losses(model, tok, TEXT)
    r = long_client.completions.create(model="m", prompt=ids, max_tokens=max_tokens, echo=True, logprobs=2,
                                       temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + max_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k in range(1, len(ids)):
        assert abs(-lp.token_logprobs[k] - losses[k - 1]) < 1e-4
        assert len(lp.top_logprobs[k]) <= 3 and max(lp.top_logprobs[k].values()) >= lp.token_logprobs[k] - 1e-6
    assert r.choices[0].text.startswith(tok.decode(ids))
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == max_tokens
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_streamed_echo_logprobs_equal_the_whole_response(long_client, long_model):
    model, tok = long_model
    ids = tok.encode(TEXT, prepend="<|bos|>")
    kw = dict(model="m", prompt=ids, max_tokens=3, echo=True, logprobs=1, temperature=0)
    whole = long_client.completions.create(**kw).choices[0]
    text, lps, tops = "", [], []
    for chunk in long_client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                lps += c.logprobs.token_logprobs
                tops += c.logprobs.top_logprobs
    assert text == whole.text and lps == whole.logprobs.token_logprobs and tops == whole.logprobs.top_logprobs


def test_completions_text_prompts_list_n_stream_and_seed(long_client, long_model):
    model, tok = long_model
    prompts = ["Hello there", "The quick brown fox"]
    r = long_client.completions.create(model="m", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by = {c.index: c.text for c in r.choices}
    for p, text in enumerate(prompts):  # greedy: both choices of a prompt are the model's own continuation
        ids = tok.encode(text)
        expect = penalized_greedy(model, ids, 5, 0.0, 0.0)
        assert by[2 * p] == by[2 * p + 1] == _text(tok, expect)
    assert r.usage.completion_tokens == 20
    streamed = {}
    for chunk in long_client.completions.create(model="m", prompt=prompts, max_tokens=5, temperature=0, n=2,
                                                stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == by
    a = long_client.completions.create(model="m", prompt="Hello", max_tokens=8, temperature=1.0, seed=11)
    b = long_client.completions.create(model="m", prompt="Hello", max_tokens=8, temperature=1.0, seed=11)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_completions_stop_and_echo(long_client, long_model, stream):
    model, tok = long_model
    ids = tok.encode("Hello there")
    full = _text(tok, penalized_greedy(model, ids, 12, 0.0, 0.0))
    stop = full[4:7]
    kw = dict(model="m", prompt="Hello there", max_tokens=12, temperature=0, stop=stop, echo=True)
    if stream:
        text, finish = "", None
        for chunk in long_client.completions.create(stream=True, **kw):
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
    else:
        c = long_client.completions.create(**kw).choices[0]
        text, finish = c.text, c.finish_reason
    assert text == "Hello there" + full[:full.find(stop)] and finish == "stop"


def test_completion_prompt_longer_than_the_context_is_refused(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="context") as e:
        client.completions.create(model="m", prompt=[5] * 65, max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="m", prompt="hi", max_tokens=0)  # 0 only with echo


# ---------------------------------------------------------------------------------------------
# models, errors, refusals


def test_model_by_id_and_errors_in_openai_shape(server, client):
    import openai

    assert client.models.retrieve("nanochat-sft-tiny-1").id == "nanochat-sft-tiny-1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    for method, path, status in (("GET", "/v1/models/gpt-9", 404), ("GET", "/v1/nothing", 404),
                                 ("GET", "/v1/chat/completions", 405), ("PUT", "/v1/completions", 405)):
        r = httpx.request(method, server.url + path, timeout=30)
        err = r.json()["error"]
        assert r.status_code == status and set(err) == {"message", "type", "param", "code"} and err["message"]


@pytest.mark.parametrize("field,value,extra", [
    ("tool_choice", "required", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}, {}),
    ("logit_bias", {"3": 5}, {}),
    ("n", 9, {}),
])
def test_fields_the_model_cannot_honour_are_refused_naming_the_field(client, field, value, extra):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=HI, **{field: value}, **extra)
    assert e.value.body["param"] == field and field in e.value.body["message"]


def test_tools_with_tool_choice_auto_are_accepted(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    texts, finish, _, _ = chat(client, False, tools=tools, tool_choice="auto", response_format={"type": "text"})
    assert texts[0] == EMOJI_REPLY and finish[0] == "stop"


def test_trimmed_prompt_is_visible_in_a_header_and_logged(server):
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question number {i} about the quick brown fox"},
                    {"role": "assistant", "content": "the lazy dog " * 3}]
    for stream in (False, True):
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"messages": history + HI, "max_tokens": 5, "stream": stream})
        assert r.status_code == 200
        assert r.headers["x-nanochat-prompt-trimmed"].startswith("dropped_messages=")
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": HI, "max_tokens": 5}, timeout=60)
    assert "x-nanochat-prompt-trimmed" not in r.headers
    assert "prompt trimmed to fit the 64-token context" in server.output()


# ---------------------------------------------------------------------------------------------
# metrics, start-up, uploads


def test_metrics_in_prometheus_text_format(server, client):
    chat(client, False)
    httpx.post(server.url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['nanochat_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples['nanochat_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 1
    assert samples["nanochat_prompt_tokens_total"] > 0 and samples["nanochat_completion_tokens_total"] > 0
    assert samples["nanochat_slots_busy"] + samples["nanochat_slots_free"] == 16  # 2 workers x 8 rows
    assert samples["nanochat_queue_depth"] == 0
    for h in ("nanochat_time_to_first_token_seconds", "nanochat_request_duration_seconds"):
        assert samples[f"{h}_count"] >= 1 and samples[f'{h}_bucket{{le="+Inf"}}'] == samples[f"{h}_count"]
        assert f"# TYPE {h} histogram" in text


def test_busy_port_is_reported_before_the_model_loads(base):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--source", "sft", "--port", str(port)],
                             cwd=REPO_ROOT, env=subprocess_env(base), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "worker 0" not in out.stdout + out.stderr  # no model was loaded


def test_client_gone_during_upload_is_one_log_line(server):
    before = server.output().count("went away while uploading")
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n{\"messages\": [")
        time.sleep(0.5)
    deadline = time.time() + 30
    while server.output().count("went away while uploading") == before and time.time() < deadline:
        time.sleep(0.2)
    out = server.output()
    assert out.count("went away while uploading") == before + 1
    assert "Traceback" not in out
    assert httpx.get(server.url + "/health", timeout=30).json()["ready"]


def test_full_queue_is_a_503_in_openai_shape(base):
    """In process: one row, no queue: while a reply streams, the next request is refused at once."""
    from fastapi.testclient import TestClient

    from nanochat.chat_server import create_app
    from nanochat.engine import Engine
    from nanochat.tokenizer import get_tokenizer
    from tests.chat_fixtures import _endless_model

    tok = get_tokenizer(base)
    app = create_app([Engine(_endless_model(tok), tok)], "endless", batch_size=1, max_queue=0)
    with TestClient(app) as client:
        body = {"messages": HI, "max_tokens": 4000, "stream": True}
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while "content" not in next(lines):
                pass
            busy = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_error"
            assert "queued" in busy.json()["error"]["message"]
        deadline = time.time() + 30
        while client.get("/health").json()["slots"]["busy"] and time.time() < deadline:
            time.sleep(0.1)
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
