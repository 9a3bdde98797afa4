"""Runtime context: device, compute dtype, distributed process group, artifact directory, seeding.

Nothing here runs at import time. A script calls `init_runtime()` once and passes the returned
`RuntimeContext` to whatever needs the device, dtype or rank; no module keeps a global copy.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------
# artifact directory


def get_base_dir() -> Path:
    """Where tokenizers, data shards, checkpoints and reports live.

    `NANOCHAT_BASE_DIR` overrides the default `~/.cache/nanochat`. Created on first use.
    """
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------------------------------------
# rank-aware printing and logging (reads torchrun's environment, so it works before init)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if env_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_logger(name: str = "nanochat") -> logging.Logger:
    """A logger that emits on rank 0 and stays silent elsewhere (warnings still pass on all ranks)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if env_rank() == 0 else logging.WARNING)
    return logger


# ---------------------------------------------------------------------------------------------
# device and dtype policy

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def autodetect_device_type(requested: str | None = None) -> str:
    """cuda > mps > cpu, unless `requested` (or env NANOCHAT_DEVICE) names one."""
    requested = requested or os.environ.get("NANOCHAT_DEVICE") or None
    if requested:
        if requested not in ("cuda", "mps", "cpu"):
            raise ValueError(f"unknown device type {requested!r}: use one of cuda, mps, cpu")
        if requested == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device-type=cuda was asked for but torch.cuda.is_available() is False")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise RuntimeError("--device-type=mps was asked for but MPS is not available")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(device_type: str, requested: str | None = None) -> torch.dtype:
    """Compute dtype policy: bf16 on CUDA GPUs with compute capability >= 8.0, fp32 elsewhere.

    `requested` (a flag) or env NANOCHAT_DTYPE overrides: float32/bfloat16/float16 (or fp32/bf16/fp16).
    fp16 needs a gradient scaler (see `RuntimeContext.needs_grad_scaler`).
    """
    requested = requested or os.environ.get("NANOCHAT_DTYPE") or None
    if requested:
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: use one of {sorted(DTYPES)}")
        return DTYPES[requested]
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


# Peak dense bf16 tensor-core FLOP/s (no sparsity; fp32 accumulation, which halves the GeForce parts'
# figures against their fp16-accumulate ones), by substring of torch.cuda.get_device_name(). Order
# matters: the first matching key wins, so more specific names come first. A GPU not listed has an
# unknown peak (MFU reported as unknown), never a guessed one. fp8 runs are measured against these too.
GPU_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),  # SXM and NVL: H100's tensor cores, more memory
    ("H800", 989e12),
    ("GH200", 989e12),
    ("H20", 148e12),
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("RTX 6000 Ada", 364e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97.5e12),
    ("RTX 3090", 71e12),
    ("A6000", 155e12),
]


def get_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name, or None when unknown (MFU is then reported as unknown)."""
    if not device_name:
        return None
    for key, flops in GPU_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def set_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is a dependency, but seeding must not be the thing that fails
        pass
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# the runtime context


@dataclass
class RuntimeContext:
    device_type: str
    device: torch.device
    dtype: torch.dtype
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device_name: str = "cpu"
    peak_flops: float | None = None
    _owns_process_group: bool = field(default=False, repr=False)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def print0(self, *args, **kwargs) -> None:
        if self.is_master:
            kwargs.setdefault("flush", True)
            print(*args, **kwargs)

    def barrier(self) -> None:
        if self.ddp:
            dist.barrier()

    def all_reduce_sum(self, values: list[float] | torch.Tensor) -> list[float] | torch.Tensor:
        """Sum across ranks (identity in a single process): a list of floats gives a list of floats, a
        tensor gives the summed tensor. NCCL reduces only CUDA tensors and gloo only CPU ones, so the
        reduction runs on the process group's own device and the result comes back where it came from."""
        as_list = not isinstance(values, torch.Tensor)
        t = torch.tensor(values, dtype=torch.float64) if as_list else values
        if self.ddp:
            where = self.device if self.backend == "nccl" else torch.device("cpu")
            moved = t.to(where)
            dist.all_reduce(moved)
            t = moved.to(t.device) if moved is not t else moved
        return t.tolist() if as_list else t

    def all_gather_object(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one in a single process)."""
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def synchronize(self) -> None:
        if self.device_type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device_type == "mps":
            torch.mps.synchronize()

    def max_memory_allocated(self) -> int:
        if self.device_type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0

    def teardown(self) -> None:
        if self.ddp and self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> "RuntimeContext":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def context_for(device, ctx: RuntimeContext | None = None) -> RuntimeContext:
    """`ctx` itself, or (for a library call made without one) a context that describes this process as
    torch.distributed sees it: rank and world size of the initialised process group, else a single process."""
    if ctx is not None:
        return ctx
    device = torch.device(device)
    dtype = resolve_dtype(device.type)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RuntimeContext(device_type=device.type, device=device, dtype=dtype, ddp=True, rank=dist.get_rank(),
                              world_size=dist.get_world_size(), backend=dist.get_backend())
    return RuntimeContext(device_type=device.type, device=device, dtype=dtype)


def is_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))


def init_runtime(device_type: str | None = None, dtype: str | None = None, seed: int | None = 42,
                 timeout_minutes: float = 30.0) -> RuntimeContext:
    """Create the runtime context once per process.

    Under torchrun (RANK/LOCAL_RANK/WORLD_SIZE set, single or multi-node) the default process
    group is initialised with NCCL on CUDA and gloo otherwise; a plain `python` run is rank 0 of 1.
    """
    device_type = autodetect_device_type(device_type)
    compute_dtype = resolve_dtype(device_type, dtype)
    rank, local_rank, world_size = 0, 0, 1
    ddp = is_torchrun() and int(os.environ["WORLD_SIZE"]) > 1
    owns = False
    backend = None
    if ddp:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp:
        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            kwargs = dict(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
            if device_type == "cuda":
                kwargs["device_id"] = device
            dist.init_process_group(**kwargs)
            owns = True
    if device_type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        peak = get_peak_flops(device_name)
        # TF32 for any fp32 matmuls that remain (e.g. the optimizer): a free speed-up on Ampere+
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device_name = "mps" if device_type == "mps" else _cpu_name()
        peak = None
    if seed is not None:
        set_seed(seed)  # same seed on every rank: identical model init without a broadcast
    return RuntimeContext(device_type=device_type, device=device, dtype=compute_dtype, ddp=ddp, rank=rank,
                          local_rank=local_rank, world_size=world_size, backend=backend,
                          device_name=device_name, peak_flops=peak, _owns_process_group=owns)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu: " + (platform.processor() or platform.machine())
