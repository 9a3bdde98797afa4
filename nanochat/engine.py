"""Inference: a KV cache, prefill once, then decode token by token with temperature / top-k / top-p.

Several samples of one prompt are decoded in one batch: the prompt is prefilled once (batch 1), its
cache replicated across the samples, and every sample then advances one token per forward pass.
Greedy decoding through the cache reproduces naive full-recompute generation exactly (tested).

Tool use (the calculator, nanochat/tools.py): when a sample emits `<|python_start|>expr<|python_end|>`,
the engine evaluates `expr` and forces `<|output_start|>result<|output_end|>` into that sample, one
token per step, with mask 0 (the model did not choose them; SFT does not train on them). A refused
expression forces nothing and the model goes on.

Stops: a sample ends at a stop token (`<|assistant_end|>` or `<|bos|>` by default), after
`max_tokens`, or when prompt + reply fill the model's context (`config.sequence_len`), whichever comes
first; a caller's `should_stop()` ends all samples (a web client that went away).

`StreamDecoder` turns a token stream into text without ever splitting a multi-byte UTF-8 character
(byte-level BPE tokens may end mid-character: an emoji is often 2-4 tokens).
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from nanochat.gpt import GPT
from nanochat.tools import MAX_EXPR_CHARS, calculate


class KVCache:
    """Keys and values of every layer: (layers, batch, time, kv_heads, head_dim); `pos` tokens filled."""

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int, head_dim: int,
                 device, dtype):
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int) -> "KVCache":
        c = model.config
        return cls(c.n_layer, batch_size, max_len, c.n_kv_head, c.head_dim, model.get_device(), model.compute_dtype)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's (B, T, K, D) keys/values at `pos`; return the cache up to pos + T."""
        T = k.size(1)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n

    def expand(self, batch_size: int) -> "KVCache":
        """A cache for `batch_size` rows, each a copy of this (batch-1) cache."""
        if self.k.size(1) != 1:
            raise ValueError("only a batch-1 cache can be expanded")
        new = KVCache.__new__(KVCache)
        new.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        new.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()
        new.pos = self.pos
        return new


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None,
                top_p: float | None = None):
    """logits (B, V) -> next ids (B, 1). temperature 0 = greedy; top_k / top_p (nucleus) restrict the choice."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    elif top_p is not None and top_p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        probs = torch.softmax(logits, dim=-1)
        return torch.multinomial(probs, 1, generator=generator)
    probs = torch.softmax(vals, dim=-1)
    if top_p is not None and top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        outside = probs.cumsum(dim=-1) - probs >= top_p
        probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return idx.gather(-1, choice)


TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


class _Sample:
    """Decode state of one sample: finished?, inside a tool call?, tokens still to force."""

    __slots__ = ("done", "in_python", "expr", "forced")

    def __init__(self):
        self.done = False
        self.in_python = False
        self.expr: list[int] = []
        self.forced: deque[int] = deque()


class Engine:
    def __init__(self, model: GPT, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    def _stop_tokens(self, stop_tokens):
        if stop_tokens is not None:
            return set(stop_tokens)
        stops = set()
        if self.tokenizer is not None:
            for name in ("<|assistant_end|>", "<|bos|>"):
                try:
                    stops.add(self.tokenizer.encode_special(name))
                except Exception:  # a tokenizer without chat specials simply has fewer stops
                    pass
        return stops

    def _tool_ids(self):
        """(python_start, python_end, output_start, output_end) ids, or None without a chat tokenizer."""
        if self.tokenizer is None:
            return None
        try:
            return tuple(self.tokenizer.encode_special(name) for name in TOOL_TOKENS)
        except (KeyError, AttributeError):
            return None

    def _advance(self, sample: _Sample, token: int, tool_ids) -> None:
        """Track a tool call; on its closing token queue the calculator's output to be forced."""
        python_start, python_end, output_start, output_end = tool_ids
        if token == python_start:
            sample.in_python, sample.expr = True, []
        elif token == python_end and sample.in_python:
            sample.in_python = False
            result = None
            if len(sample.expr) <= MAX_EXPR_CHARS:  # each token is at least one character
                result = calculate(self.tokenizer.decode(sample.expr))
            if result is not None:
                sample.forced.extend([output_start, *self.tokenizer.encode(result), output_end])
        elif sample.in_python:
            sample.expr.append(token)

    @torch.inference_mode()
    def generate(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42, stop_tokens=None, tools: bool = True,
                 should_stop: Callable[[], bool] | None = None,
                 top_p: float | None = None) -> Iterator[tuple[list[int | None], list[int]]]:
        """Yield, per decode step, (token of each sample, mask of each sample).

        mask 1: the model sampled the token; 0: the engine forced it (calculator output). A sample's
        stop token is yielded (mask 1) on the step it is sampled; after that the sample's entries are
        (None, 0). The generator returns once every sample is done, after `max_tokens` steps, when
        prompt + reply reach the model's context length (at once, yielding nothing, for a prompt that
        already fills it), or when `should_stop()` returns True.
        """
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the BOS token)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        model, device = self.model, self.model.get_device()
        # prompt + reply fit the context; a prompt that already fills it gets no reply (chat front ends
        # drop the oldest turns before they get here: nanochat.chat_session.fit_prompt)
        max_tokens = min(max_tokens, model.config.sequence_len - len(tokens))
        if max_tokens <= 0:
            return
        stops = self._stop_tokens(stop_tokens)
        tool_ids = self._tool_ids() if tools else None
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        prefill = KVCache.for_model(model, 1, len(tokens) + max_tokens)
        idx = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits = model(idx, kv_cache=prefill)[:, -1, :]  # (1, V)
        cache = prefill.expand(num_samples)
        logits = logits.expand(num_samples, -1)
        samples = [_Sample() for _ in range(num_samples)]
        for step in range(max_tokens):
            if should_stop is not None and should_stop():
                return
            sampled = sample_next(logits, temperature, top_k, gen, top_p)[:, 0].tolist()  # (N,)
            ids: list[int | None] = []
            masks: list[int] = []
            for s, t in zip(samples, sampled):
                if s.done:
                    ids.append(None)
                    masks.append(0)
                    continue
                if s.forced:
                    t, m = s.forced.popleft(), 0
                else:
                    m = 1
                    if t in stops:
                        s.done = True
                    elif tool_ids is not None:
                        self._advance(s, t, tool_ids)
                ids.append(t)
                masks.append(m)
            yield ids, masks
            if all(s.done for s in samples) or step == max_tokens - 1:
                return
            feed = [t if t is not None else 0 for t in ids]  # finished rows: any token, never read
            nxt = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1)  # (N, 1)
            logits = model(nxt, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42, stop_tokens=None,
                       tools: bool = True, top_p: float | None = None):
        """Complete generations: (list of token lists each starting with the prompt, list of masks).

        A sample stops at its first stop token (which is not included); mask is 0 on prompt tokens and
        on forced tool-output tokens, 1 on sampled tokens.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        stops = self._stop_tokens(stop_tokens)
        for ids, step_masks in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed, stop_tokens,
                                             tools=tools, top_p=top_p):
            for i, (t, m) in enumerate(zip(ids, step_masks)):
                if t is None or (m == 1 and t in stops):
                    continue
                results[i].append(t)
                masks[i].append(m)
        return results, masks


class StreamDecoder:
    """Incremental detokenizer: `push(token_id) -> str` returns only complete characters.

    Token bytes go through an incremental UTF-8 decoder, so a character split across tokens is held
    back until its last byte arrives; bytes that can never form a character become U+FFFD (as
    `Tokenizer.decode` does). `flush()` returns what is left at the end. Special tokens give "" unless
    `skip_special=False`.
    """

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._special = set(tokenizer.special_tokens.values()) if skip_special else set()

    def push(self, token_id: int) -> str:
        if token_id in self._special:
            return ""
        return self._decoder.decode(self.tokenizer.decode_bytes([token_id]), final=False)

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


@torch.inference_mode()
def generate_naive(model: GPT, tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy generation that re-runs the whole sequence every step: the reference for the cache."""
    device = model.get_device()
    seq = list(tokens)
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq], dtype=torch.long, device=device))[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(tokens):]
