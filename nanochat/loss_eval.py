"""Bits per byte: a tokenizer-independent measure of language-modelling loss.

    bpb = sum(nats over target tokens) / (ln 2 * sum(bytes of those target tokens))

`token_bytes[id]` is the length of the token's raw byte string, 0 for special tokens. Targets that
are special tokens (0 bytes) or the ignore index -1 are left out of BOTH sums, so BOS/EOS
predictions neither add loss nor bytes. The two sums are all-reduced across ranks before the
division (a mean of per-rank bpb values would weight ranks with fewer bytes too much).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from nanochat import cpu_threads
from nanochat.common import RuntimeContext, context_for
from nanochat.dataloader import DataLoader


def per_token_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats for every target position, (B, T) fp32; ignored targets (-1) give 0.

    Uses the model's own per-token loss when it has one (cheaper: it never materialises the
    full fp32 logits), else any `model(idx) -> logits (B, T, V)` (e.g. a Hugging Face wrapper).
    """
    if getattr(model, "supports_loss_reduction", False):  # declared by the model class (nanochat.gpt.GPT)
        loss_BT = model(x, y, loss_reduction="none")
        return loss_BT.float().view(y.shape)
    logits_BTV = model(x)
    B, T, V = logits_BTV.shape
    loss = F.cross_entropy(logits_BTV.float().view(B * T, V), y.reshape(B * T), ignore_index=-1, reduction="none")
    return loss.view(B, T)


@torch.no_grad()
def evaluate_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor,
                 ctx: RuntimeContext | None = None) -> float:
    """Bits per byte of `model` over `steps` batches of (inputs, targets) from `batches`.

    `token_bytes`: LongTensor (vocab,) of raw byte lengths per token id (0 = special token).
    Summed across ranks when torch.distributed is initialised (every rank must call this with
    the same `steps`).
    """
    return evaluate_loss_and_bpb(model, batches, steps, token_bytes, ctx=ctx)["bpb"]


@torch.no_grad()
def evaluate_loss_and_bpb(model, batches: Iterable, steps: int, token_bytes: torch.Tensor,
                          should_stop=None, ctx: RuntimeContext | None = None, progress: str | None = None,
                          progress_every: float = 5.0) -> dict | None:
    """`evaluate_bpb` plus the mean loss in nats per token over every non-ignored target (special
    tokens included), i.e. measured exactly like the training loss, so the two can be compared.

    Returns {"bpb", "loss", "tokens", "bytes"} (tokens/bytes summed over ranks). `should_stop`, a
    callable checked before each batch, abandons the evaluation and returns None when it answers True
    (distributed, it must answer alike on every rank: nanochat.train_loop.stop_check).
    `progress`: a name; rank 0 then prints `name: done/total batches, rate, ETA` every
    `progress_every` seconds (nanochat/progress.py)."""
    from nanochat.progress import Progress

    if steps <= 0:
        raise ValueError(f"evaluate_bpb needs steps >= 1, got {steps}")
    batch_iter = iter(batches)
    # float64 accumulators where the device has them (MPS does not): sums over ~1e8 tokens
    device = token_bytes.device
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    # nats over byte-bearing targets, their bytes, nats over all targets, number of targets
    sums = torch.zeros(4, dtype=acc_dtype, device=device)
    bar = Progress(progress or "", steps, "batches", every=progress_every, enabled=progress is not None and context_for(device, ctx).is_master)
    for step in range(steps):
        if should_stop is not None and should_stop():
            return None
        try:
            x, y = next(batch_iter)
        except StopIteration:
            raise ValueError(f"evaluate_bpb: the batch iterator ran out after {step} of {steps} steps; "
                             "lower the number of steps (or the split-token budget)") from None
        cpu_threads.tick()
        loss_BT = per_token_loss(model, x, y).to(device)
        y = y.to(device)
        valid = y >= 0
        nbytes_BT = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = nbytes_BT > 0  # excludes special tokens and ignored targets
        zero = torch.zeros_like(loss_BT)
        sums += torch.stack([torch.where(counted, loss_BT, zero).sum(), nbytes_BT.sum(),
                             torch.where(valid, loss_BT, zero).sum(), valid.sum()]).to(acc_dtype)
        bar.update()
    nats, nbytes, all_nats, ntokens = context_for(device, ctx).all_reduce_sum(sums).tolist()
    if nbytes == 0:
        raise ValueError("evaluate_bpb: the targets contain no bytes (only special tokens or ignored "
                         "positions); check the data and the token_bytes table")
    return {"bpb": nats / (math.log(2) * nbytes), "loss": all_nats / ntokens, "tokens": int(ntokens),
            "bytes": int(nbytes)}


def evaluate_split_bpb(model, tokenizer, token_bytes, ctx, split: str, split_tokens: int, batch_size: int,
                       seq_len: int, progress: bool = True) -> float:
    """bpb of `model` on the first `split_tokens` tokens of a data split (the pinned validation shard for "val")."""
    tokens_per_step = batch_size * seq_len * ctx.world_size
    steps = max(1, split_tokens // tokens_per_step)
    loader = DataLoader(tokenizer, batch_size, seq_len, split=split, device=ctx.device, rank=ctx.rank,
                        world_size=ctx.world_size)
    try:
        return evaluate_loss_and_bpb(model, loader, steps, token_bytes, ctx=ctx,
                                     progress=f"{split} bpb" if progress else None)["bpb"]
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()


def check_eval_data(split: str = "val", data_dir=None, tokens: int | None = None, chars_per_token: float = 6.0) -> dict:
    """Start-up check of the data an evaluation will read: the split's files open and their first row groups
    (enough for `tokens` tokens, at `chars_per_token`; all of them when None) read and hold text. Raises
    `nanochat.dataset.DataError` naming the file; returns {"files", "row_groups", "docs", "chars"} read."""
    from nanochat.dataset import DataError, ShardReader, list_units

    reader = ShardReader()
    units, _ = list_units(split, data_dir, reader)
    need = None if tokens is None else tokens * chars_per_token
    docs = chars = read = 0
    for unit in units:
        texts = reader.read(unit)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"{unit.path} row group {unit.index}: the text column holds {type(bad).__name__} values, "
                            f"not strings; re-prepare the data (`python -m nanochat.dataset prepare`)")
        docs += sum(1 for t in texts if t.strip())
        chars += sum(len(t) for t in texts)
        read += 1
        if need is not None and chars >= need:
            break
    if docs == 0:
        raise DataError(f"the {split} split ({units[0].path}, ...) holds no text: every document is empty")
    return {"files": len({u.path for u in units[:read]}), "row_groups": read, "docs": docs, "chars": chars}
