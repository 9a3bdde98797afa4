"""Bits per byte: a tokenizer-independent measure of language-modelling loss.

    bpb = sum(nats over target tokens) / (ln 2 * sum(bytes of those target tokens))

`token_bytes[id]` is the length of the token's raw byte string, 0 for special tokens. Targets that
are special tokens (0 bytes) or the ignore index -1 are left out of BOTH sums, so BOS/EOS
predictions neither add loss nor bytes. The two sums are all-reduced across ranks before the
division (a mean of per-rank bpb values would weight ranks with fewer bytes too much).
"""

from __future__ import annotations

import inspect
import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _accepts_loss_reduction(model) -> bool:
    """True when `model(x, y, loss_reduction="none")` returns per-token losses (our GPT does)."""
    forward = getattr(model, "forward", model)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "loss_reduction" in params


def per_token_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats for every target position, (B, T) fp32; ignored targets (-1) give 0.

    Uses the model's own per-token loss when it has one (cheaper: it never materialises the
    full fp32 logits), else any `model(idx) -> logits (B, T, V)` (e.g. a Hugging Face wrapper).
    """
    if _accepts_loss_reduction(model):
        loss_BT = model(x, y, loss_reduction="none")
        return loss_BT.float().view(y.shape)
    logits_BTV = model(x)
    B, T, V = logits_BTV.shape
    loss = F.cross_entropy(logits_BTV.float().view(B * T, V), y.reshape(B * T), ignore_index=-1, reduction="none")
    return loss.view(B, T)


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `steps` batches of (inputs, targets) from `batches`.

    `token_bytes`: LongTensor (vocab,) of raw byte lengths per token id (0 = special token).
    Summed across ranks when torch.distributed is initialised (every rank must call this with
    the same `steps`).
    """
    if steps <= 0:
        raise ValueError(f"evaluate_bpb needs steps >= 1, got {steps}")
    batch_iter = iter(batches)
    # float64 accumulators where the device has them (MPS does not): sums over ~1e8 tokens
    device = token_bytes.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=acc_dtype, device=device)
    for step in range(steps):
        try:
            x, y = next(batch_iter)
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batch iterator ran out after {step} of {steps} steps; "
                             "lower the number of steps (or the split-token budget)") from None
        loss_BT = per_token_loss(model, x, y).to(device)
        y = y.to(device)
        valid = y >= 0
        nbytes_BT = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes_BT > 0  # excludes special tokens and ignored targets
        total_nats += torch.where(counted, loss_BT, torch.zeros_like(loss_BT)).sum().to(acc_dtype)
        total_bytes += nbytes_BT.sum().to(acc_dtype)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = torch.stack([total_nats, total_bytes])
        if dist.get_backend() == "nccl" and sums.device.type != "cuda":
            sums = sums.cuda()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total_nats, total_bytes = sums[0], sums[1]
    nbytes = total_bytes.item()
    if nbytes == 0:
        raise ValueError("evaluate_bpb: the targets contain no bytes (only special tokens or ignored "
                         "positions); check the data and the token_bytes table")
    return total_nats.item() / (math.log(2) * nbytes)


def evaluate_split_bpb(model, tokenizer, token_bytes, ctx, split: str, split_tokens: int, batch_size: int,
                       seq_len: int) -> float:
    """bpb of `model` on the first `split_tokens` tokens of a data split (the pinned validation shard for "val")."""
    from nanochat.dataloader import DataLoader

    tokens_per_step = batch_size * seq_len * ctx.world_size
    steps = max(1, split_tokens // tokens_per_step)
    loader = DataLoader(tokenizer, batch_size, seq_len, split=split, device=ctx.device, rank=ctx.rank,
                        world_size=ctx.world_size)
    try:
        return evaluate_bpb(model, loader, steps, token_bytes)
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
