"""The model's configuration: a plain dataclass with no torch dependency, shared by the model
(nanochat/gpt.py), the closed-form sizing (nanochat/sizing.py), checkpoints and the exporters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

VE_GATE_CHANNELS = 32  # value-embedding gate reads the first 32 channels of the block input
VOCAB_PAD_MULTIPLE = 64  # pad the embedding/LM-head rows so the head matmul is tensor-core friendly


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "L"  # cycled over layers; S = sequence_len // 4 window, L = full context
    value_embeds: bool = False
    resid_scalars: bool = False
    rope_base: float = 100000.0
    logit_softcap: float = 15.0
    qk_gain: float = 1.2  # q and k are multiplied by this after QK-norm (sharper attention at init)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE

    def window_sizes(self) -> list[int]:
        """Attention window (number of key positions a query may see, itself included) per layer."""
        pattern = self.window_pattern.upper()
        short = max(1, self.sequence_len // 4)
        sizes = [short if pattern[i % len(pattern)] == "S" else self.sequence_len for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len  # the last layer always sees the whole context
        return sizes

    def has_value_embed(self, layer_idx: int) -> bool:
        # alternate layers, aligned so that the last layer always has one
        return self.value_embeds and layer_idx % 2 == (self.n_layer - 1) % 2

    def to_dict(self) -> dict:
        return asdict(self)
