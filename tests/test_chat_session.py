"""Prompt fitting, tool-span parsing, reply pieces, request validation and the SSE reader (no server)."""

import json

import pytest

from nanochat.chat_server import SSEReader
from nanochat.chat_session import ChatError, ReplyStream, fit_prompt, parse_tool_spans, pieces_text
from nanochat.openai_api import RequestError, normalize_messages, validate_chat
from nanochat.tokenizer import Tokenizer

TEXTS = ["Hello there, how are you today? I am fine.", "What is 12 times 3? It is 36."] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(TEXTS, vocab_size=300)


def conv(n_pairs, last="hi"):
    msgs = []
    for i in range(n_pairs):
        msgs += [{"role": "user", "content": f"question {i} how are you"},
                 {"role": "assistant", "content": f"fine {i}"}]
    return msgs + [{"role": "user", "content": last}]


def completion_ids(tok, messages):
    """The reference rendering: the tokenizer's own prompt for the assistant's next reply."""
    return tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def test_fit_prompt_keeps_a_short_history_whole(tok):
    msgs = [{"role": "system", "content": "be brief"}] + conv(2)
    fitted = fit_prompt(tok, msgs, context=512, reserve=64)
    assert fitted.tokens == completion_ids(tok, msgs) and fitted.dropped_messages == 0 and not fitted.cropped


def test_fit_prompt_drops_the_fewest_oldest_turns(tok):
    msgs = [{"role": "system", "content": "be brief"}] + conv(10)
    context, reserve = 96, 32
    fitted = fit_prompt(tok, msgs, context, reserve)
    d = fitted.dropped_messages
    assert d > 0 and d % 2 == 0 and not fitted.cropped
    assert fitted.tokens == completion_ids(tok, msgs[:1] + msgs[1 + d:])  # the system message stays
    assert len(fitted.tokens) <= context - reserve
    assert len(completion_ids(tok, msgs[:1] + msgs[1 + d - 2:])) > context - reserve  # one pair fewer won't fit


def test_fit_prompt_crops_a_single_long_message(tok):
    msgs = [{"role": "user", "content": "how are you " * 200}]
    fitted = fit_prompt(tok, msgs, context=64, reserve=16)
    full = completion_ids(tok, msgs)
    assert fitted.cropped and len(fitted.tokens) == 48
    assert fitted.tokens[:2] == full[:2] and fitted.tokens[2:] == full[-46:]
    with pytest.raises(ChatError, match="end with a user message"):
        fit_prompt(tok, msgs + [{"role": "assistant", "content": "x"}], 64, 16)


def test_tool_spans_round_trip_to_parts(tok):
    parts = parse_tool_spans("It is <<12*3=36>>, so 36.")
    assert parts == [{"type": "text", "text": "It is "}, {"type": "python", "text": "12*3"},
                     {"type": "python_output", "text": "36"}, {"type": "text", "text": ", so 36."}]
    assert parse_tool_spans("no tools, a << b") == "no tools, a << b"
    # a reply streamed by ReplyStream and sent back renders to the tokens the model produced
    sp = tok.encode_special
    reply = [*tok.encode("It is "), sp("<|python_start|>"), *tok.encode("12*3"), sp("<|python_end|>"),
             sp("<|output_start|>"), *tok.encode("36"), sp("<|output_end|>"), *tok.encode(", so 36."),
             sp("<|assistant_end|>")]
    stream = ReplyStream(tok)
    pieces = [p for t in reply for p in stream.feed(t)] + stream.close()
    text = pieces_text(pieces)
    assert text == "It is <<12*3=36>>, so 36." and stream.finish_reason == "stop"
    ids, _ = tok.render_conversation({"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": parse_tool_spans(text)}]})
    assert ids[-len(reply):] == reply


def test_reply_stream_marks_a_refused_call(tok):
    sp = tok.encode_special
    stream = ReplyStream(tok)
    tokens = [sp("<|python_start|>"), *tok.encode("x"), sp("<|python_end|>"), *tok.encode("ok")]
    pieces = [p for t in tokens for p in stream.feed(t)] + stream.close()
    assert pieces_text(pieces) == "<<x=>>ok" and stream.finish_reason is None


DEFAULTS = dict(temperature=0.6, top_k=50, max_tokens=512)


def test_validate_request_defaults_and_fields():
    s = validate_chat({"messages": [{"role": "user", "content": "hi"}]}, DEFAULTS).sampling
    assert (s.temperature, s.top_k, s.max_tokens, s.stream, s.top_p) == (0.6, 50, 512, False, None)
    req = validate_chat({"messages": [{"role": "developer", "content": "sys"},
                                         {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                      {"type": "text", "text": "b"}]},
                                         {"role": "user", "content": "c"}],
                            "temperature": 0, "top_k": 0, "max_completion_tokens": 7, "top_p": 0.9, "seed": 3,
                            "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"}, DEFAULTS)
    assert req.messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab\n\nc"}]
    s = req.sampling
    assert (s.temperature, s.top_k, s.max_tokens, s.top_p, s.seed, s.include_usage) == (0.0, None, 7, 0.9, 3, True)
    with pytest.raises(RequestError, match="messages\\[1\\].role 'tool'"):
        normalize_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


def test_sse_reader_joins_events_split_across_chunks():
    event = 'data: {"content": "caf\u00e9 \U0001F600"}\n\n'.encode()
    emoji_at = event.index("\U0001F600".encode())
    for cut in range(1, len(event)):  # every split point, including inside the 4-byte emoji
        r = SSEReader()
        assert r.feed(event[:cut]) == []
        assert [json.loads(e) for e in r.feed(event[cut:])] == [{"content": "caf\u00e9 \U0001F600"}]
    r = SSEReader()
    out = r.feed(event[:emoji_at + 2]) + r.feed(event[emoji_at + 2:emoji_at + 3]) + r.feed(event[emoji_at + 3:])
    assert out == ['{"content": "caf\u00e9 \U0001F600"}']
    r = SSEReader()
    assert r.feed(b"data: a\r\n\r\n: comment\n\ndata: b\ndata: c\n\ndata: [DONE]\n\n") == ["a", "b\nc", "[DONE]"]
