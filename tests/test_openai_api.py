"""Request validation and response shapes of the OpenAI API (no server): what each field becomes, what is
refused (with the field named), and the logprob shapes."""

import pytest

from nanochat.openai_api import (RequestError, completion_logprobs, token_text, validate_chat,
                                 validate_completion)
from nanochat.tokenizer import Tokenizer

DEFAULTS = dict(temperature=0.6, top_k=50, max_tokens=512)
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok():
    texts = ["Hello there, how are you today? I am fine.", "What is 12 times 3? It is 36."] * 20
    return Tokenizer.train_from_iterator(texts, vocab_size=300)


def test_chat_sampling_fields():
    s = validate_chat({"messages": HI, "stop": "x", "n": 3, "logprobs": True, "top_logprobs": 4,
                       "presence_penalty": 1.5, "frequency_penalty": -0.5, "seed": 9}, DEFAULTS, max_n=8).sampling
    assert (s.stop, s.n, s.logprobs, s.presence_penalty, s.frequency_penalty, s.seed) == (("x",), 3, 4, 1.5, -0.5, 9)
    s = validate_chat({"messages": HI, "stop": ["a", "", "b"], "logprobs": True}, DEFAULTS).sampling
    assert s.stop == ("a", "b") and s.logprobs == 0
    assert validate_chat({"messages": HI, "logprobs": False}, DEFAULTS).sampling.logprobs is None
    tools = [{"type": "function", "function": {"name": "f"}}]
    for ok in ({"tools": tools}, {"tools": tools, "tool_choice": "auto"}, {"tools": tools, "tool_choice": "none"},
               {"response_format": {"type": "text"}}, {"logit_bias": {}}):
        validate_chat({"messages": HI, **ok}, DEFAULTS)


@pytest.mark.parametrize("extra,param", [
    ({"n": 2}, "n"),  # max_n 1 by default
    ({"tools": [{"type": "function"}], "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"functions": [{"name": "f"}], "function_call": "f"}, "function_call"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 1}}, "logit_bias"),
    ({"stop": ["a"] * 5}, "stop"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
])
def test_chat_refusals_name_the_field(extra, param):
    with pytest.raises(RequestError) as e:
        validate_chat({"messages": HI, **extra}, DEFAULTS)
    assert e.value.param == param and e.value.status == 400


def test_completion_prompts_in_every_form(tok):
    ids = tok.encode("Hello there")
    for prompt, expect in (("Hello there", [ids]), (["Hello there", "how"], [ids, tok.encode("how")]),
                           (ids, [ids]), ([ids, ids[:2]], [ids, ids[:2]])):
        req = validate_completion({"prompt": prompt}, DEFAULTS, tok, 300, 64)
        assert [t for t, _ in req.prompts] == expect
    req = validate_completion({"prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 1}, DEFAULTS, tok, 300, 64)
    assert req.echo and req.sampling.max_tokens == 0 and req.sampling.logprobs == 1
    assert validate_completion({"prompt": "x"}, DEFAULTS, tok, 300, 64).sampling.max_tokens == 16  # OpenAI's default


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": [1] * 65}, "prompt"),  # longer than the context: refused, never cropped
    ({"prompt": [1, 300]}, "prompt"),  # outside the vocabulary
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], "x", 3]}, "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
])
def test_completion_refusals_name_the_field(tok, body, param):
    with pytest.raises(RequestError) as e:
        validate_completion(body, DEFAULTS, tok, 300, 64)
    assert e.value.param == param


def test_logprob_shapes(tok):
    ids = tok.encode("Hello there, how")
    assert token_text(tok, ids[0]) == (tok.decode([ids[0]]), list(tok.decode_bytes([ids[0]])))
    assert token_text(tok, 0xE6)[0].startswith("bytes:\\x")  # a lone lead byte is not text
    out = completion_logprobs(tok, [(ids[0], None, None, 0), (ids[1], -1.5, [(ids[2], -0.5)], 3)])
    assert out["token_logprobs"] == [None, -1.5] and out["top_logprobs"][0] is None
    assert out["top_logprobs"][1] == {token_text(tok, ids[2])[0]: -0.5, token_text(tok, ids[1])[0]: -1.5}
    assert out["text_offset"] == [0, 3]
