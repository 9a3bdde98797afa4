"""Inference: a KV cache, prefill once, then decode token by token with temperature / top-k / top-p.

Several samples of one prompt are decoded in one batch: the prompt is prefilled once (batch 1), its
cache replicated across the samples, and every sample then advances one token per forward pass.
Different prompts share a batch through a SlotKVCache (every row at its own position): all at once
(`Engine.generate_many`, evaluations) or coming and going while it decodes (`BatchDecoder`, the chat
server).
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

from nanochat import cpu_threads
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


class SlotKVCache(KVCache):
    """A KV cache whose rows ("slots") hold different sequences, each at its own length.

    Same layout as KVCache; `pos` is a (B,) tensor of per-row positions, which the model reads as
    per-row rotary positions and per-row attention masks. Only active slots advance; a free slot sits
    at length 0 (whatever a forward writes there is overwritten when a prompt is loaded into it).
    """

    def __init__(self, n_layer: int, slots: int, max_len: int, n_kv_head: int, head_dim: int, device, dtype):
        shape = (n_layer, slots, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * slots
        self.active = [False] * slots
        self._pos: torch.Tensor | None = None

    def expand(self, batch_size: int) -> "KVCache":
        raise TypeError("a SlotKVCache is not expanded: load each prompt into a slot instead")

    @property
    def slots(self) -> int:
        return self.k.size(1)

    @property
    def pos(self) -> torch.Tensor:
        if self._pos is None:
            self._pos = torch.tensor(self.lengths, dtype=torch.long, device=self.k.device)
        return self._pos

    def end(self, T: int) -> int:
        """Key positions a forward of T new tokens attends over (the longest row's)."""
        return max(self.lengths) + T

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.shape[:2]
        end = self.end(T)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        rows = torch.arange(B, device=k.device)[:, None]
        cols = self.pos[:, None] + torch.arange(T, device=k.device)[None, :]  # (B, T)
        self.k[layer, rows, cols] = k
        self.v[layer, rows, cols] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.lengths = [length + n if a else length for length, a in zip(self.lengths, self.active)]
        self._pos = None

    def load(self, slot: int, cache: KVCache) -> None:
        """Put a prefilled batch-1 cache into `slot` and mark it active."""
        n = cache.pos
        if n > self.max_len:
            raise ValueError(f"a {n}-token prompt does not fit a {self.max_len}-position cache")
        self.k[:, slot, :n] = cache.k[:, 0, :n]
        self.v[:, slot, :n] = cache.v[:, 0, :n]
        self.lengths[slot], self.active[slot] = n, True
        self._pos = None

    def release(self, slot: int) -> None:
        self.lengths[slot], self.active[slot] = 0, False
        self._pos = None

    def move(self, src: int, dst: int) -> None:
        """Slot `src`'s sequence into slot `dst` (whatever `dst` held is dropped); `src` becomes free."""
        n = self.lengths[src]
        self.k[:, dst, :n] = self.k[:, src, :n]
        self.v[:, dst, :n] = self.v[:, src, :n]
        self.lengths[dst], self.active[dst] = n, self.active[src]
        self.release(src)

    def head(self, n: int) -> "SlotKVCache":
        """A cache over slots [0, n) sharing this one's storage: a forward through it writes here; then
        `take_lengths(view)` brings its advanced lengths back."""
        view = SlotKVCache.__new__(SlotKVCache)
        view.k, view.v = self.k[:, :n], self.v[:, :n]
        view.lengths, view.active, view._pos = self.lengths[:n], self.active[:n], None
        return view

    def take_lengths(self, view: "SlotKVCache") -> None:
        self.lengths[:len(view.lengths)] = view.lengths
        self._pos = None

    def keep(self, slots: list[int]) -> None:
        """Drop every slot not in `slots` (in that order): later forwards are that much smaller."""
        idx = torch.tensor(slots, dtype=torch.long, device=self.k.device)
        self.k, self.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        self.lengths = [self.lengths[s] for s in slots]
        self.active = [self.active[s] for s in slots]
        self._pos = None


def rows_for_memory(model: GPT, max_len: int, rows: int, budget_bytes: int | None = None) -> int:
    """At most `rows` rows of a SlotKVCache of `max_len` positions within `budget_bytes` (default: 2 GiB on
    a CPU, a quarter of the free memory on a GPU); at least 1."""
    c = model.config
    per_row = 2 * c.n_layer * max_len * c.n_kv_head * c.head_dim * torch.finfo(model.compute_dtype).bits // 8
    if budget_bytes is None:
        device = model.get_device()
        budget_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else 2 << 30
    return max(1, min(rows, budget_bytes // max(per_row, 1)))


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


class _Seq:
    """One sequence of a BatchDecoder: its key, budget and sampling settings, and decode state."""

    __slots__ = ("key", "budget", "temperature", "top_k", "top_p", "gen", "sample", "n", "feed")

    def __init__(self, key, budget, temperature, top_k, top_p, gen):
        self.key, self.budget, self.temperature, self.top_k, self.top_p, self.gen = \
            key, budget, temperature, top_k, top_p, gen
        self.sample, self.n, self.feed = _Sample(), 0, 0


class BatchDecoder:
    """Continuous batching for a caller that adds and drops sequences while it decodes (the chat server).

    Up to `rows` sequences share one SlotKVCache. `add()` prefills a prompt alone (batch 1) into a free
    row; every `step()` then advances all of them by one token in one forward and returns, per
    sequence, (key, token, mask, finished), with the same stops, budget and calculator forcing as
    `Engine.generate` (a stop token is returned, mask 1, with finished True). Each sequence has its own
    temperature / top-k / top-p and its own generator, so what one samples does not depend on what it
    was batched with. Busy rows are kept packed at the front (a finished row is refilled from the last
    one), so a forward covers only the rows in use."""

    def __init__(self, engine: "Engine", rows: int, max_len: int | None = None, stop_tokens=None,
                 tools: bool = True):
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.engine, self.model = engine, engine.model
        self.max_len = max_len or self.model.config.sequence_len
        self.cache = SlotKVCache.for_model(self.model, rows, self.max_len)
        self.device = self.model.get_device()
        self.logits = torch.zeros(rows, self.model.config.vocab_size, device=self.device)
        self.seqs: list[_Seq] = []  # row i holds seqs[i]
        self.stops = engine._stop_tokens(stop_tokens)
        self.tool_ids = engine._tool_ids() if tools else None
        self._keys = 0

    @property
    def rows(self) -> int:
        return self.cache.slots

    @property
    def free(self) -> int:
        return self.rows - len(self.seqs)

    @torch.no_grad()
    def add(self, prompt: Sequence[int], max_tokens: int, temperature: float = 1.0, top_k: int | None = None,
            top_p: float | None = None, seed: int = 42) -> int | None:
        """Prefill `prompt` into a free row; its key, or None when prompt + reply cannot fit (no reply)."""
        if not prompt:
            raise ValueError("a BatchDecoder needs non-empty prompts (start each with the BOS token)")
        if not self.free:
            raise RuntimeError(f"all {self.rows} rows are busy: wait for a step that finishes one")
        budget = min(max_tokens, self.max_len - len(prompt))
        if budget <= 0:
            return None
        row = len(self.seqs)
        one = KVCache.for_model(self.model, 1, len(prompt))
        idx = torch.tensor([list(prompt)], dtype=torch.long, device=self.device)
        self.logits[row] = self.model(idx, kv_cache=one)[0, -1]
        self.cache.load(row, one)
        gen = None
        if temperature != 0.0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        key, self._keys = self._keys, self._keys + 1
        self.seqs.append(_Seq(key, budget, temperature, top_k, top_p, gen))
        return key

    def drop(self, key: int) -> None:
        """Stop decoding sequence `key` (a client that went away); unknown keys are ignored."""
        for row, seq in enumerate(self.seqs):
            if seq.key == key:
                self._remove(row)
                return

    def _remove(self, row: int) -> None:
        last = len(self.seqs) - 1
        if row != last:  # keep the busy rows packed: the last one takes the freed row
            self.cache.move(last, row)
            self.logits[row] = self.logits[last]
            self.seqs[row] = self.seqs[last]
        else:
            self.cache.release(row)
        self.seqs.pop()

    @torch.no_grad()
    def step(self) -> list[tuple[int, int, int, bool]]:
        """Advance every sequence by one token: [(key, token, mask, finished)], finished ones removed."""
        n = len(self.seqs)
        if n == 0:
            return []
        cpu_threads.tick()
        greedy = [r for r, s in enumerate(self.seqs) if s.temperature == 0.0]
        picked = dict(zip(greedy, self.logits[greedy].argmax(dim=-1).tolist())) if greedy else {}
        for r, s in enumerate(self.seqs):
            if r not in picked:
                picked[r] = int(sample_next(self.logits[r:r + 1], s.temperature, s.top_k, s.gen, s.top_p)[0, 0])
        events, finished = [], []
        for r, s in enumerate(self.seqs):
            state = s.sample
            if state.forced:
                t, m = state.forced.popleft(), 0
            else:
                t, m = picked[r], 1
                if t in self.stops:
                    state.done = True
                elif self.tool_ids is not None:
                    self.engine._advance(state, t, self.tool_ids)
            s.n += 1
            s.feed = t
            done = state.done or s.n >= s.budget
            events.append((s.key, t, m, done))
            if done:
                finished.append(r)
        for r in reversed(finished):  # descending: a moved row always comes from a row already looked at
            self._remove(r)
        n = len(self.seqs)
        if n:
            view = self.cache.head(n)
            feed = torch.tensor([[s.feed] for s in self.seqs], dtype=torch.long, device=self.device)
            self.logits[:n] = self.model(feed, kv_cache=view)[:, -1]
            self.cache.take_lengths(view)
        return events


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
            cpu_threads.tick()
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

    def decoder(self, rows: int, max_len: int | None = None, **kw) -> BatchDecoder:
        """A BatchDecoder over this engine's model (rows capped by rows_for_memory)."""
        max_len = max_len or self.model.config.sequence_len
        return BatchDecoder(self, rows_for_memory(self.model, max_len, rows), max_len, **kw)

    @torch.inference_mode()
    def generate_many(self, prompts: Sequence[Sequence[int]], max_tokens: int | Sequence[int] = 64,
                      temperature: float = 1.0, top_k: int | None = None, seeds: Sequence[int] | int = 42,
                      stop_tokens=None, tools: bool = True, batch_size: int = 16, top_p: float | None = None,
                      should_stop: Callable[[], bool] | None = None
                      ) -> Iterator[tuple[int, list[int], list[int]]]:
        """Decode many prompts together, up to `batch_size` rows per forward (continuous batching).

        Each prompt is prefilled alone (batch 1) into a free row of a SlotKVCache; every forward then
        advances all busy rows by one token, each at its own position. A row that finishes (stop token,
        its `max_tokens`, the context) is yielded at once as (prompt index, reply tokens without the
        stop token, masks) and its row is refilled from the queue, so rows never wait for the slowest
        one. When the queue is empty and half the rows are idle, the cache is compacted.

        Greedy decoding gives the replies `generate` gives one prompt at a time (up to float rounding
        of the masked attention; tested). With temperature > 0 every prompt samples from its own
        generator (`seeds[i]`, or `seeds + i`), so a reply does not depend on what it was batched with.
        """
        n = len(prompts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate_many needs non-empty prompts (start each with the BOS token)")
        model, device = self.model, self.model.get_device()
        limit = model.config.sequence_len
        caps = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
        seed_of = [seeds + i for i in range(n)] if isinstance(seeds, int) else list(seeds)
        if len(caps) != n or len(seed_of) != n:
            raise ValueError("max_tokens and seeds must be one value or one per prompt")
        budgets = [min(c, limit - len(p)) for c, p in zip(caps, prompts)]
        stops = self._stop_tokens(stop_tokens)
        tool_ids = self._tool_ids() if tools else None
        queue = deque(i for i in range(n) if budgets[i] > 0)
        for i in range(n):
            if budgets[i] <= 0:  # a prompt that fills the context gets an empty reply
                yield i, [], []
        if not queue:
            return
        rows = min(batch_size, len(queue))
        max_len = max(len(prompts[i]) + budgets[i] for i in queue)
        cache = SlotKVCache.for_model(model, rows, max_len)
        V = model.config.vocab_size
        logits = torch.zeros(rows, V, device=device)
        job: list[int | None] = [None] * rows  # prompt index in each row
        state: list[_Sample | None] = [None] * rows
        out: list[tuple[list[int], list[int]]] = [([], [])] * rows
        gens: list[torch.Generator | None] = [None] * rows

        def fill(slot: int) -> None:
            i = queue.popleft()
            tokens = prompts[i]
            one = KVCache.for_model(model, 1, len(tokens))
            logits[slot] = model(torch.tensor([list(tokens)], dtype=torch.long, device=device), kv_cache=one)[0, -1]
            cache.load(slot, one)
            job[slot], state[slot], out[slot] = i, _Sample(), ([], [])
            if temperature != 0.0:
                gens[slot] = torch.Generator(device=device)
                gens[slot].manual_seed(seed_of[i])

        for slot in range(rows):
            fill(slot)
        while True:
            if should_stop is not None and should_stop():
                return
            cpu_threads.tick()
            if temperature == 0.0:
                sampled = logits.argmax(dim=-1).tolist()
            else:
                sampled = [0] * cache.slots
                for r in range(cache.slots):
                    if job[r] is not None:
                        sampled[r] = int(sample_next(logits[r:r + 1], temperature, top_k, gens[r], top_p)[0, 0])
            feed = [0] * cache.slots
            for r in range(cache.slots):
                i, s = job[r], state[r]
                if i is None:
                    continue
                toks, masks = out[r]
                if s.forced:
                    t, m = s.forced.popleft(), 0
                else:
                    t, m = sampled[r], 1
                    if t in stops:
                        s.done = True
                    elif tool_ids is not None:
                        self._advance(s, t, tool_ids)
                if not s.done:
                    toks.append(t)
                    masks.append(m)
                    feed[r] = t
                if s.done or len(toks) >= budgets[i]:
                    yield i, toks, masks
                    job[r], state[r] = None, None
                    cache.release(r)
            if not any(cache.active) and not queue:
                return
            busy = [r for r in range(cache.slots) if job[r] is not None]
            if not queue and cache.slots > 1 and len(busy) <= cache.slots // 2:
                cache.keep(busy)
                logits = logits[busy]
                feed = [feed[r] for r in busy]
                job, state = [job[r] for r in busy], [state[r] for r in busy]
                out, gens = [out[r] for r in busy], [gens[r] for r in busy]
            if any(cache.active):
                nxt = torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(1)  # (B, 1)
                logits = model(nxt, kv_cache=cache)[:, -1, :].clone()
            for r in range(cache.slots):
                if job[r] is None and queue:
                    fill(r)


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
