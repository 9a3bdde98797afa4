"""Runtime context: device, compute dtype, distributed process group, artifact directory, seeding.

Nothing here runs at import time. A script calls `init_runtime()` once and passes the returned
`RuntimeContext` to whatever needs the device, dtype or rank; no module keeps a global copy.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat import cpu_threads

# the artifact directory and rank-aware printing live in the torch-free nanochat.env (readers of text
# and the tokenizer scripts use them without importing torch); re-exported here
from nanochat.env import (NotWritable, atomic_write_text, env_rank, get_base_dir, get_logger, print0,  # noqa: E402,F401 (re-exported)
                          require_writable)

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


def resolve_dtype(device_type: str, requested: str | None = None,
                  probe_shapes: tuple[tuple[int, int, int], ...] | None = None) -> torch.dtype:
    """Compute dtype policy (`auto`, the default): bf16 on CUDA GPUs with compute capability >= 8.0; on
    CPU bf16 where a measured GEMM probe finds it clearly faster than fp32 (AMX / AVX512-BF16), else
    fp32; fp32 on MPS.

    `requested` (a flag) or env NANOCHAT_DTYPE overrides: float32/bfloat16/float16 (or fp32/bf16/fp16),
    or auto. fp16 needs a gradient scaler (see `RuntimeContext.needs_grad_scaler`).
    """
    return _resolve_dtype(device_type, requested, probe_shapes)[0]


def _resolve_dtype(device_type: str, requested: str | None, probe_shapes) -> tuple[torch.dtype, "DtypeProbe | None"]:
    requested = requested or os.environ.get("NANOCHAT_DTYPE") or "auto"
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: use auto or one of {sorted(DTYPES)}")
        return DTYPES[requested], None
    if device_type == "cuda":
        return (torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float32), None
    if device_type == "cpu":
        probe = probe_cpu_dtype(probe_shapes)
        return probe.dtype, probe
    return torch.float32, None


# ---------------------------------------------------------------------------------------------
# CPU dtype probe: time fp32 and bf16 GEMMs at the model's shapes, keep bf16 only where it clearly wins

BF16_MIN_SPEEDUP = 1.3  # bf16 must beat fp32 by this factor on the probe: its elementwise passes and casts cost extra
DTYPE_PROBE_FILE = "dtype_probe.json"  # in the base dir: {key: result}, key = CPU model, torch, threads, shapes


@dataclass(frozen=True)
class DtypeProbe:
    """What the CPU dtype probe measured: the chosen dtype and each dtype's GFLOP/s over the shapes."""

    dtype: torch.dtype
    gflops: dict  # {"float32": GFLOP/s, "bfloat16": GFLOP/s}
    shapes: tuple
    key: str
    cached: bool = False
    seconds: float = 0.0  # time spent measuring (0 when read from the cache)

    @property
    def speedup(self) -> float:
        return self.gflops["bfloat16"] / max(self.gflops["float32"], 1e-9)

    def summary(self) -> str:
        how = "cached" if self.cached else f"measured in {self.seconds:.2f} s"
        return (f"{str(self.dtype).replace('torch.', '')} (GEMM probe: fp32 {self.gflops['float32']:.3g} GFLOP/s, "
                f"bf16 {self.gflops['bfloat16']:.3g} GFLOP/s, {self.speedup:.2f}x; {how})")


def matmul_probe_shapes(n_embd: int = 256, tokens: int = 2048, vocab_size: int = 32768) -> tuple:
    """(M, K, N) products that stand for a training step: the block matrices (C x C, C x 4C, 4C x C) over
    the step's rows and the LM head (vocab-major, as nanochat.lm_loss lays it out), each capped so the
    probe stays well under a second even where bf16 is emulated."""
    rows, C, V = min(tokens, 512), n_embd, min(vocab_size, 8192)
    return ((rows, C, C), (rows, C, 4 * C), (rows, 4 * C, C), (V, C, rows))


ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _probe_key(shapes) -> str:
    # the kernels' instruction set too: the same CPU limited to AVX2 (these variables) emulates bf16
    isa = torch.backends.cpu.get_cpu_capability()
    limits = ",".join(f"{k}={os.environ[k]}" for k in ISA_ENV if os.environ.get(k))
    return (f"{_cpu_name()}|torch {torch.__version__}|isa {isa}{'|' + limits if limits else ''}|"
            f"threads {torch.get_num_threads()}|shapes {list(map(list, shapes))}")


def _time_gemms(pairs, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        for a, b in pairs:
            torch.mm(a, b)
    return (time.perf_counter() - t0) / reps


def measure_gemm_gflops(shapes, budget_s: float = 0.3) -> dict:
    """GFLOP/s of fp32 and bf16 `torch.mm` over `shapes`, on this process's threads.

    The two dtypes are timed in alternating rounds (a competing process then slows both alike) and each
    keeps its best round. A dtype whose first round is 4x slower than the other's (bf16 emulated on an
    AVX2 CPU) is not timed again."""
    flops = sum(2.0 * m * k * n for m, k, n in shapes)
    gen = torch.Generator().manual_seed(0)
    ops = {}
    for dt in (torch.float32, torch.bfloat16):
        pairs = [(torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt)) for m, k, n in shapes]
        for a, b in pairs:  # warm-up: oneDNN builds its bf16 kernels on first use
            torch.mm(a, b)
        ops[dt] = pairs
    best = {dt: _time_gemms(ops[dt], 1) for dt in ops}
    deadline = time.perf_counter() + budget_s
    slow = {dt for dt in best if best[dt] > 4 * min(best.values())}
    while time.perf_counter() < deadline:
        for dt, pairs in ops.items():
            if dt not in slow:
                best[dt] = min(best[dt], _time_gemms(pairs, 1))
    return {str(dt).replace("torch.", ""): flops / best[dt] / 1e9 for dt in ops}


def probe_cpu_dtype(shapes=None, *, refresh: bool = False, budget_s: float = 0.3) -> DtypeProbe:
    """fp32 or bf16 for CPU compute, by a GEMM probe at `shapes` (default `matmul_probe_shapes()`).

    The result is cached in `<base dir>/dtype_probe.json` under the CPU model, torch version, thread
    count and shapes, so a machine measures once (`refresh=True`, or deleting the file, measures again)."""
    shapes = tuple(tuple(int(v) for v in s) for s in (shapes or matmul_probe_shapes()))
    key = _probe_key(shapes)
    path = get_base_dir() / DTYPE_PROBE_FILE
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key)
    if hit and not refresh:
        try:
            return DtypeProbe(dtype=DTYPES[hit["dtype"]], gflops=dict(hit["gflops"]), shapes=shapes, key=key, cached=True)
        except (KeyError, TypeError):
            pass  # a malformed entry: measure again
    t0 = time.perf_counter()
    gflops = measure_gemm_gflops(shapes, budget_s)
    seconds = time.perf_counter() - t0
    dtype = torch.bfloat16 if gflops["bfloat16"] >= BF16_MIN_SPEEDUP * gflops["float32"] else torch.float32
    cache[key] = {"dtype": str(dtype).replace("torch.", ""), "gflops": gflops,
                  "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:  # atomic: concurrent runs on one machine may both write
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    except OSError:
        pass  # a read-only base dir only costs a re-measure next time
    return DtypeProbe(dtype=dtype, gflops=gflops, shapes=shapes, key=key, cached=False, seconds=seconds)


def get_peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name, or None when unknown (MFU is then reported as unknown).
    The table, with its sources, is nanochat/gpus.py (shared with the planner and the run doctor)."""
    from nanochat.gpus import peak_flops

    return peak_flops(device_name)


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
    dtype_probe: DtypeProbe | None = None  # set when `auto` measured the CPU (nanochat.common.probe_cpu_dtype)
    threads: str = ""  # the intra-op thread policy, for the sizing table (nanochat/cpu_threads.py)
    _owns_process_group: bool = field(default=False, repr=False)

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    @property
    def orth_dtype(self) -> torch.dtype:
        """Muon's orthogonalisation dtype: the recipe's bf16 on accelerators; on CPU the compute dtype
        (bf16 where the probe chose it or it was asked for; fp32 otherwise: emulated bf16 matmuls there
        run ~10x slower than fp32)."""
        if self.device_type == "cpu":
            return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32
        return torch.bfloat16

    def probe_at(self, shapes) -> None:
        """When `auto` chose the CPU dtype by the probe, choose again at the model's own GEMM shapes
        (`matmul_probe_shapes(n_embd, tokens, vocab)`); call it before building the model."""
        shapes = tuple(tuple(int(v) for v in s) for s in shapes)
        if self.dtype_probe is not None and shapes != self.dtype_probe.shapes:
            self.dtype_probe = _agree(probe_cpu_dtype(shapes), self.ddp)
            self.dtype = self.dtype_probe.dtype

    def dtype_summary(self) -> str:
        """One line for the sizing table: the compute dtype and, when measured, the probe's GFLOP/s."""
        if self.dtype_probe is not None:
            return "auto: " + self.dtype_probe.summary()
        return str(self.dtype).replace("torch.", "")

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
                 timeout_minutes: float = 30.0, probe_shapes=None, threads: str | int | None = None) -> RuntimeContext:
    """Create the runtime context once per process.

    `dtype` None or "auto" follows `resolve_dtype`; on CPU the probe runs at `probe_shapes`
    (`matmul_probe_shapes(...)` of the model; default: those of the depth-4 CPU model).

    Under torchrun (RANK/LOCAL_RANK/WORLD_SIZE set, single or multi-node) the default process
    group is initialised with NCCL on CUDA and gloo otherwise; a plain `python` run is rank 0 of 1.

    `threads`: "auto" (default, or NANOCHAT_THREADS) follows the machine's load on CPU; a number fixes it
    (nanochat/cpu_threads.py).
    """
    device_type = autodetect_device_type(device_type)
    if device_type == "cpu":
        tune_cpu_allocator()
    threads_summary = cpu_threads.configure(threads, device_type, say=print if env_rank() == 0 else None)
    compute_dtype, probe = _resolve_dtype(device_type, dtype, probe_shapes)
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
    if probe is not None and ddp:
        probe = _agree(probe, ddp)
        compute_dtype = probe.dtype
    if seed is not None:
        set_seed(seed)  # same seed on every rank: identical model init without a broadcast
    return RuntimeContext(device_type=device_type, device=device, dtype=compute_dtype, ddp=ddp, rank=rank,
                          local_rank=local_rank, world_size=world_size, backend=backend,
                          device_name=device_name, peak_flops=peak, dtype_probe=probe, threads=threads_summary,
                          _owns_process_group=owns)


def _agree(probe: DtypeProbe, ddp: bool) -> DtypeProbe:
    """Every rank takes rank 0's probe result: ranks measuring near the threshold must not disagree."""
    if ddp and dist.is_initialized():
        box = [probe]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return probe


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory in the process (glibc's heap) instead of handing it back to the kernel.

    PyTorch's CPU allocator is plain malloc. glibc serves large blocks with fresh mappings and trims the
    heap as soon as it is freed, so every step's activations and temporaries fault their pages in again.
    Fixing the mmap threshold at its 32 MB ceiling and trimming only past 1 GB made the CPU demo's
    forward+backward (depth 4, 4K vocab) 189 vs 203 ms in bf16 and 334 vs 345 ms in fp32
    (benchmarks/bench_cpu_memory.py; blocks above 32 MB, the LM loss's, are reused by lm_loss.py).
    Linux/glibc only, once per process, and not when the user set any MALLOC_* variable (theirs win).
    Returns whether it applied."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux") or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        _ALLOCATOR_TUNED = libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and \
            libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): leave the allocator alone
        return False
    return _ALLOCATOR_TUNED


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def _cpu_name() -> str:
    return "cpu: " + cpu_name()
