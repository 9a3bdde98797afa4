"""Hugging Face causal LMs behind our model and tokenizer interfaces, so that the evaluators (CORE, bits
per byte, samples) score a transformers model exactly as they score ours (`scripts/base_eval.py --hf-path`).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from nanochat.tokenizer import gpt2_byte_to_unicode


class HFModel(nn.Module):
    """`model(idx) -> fp32 logits (B, T, V)` over a transformers causal LM: the plain forward only, so the
    evaluators take their generic paths (full logits, no KV-cache prefix sharing)."""

    supports_loss_reduction = False
    supports_positions = False
    supports_kv_cache = False

    def __init__(self, hf_model, max_seq_len: int | None):
        super().__init__()
        self.hf_model = hf_model
        self.max_seq_len = max_seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.hf_model(input_ids=idx).logits.float()

    def get_device(self) -> torch.device:
        return next(self.hf_model.parameters()).device


class HFTokenizer:
    """encode/decode/get_bos_token_id/token_bytes over a transformers tokenizer."""

    def __init__(self, hf_tokenizer):
        self.tok = hf_tokenizer
        bos = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else hf_tokenizer.eos_token_id
        if bos is None:
            raise ValueError("the Hugging Face tokenizer has neither a BOS nor an EOS token to start sequences with")
        self.bos = bos

    def get_bos_token_id(self) -> int:
        return self.bos

    def get_vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        head = [] if prepend is None else [self.bos if prepend == "<|bos|>" else int(prepend)]
        tail = [] if append is None else [int(append)]
        if isinstance(text, str):
            return head + self.tok.encode(text, add_special_tokens=False) + tail
        ids = self.tok(list(text), add_special_tokens=False)["input_ids"] if text else []
        return [head + row + tail for row in ids]

    __call__ = encode

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def token_bytes(self, device="cpu") -> torch.Tensor:
        """Raw byte length of every token (0 for special tokens), from the byte-level vocabulary itself:
        decoding single tokens to str would turn partial UTF-8 into U+FFFD and miscount (REFERENCE s5)."""
        vocab = self.tok.get_vocab()  # token string -> id
        lengths = torch.zeros(max(len(self.tok), max(vocab.values()) + 1), dtype=torch.int64)
        specials = set(self.tok.all_special_ids)
        byte_decoder = {c: b for b, c in gpt2_byte_to_unicode().items()}
        byte_level = all(all(ch in byte_decoder for ch in tok) for tok, i in vocab.items() if i not in specials)
        sp_byte = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
        for tok, i in vocab.items():
            if i in specials or tok in getattr(self.tok, "added_tokens_encoder", {}):
                continue
            if byte_level:
                lengths[i] = len(tok)  # one character per byte
            elif sp_byte.match(tok):
                lengths[i] = 1  # sentencepiece byte fallback
            else:
                lengths[i] = len(tok.replace("\u2581", " ").encode("utf-8"))
        return lengths.to(device)
