"""The OpenAI API as nanochat's server speaks it: request validation and the shapes of what comes back.

Two endpoints (`/v1/chat/completions`, `/v1/completions`) share one set of sampling fields; everything
a request may say is checked here, and a field that the model cannot honour is refused with one 400
naming it, never silently ignored (README's API table lists both). Logprobs are the model's own
distribution: log-softmax of the raw logits, before penalties, temperature and top-k / top-p (what
clients compare against other implementations of the same model).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from nanochat.engine import MAX_TOP_LOGPROBS

# the reference server's limits (REFERENCE section 11)
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 2 * 2 ** 20  # 32,000 characters fit many times over, even JSON-escaped
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_K_RANGE = (0, 200)
MAX_TOKENS_RANGE = (1, 4096)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty / frequency_penalty
MAX_STOP = 4  # stop strings per request, as OpenAI
MAX_N = 8  # choices per request (and never more than a worker decodes together)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class Sampling:
    """What both endpoints ask of the decoder for each choice (choice i samples with seed + i)."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # None: none; k: the chosen token's and the k most likely
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatRequest:
    messages: list[dict]
    sampling: Sampling


@dataclass
class CompletionRequest:
    prompts: list[tuple[list[int], str]]  # (tokens, text) of each prompt
    echo: bool
    sampling: Sampling


# ---------------------------------------------------------------------------------------------
# fields


def _number(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value}", name)
    return int(value) if integer else float(value)


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise RequestError(f"stop holds {len(stops)} strings (limit {MAX_STOP})", "stop")
    return tuple(s for s in stops if s)


def _refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields the model cannot honour: one 400 naming the field."""
    tools = body.get("tools") or body.get("functions")
    choice = body.get("tool_choice", body.get("function_call"))
    if tools and choice not in (None, "none", "auto"):
        param = "tool_choice" if "tool_choice" in body else "function_call"
        raise RequestError(f"{param} {choice!r} cannot be honoured: this model calls no functions (only its "
                           f"built-in calculator); send tool_choice 'none' or 'auto', or no tools", param)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise RequestError("response_format other than {'type': 'text'} is not supported (no constrained "
                           "decoding: the model cannot promise JSON)", "response_format")
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported by this server", "logit_bias")
    if not chat:
        if body.get("suffix"):
            raise RequestError("suffix (insertion) is not supported: the model only continues text", "suffix")
        best_of = body.get("best_of")
        if best_of is not None and best_of != body.get("n", 1):
            raise RequestError("best_of is not supported (every choice is returned; use n)", "best_of")


def _sampling(body: dict, defaults: dict, max_n: int, chat: bool, min_tokens: int = 1) -> Sampling:
    temperature = _number(body, "temperature", defaults["temperature"], *TEMPERATURE_RANGE)
    top_k = _number(body, "top_k", defaults["top_k"], *TOP_K_RANGE, integer=True)
    top_p = _number(body, "top_p", None, 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise RequestError("top_p must be greater than 0", "top_p")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, defaults["max_tokens"], min_tokens, MAX_TOKENS_RANGE[1], integer=True)
    n = _number(body, "n", 1, 1, 10 ** 6, integer=True)
    if n > max_n:
        raise RequestError(f"n must be at most {max_n} on this server (choices are decoded together as rows of "
                           f"one batch: see --batch-size), got {n}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    seed = _number(body, "seed", None, -(2 ** 63), 2 ** 63 - 1, integer=True)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise RequestError(f"logprobs must be true or false, got {want!r}", "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not want:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    return Sampling(max_tokens, temperature, top_k or None, top_p,
                    seed if seed is not None else secrets.randbits(31),
                    _number(body, "presence_penalty", 0.0, *PENALTY_RANGE),
                    _number(body, "frequency_penalty", 0.0, *PENALTY_RANGE), _stop(body), n, logprobs, stream,
                    bool(options.get("include_usage")))


# ---------------------------------------------------------------------------------------------
# chat


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


def validate_chat(body, defaults: dict, max_n: int = 1) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = normalize_messages(body.get("messages"))
    _refuse_unsupported(body, chat=True)
    return ChatRequest(messages, _sampling(body, defaults, max_n, chat=True))


# ---------------------------------------------------------------------------------------------
# completions


def _prompts(raw, tokenizer, vocab_size: int) -> list[tuple[list[int], str]]:
    """`prompt` as OpenAI allows it: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(raw, str):
        raw = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool) for t in raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise RequestError("prompt must be a string, a list of strings, a list of token ids or a list of such "
                           "lists", "prompt")
    if len(raw) > MAX_PROMPTS:
        raise RequestError(f"prompt holds {len(raw)} prompts (limit {MAX_PROMPTS})", "prompt")
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if len(p) > MAX_TOTAL_CHARS:
                raise RequestError(f"prompt[{i}] is {len(p):,} characters long (limit {MAX_TOTAL_CHARS:,})",
                                   "prompt")
            out.append((tokenizer.encode(p), p))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if any(not 0 <= t < vocab_size for t in p):
                raise RequestError(f"prompt[{i}] holds a token id outside the vocabulary (0-{vocab_size - 1})",
                                   "prompt")
            out.append((list(p), tokenizer.decode(p)))
        else:
            raise RequestError(f"prompt[{i}] must be a string or a list of token ids", "prompt")
    return out


def validate_completion(body, defaults: dict, tokenizer, vocab_size: int, context: int,
                        max_n: int = 1) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _refuse_unsupported(body, chat=False)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(f"echo must be true or false, got {echo!r}", "echo")
    # max_tokens 0 only makes sense with echo: score the prompt, generate nothing
    # (16: OpenAI's default max_tokens for /v1/completions)
    sampling = _sampling(body, dict(defaults, max_tokens=16), max_n, chat=False, min_tokens=0 if echo else 1)
    prompts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    if sampling.n * len(prompts) > MAX_PROMPTS:
        raise RequestError(f"n x prompts = {sampling.n * len(prompts)} choices (limit {MAX_PROMPTS})", "n")
    for i, (tokens, _) in enumerate(prompts):
        if not tokens:
            raise RequestError(f"prompt[{i}] is empty", "prompt")
        if len(tokens) > context:
            raise RequestError(f"prompt[{i}] is {len(tokens)} tokens long; this model's context is {context} "
                               f"tokens (completions are never cropped: shorten the prompt)", "prompt")
    return CompletionRequest(prompts, echo, sampling)


# ---------------------------------------------------------------------------------------------
# logprobs in OpenAI's shapes


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """(text, bytes) of one token; a token that is not whole UTF-8 (a piece of a character) is spelled
    `bytes:\\xNN...`, as OpenAI does."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def chat_logprob(tokenizer, token: int, logprob: float, top: list | None) -> dict:
    text, raw = token_text(tokenizer, token)
    entry = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
    for t, lp in top or []:
        tt, tb = token_text(tokenizer, t)
        entry["top_logprobs"].append({"token": tt, "logprob": lp, "bytes": tb})
    return entry


def completion_logprobs(tokenizer, entries: list[tuple[int, float | None, list | None, int]]) -> dict:
    """Legacy completions shape from [(token, logprob, top, text_offset)]: top_logprobs holds the top k
    and the chosen token (up to k + 1 entries, as OpenAI); a token with no logprob (the first of an
    echoed prompt) gets null in both lists."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top, offset in entries:
        text, _ = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["text_offset"].append(offset)
        if lp is None:
            out["top_logprobs"].append(None)
            continue
        tops = {token_text(tokenizer, t)[0]: v for t, v in top or []}
        tops.setdefault(text, lp)
        out["top_logprobs"].append(tops)
    return out
