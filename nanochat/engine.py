"""Inference: a KV cache, prefill once, then decode token by token with temperature / top-k sampling.

Several samples of one prompt are decoded in one batch: the prompt is prefilled once (batch 1), its
cache replicated across the samples, and every sample then advances one token per forward pass.
Greedy decoding through the cache reproduces naive full-recompute generation exactly (tested).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from nanochat.gpt import GPT


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


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    """logits (B, V) -> next ids (B, 1). temperature 0 = greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        k = min(top_k, logits.size(-1))
        vals, idx = torch.topk(logits, k, dim=-1)
        probs = torch.softmax(vals, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return idx.gather(-1, choice)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


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

    @torch.inference_mode()
    def generate(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 42, stop_tokens=None) -> Iterator[tuple[list[int], list[bool]]]:
        """Yield, per decode step, (token of each sample, whether that sample is still running)."""
        if not tokens:
            raise ValueError("generate needs a non-empty prompt (start it with the BOS token)")
        model, device = self.model, self.model.get_device()
        stops = self._stop_tokens(stop_tokens)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        max_len = len(tokens) + max_tokens
        prefill = KVCache.for_model(model, 1, max_len)
        idx = torch.tensor([list(tokens)], dtype=torch.long, device=device)
        logits = model(idx, kv_cache=prefill)[:, -1, :]  # (1, V)
        cache = prefill.expand(num_samples)
        logits = logits.expand(num_samples, -1)
        running = [True] * num_samples
        for _ in range(max_tokens):
            nxt = sample_next(logits, temperature, top_k, gen)  # (N, 1)
            ids = nxt[:, 0].tolist()
            for i, t in enumerate(ids):
                if running[i] and t in stops:
                    running[i] = False
            yield ids, list(running)
            if not any(running):
                return
            logits = model(nxt, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens: Sequence[int], num_samples: int = 1, max_tokens: int = 64,
                       temperature: float = 1.0, top_k: int | None = None, seed: int = 42, stop_tokens=None):
        """Complete generations: (list of token lists each starting with the prompt, list of masks).

        A sample stops at its first stop token (which is not included); mask is 0 on prompt tokens.
        """
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for ids, running in self.generate(tokens, num_samples, max_tokens, temperature, top_k, seed, stop_tokens):
            for i, t in enumerate(ids):
                if not done[i]:
                    if not running[i]:
                        done[i] = True
                        continue
                    results[i].append(t)
                    masks[i].append(1)
        return results, masks


@torch.inference_mode()
def generate_naive(model: GPT, tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy generation that re-runs the whole sequence every step: the reference for the cache."""
    device = model.get_device()
    seq = list(tokens)
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq], dtype=torch.long, device=device))[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(tokens):]
