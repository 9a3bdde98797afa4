"""What the chat front ends share: loading a model to talk to, fitting a conversation into the context,
and turning the engine's token stream into text pieces.

- `load_chat_model(source, ...)`: `--source base|sft|rl` (run folders of nanochat/run_dir.PHASE_DIRS)
  through `checkpoint_manager.load_model`, with one-line errors for a missing checkpoint.
- `fit_prompt(tokenizer, messages, context, reserve)`: the tokens that prompt the assistant's next
  reply; when the history is too long for the context, the oldest user/assistant turns are dropped
  (the system message stays), and a single message that is still too long keeps its end.
- `ReplyStream`: feeds on (token, mask) and yields `(part, text)` pieces, part one of "text",
  "python" (a calculator call), "python_output" (its forced result) or "marker". Markers spell the
  tool call the way GSM8K annotates it, `<<12*3=36>>`, so a plain client that concatenates every
  piece reads a sensible reply; `parse_tool_spans` turns such text back into parts when a client
  sends the conversation back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nanochat.engine import StreamDecoder

SOURCES = ("base", "sft", "rl")
TOOL_SPAN = re.compile(r"<<([^<>=\n]{1,400})=([^<>\n]{0,400})>>")


class ChatError(ValueError):
    """A problem with a chat request or model choice, with a message that says what to do."""


def load_chat_model(source: str, device, model_tag: str | None = None, step: int | None = None,
                    base_dir=None, compute_dtype=None):
    """(model, tokenizer, meta, name) of the checkpoint a user asked for; ChatError when there is none."""
    from nanochat.checkpoint_manager import CheckpointError, find_last_step, find_last_tag, load_model
    from nanochat.run_dir import phase_dir

    if source not in SOURCES:
        raise ChatError(f"--source {source!r} is not one of {', '.join(SOURCES)}")
    try:
        if model_tag is None:
            model_tag = find_last_tag(phase_dir(source, base_dir))
        if step is None:
            step = find_last_step(phase_dir(source, base_dir) / model_tag)
        model, tokenizer, meta = load_model(source, device, model_tag=model_tag, step=step, base_dir=base_dir,
                                            compute_dtype=compute_dtype)
    except (CheckpointError, FileNotFoundError) as e:
        hint = {"base": "scripts/base_train.py", "sft": "scripts/chat_sft.py", "rl": "scripts/chat_rl.py"}[source]
        raise ChatError(f"cannot load a {source} model: {e} (train one with {hint}, or pick another with "
                        f"--source / --model-tag / --step)") from None
    name = f"nanochat-{source}-{model_tag}-{step}"
    return model, tokenizer, meta, name


def parse_tool_spans(text: str) -> str | list[dict]:
    """Assistant text with `<<expr=result>>` spans -> tokenizer parts (str when there are none)."""
    parts, pos = [], 0
    for m in TOOL_SPAN.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if not parts:
        return text
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def _render(tokenizer, system: str | None, turns: list[dict]) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + turns
    ids, _ = tokenizer.render_conversation({"messages": messages}, max_tokens=10 ** 12)
    return ids + [tokenizer.encode_special("<|assistant_start|>")]


@dataclass
class FittedPrompt:
    tokens: list[int]
    dropped_messages: int = 0  # oldest messages left out
    cropped: bool = False  # the remaining text was cut at its start


def fit_prompt(tokenizer, messages: list[dict], context: int, reserve: int) -> FittedPrompt:
    """Prompt tokens for the reply to `messages` (optional system, then user/assistant alternating, ending
    with user), at most `context - reserve` long.

    Whole user/assistant pairs are dropped from the start (fewest needed, found by bisection); if the
    last user message alone is too long, the rendered prompt keeps its first two tokens
    (<|bos|><|user_start|>) and its end.
    """
    budget = context - max(1, min(reserve, context // 2))
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    turns = [dict(m, content=parse_tool_spans(m["content"])) if m["role"] == "assistant" else m for m in messages]
    if not turns or turns[-1]["role"] != "user":
        raise ChatError("the conversation must end with a user message")
    ids = _render(tokenizer, system, turns)
    if len(ids) <= budget:
        return FittedPrompt(ids)
    lo, hi = 1, len(turns) // 2  # pairs to drop: the fewest that fit, bisected (rendering is the cost)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        cand = _render(tokenizer, system, turns[2 * mid:])
        if len(cand) <= budget:
            best, hi = (mid, cand), mid - 1
        else:
            lo = mid + 1
    if best is not None:
        return FittedPrompt(best[1], dropped_messages=2 * best[0])
    ids = _render(tokenizer, system, turns[-1:])
    if len(ids) > budget and system is not None:
        ids = _render(tokenizer, None, turns[-1:])
    keep = budget - 2
    return FittedPrompt(ids[:2] + ids[-keep:], dropped_messages=len(turns) - 1, cropped=True)


@dataclass
class ReplyStream:
    """Token stream of one reply -> text pieces, whole characters only (see the module docstring)."""

    tokenizer: object
    part: str = "text"
    finish_reason: str | None = None  # "stop" once a stop token came; callers set "length" otherwise
    tokens: int = 0
    forced: int = 0
    _after_call: bool = False
    _decoder: StreamDecoder = field(init=False)
    _ids: dict = field(init=False)

    def __post_init__(self):
        self._decoder = StreamDecoder(self.tokenizer)
        sp = self.tokenizer.encode_special
        self._ids = {sp(name): name for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                                  "<|output_end|>", "<|assistant_end|>", "<|bos|>")}

    def feed(self, token: int, mask: int = 1) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self.tokens += 1
        self.forced += mask == 0
        name = self._ids.get(token)
        if self._after_call and name != "<|output_start|>":  # the calculator refused: no result
            out.append(("marker", ">>"))
        self._after_call = False
        if name is None:
            text = self._decoder.push(token)
            if text:
                out.append((self.part, text))
            return out
        tail = self._decoder.flush()
        if tail:
            out.append((self.part, tail))
        if name in ("<|assistant_end|>", "<|bos|>"):
            self.finish_reason = "stop"
        elif name == "<|python_start|>":
            self.part = "python"
            out.append(("marker", "<<"))
        elif name == "<|python_end|>":
            self.part = "text"
            self._after_call = True
            out.append(("marker", "="))
        elif name == "<|output_start|>":
            self.part = "python_output"
        elif name == "<|output_end|>":
            self.part = "text"
            out.append(("marker", ">>"))
        return out

    def close(self) -> list[tuple[str, str]]:
        out = []
        tail = self._decoder.flush()
        if tail:
            out.append((self.part, tail))
        if self._after_call:
            out.append(("marker", ">>"))
            self._after_call = False
        return out


def pieces_text(pieces: list[tuple[str, str]]) -> str:
    return "".join(text for _, text in pieces)
