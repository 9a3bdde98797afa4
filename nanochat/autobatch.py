"""`--device-batch-size auto`: the largest micro-batch that fits on this GPU, found by a short probe.

The probe runs one forward+backward of the model that will train (compiled if training compiles,
so its memory is the one that counts) on random tokens at a candidate batch size, with the
optimizer's future state held in a reserve allocation, and halves the size on CUDA out-of-memory.
Candidates are the sizes that divide the rows each rank must contribute per optimizer step, so
gradient accumulation (total / (size x seq x ranks)) keeps --total-batch-size exact. All ranks take
the smallest size any of them found. On CPU / MPS nothing is probed: the default is returned.

The reference's most-reported failure is its speedrun OOMing at the default batch on some 8xH100
nodes; `oom_message` is what a training OOM says instead of a traceback.
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
import torch.distributed as dist

DEFAULT_DEVICE_BATCH_SIZE = 32  # what "auto" means where nothing is probed (CPU, MPS)
MAX_PROBE_BATCH_SIZE = 64  # the first size tried on a GPU (each size costs a compile)
MEMORY_HEADROOM = 0.92  # a size "fits" when its peak stays under this fraction of the GPU's memory


def oom_message(device_batch_size: int, seq_len: int, fits: int | None = None, where: str = "training",
                remedy: str | None = None) -> str:
    """One line for a CUDA OOM in any phase: where, the flag and size that failed, and what to do (`remedy`:
    how the phase keeps its batch when the micro-batch shrinks; pretraining's by default)."""
    hint = (f"--device-batch-size {fits} fits (found by --device-batch-size auto)" if fits else
            "--device-batch-size auto finds the largest size that fits")
    remedy = remedy or f"lower --device-batch-size ({hint}); gradient accumulation keeps --total-batch-size"
    return f"CUDA out of memory at {where} with --device-batch-size={device_batch_size} (x {seq_len} tokens): {remedy}"


def candidate_batch_sizes(total_batch_size: int, seq_len: int, world_size: int,
                          max_size: int = MAX_PROBE_BATCH_SIZE) -> list[int]:
    """Sizes to try, largest first: divisors of the rows per rank per step, from max_size halving down."""
    if total_batch_size % (seq_len * world_size):
        raise ValueError(f"--total-batch-size {total_batch_size} is not a multiple of seq len {seq_len} x "
                         f"{world_size} ranks")
    rows = total_batch_size // (seq_len * world_size)
    out, b = [], 1
    while b * 2 <= min(max_size, rows):
        b *= 2
    while b >= 1:
        if rows % b == 0:
            out.append(b)
        b //= 2
    return out


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe(try_size: Callable[[int], None], candidates: list[int], fits: Callable[[], bool] = lambda: True,
          log: Callable[[str], None] = print) -> int:
    """The first candidate whose `try_size(b)` neither raises torch.OutOfMemoryError nor fails `fits()`.
    Raises torch.OutOfMemoryError (with `oom_message`-style text) when none does."""
    for b in candidates:
        try:
            try_size(b)
            ok = fits()
        except torch.OutOfMemoryError:
            ok = False
        _free_memory()
        log(f"device batch size probe: {b} {'fits' if ok else 'does not fit'}")
        if ok:
            return b
    raise torch.OutOfMemoryError(f"even --device-batch-size {candidates[-1]} does not fit in GPU memory: use a "
                                 f"smaller model (--depth) or a shorter --max-seq-len")


def probe_batch(batch_size: int, seq_len: int, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (inputs, targets) laid out as the training loaders lay out theirs: two views into one
    contiguous (2, B, T) buffer (nanochat.dataloader's producer, train_loop.SyntheticLoader). A compiled
    model guards on its inputs' strides, offsets and aliasing: a probe called as `model(x, x)` with a
    plain (B, T) tensor would be compiled once more when training's first batch arrives."""
    xy = torch.randint(0, vocab_size, (2, batch_size, seq_len), device=device)
    return xy[0], xy[1]


def optimizer_state_bytes(model) -> int:
    """fp32 bytes the optimizer will hold once it has stepped: Muon momentum (+ NorMuon's small second
    moment) and a transient fp32 stack of the matrix gradients; AdamW's two moments."""
    groups = model.param_groups()
    matrix = sum(p.numel() for p in groups["matrix"])
    other = sum(p.numel() for k in ("embedding", "lm_head", "scalar") for p in groups[k])
    return 4 * (2 * matrix + 2 * other)


def find_device_batch_size(model, train_model, seq_len: int, vocab_size: int, total_batch_size: int,
                           world_size: int = 1, max_size: int = MAX_PROBE_BATCH_SIZE,
                           log: Callable[[str], None] = print) -> int:
    """The device batch size `auto` resolves to (see the module docstring). `model` is the module (its
    parameters and device), `train_model` what training calls (the compiled wrapper or the module)."""
    device = model.get_device()
    candidates = candidate_batch_sizes(total_batch_size, seq_len, world_size, max_size)
    if device.type != "cuda":
        rows = total_batch_size // (seq_len * world_size)
        choice = next((b for b in candidates if b <= DEFAULT_DEVICE_BATCH_SIZE), 1)
        log(f"--device-batch-size auto: {choice} (no probe on {device.type}; {rows} rows per rank per step)")
        return choice
    total_memory = torch.cuda.get_device_properties(device).total_memory
    reserve = torch.empty(optimizer_state_bytes(model), dtype=torch.uint8, device=device)

    def try_size(b: int) -> None:
        torch.cuda.reset_peak_memory_stats(device)
        x, y = probe_batch(b, seq_len, vocab_size, device)
        loss = train_model(x, y)
        loss.backward()
        torch.cuda.synchronize(device)
        model.zero_grad(set_to_none=True)

    def fits() -> bool:
        return torch.cuda.max_memory_allocated(device) <= MEMORY_HEADROOM * total_memory

    try:
        choice = probe(try_size, candidates, fits, log)
    finally:
        model.zero_grad(set_to_none=True)
        del reserve
        _free_memory()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([choice], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)  # every rank must run the same accumulation
        choice = int(t.item())
    log(f"--device-batch-size auto: {choice}")
    return choice
