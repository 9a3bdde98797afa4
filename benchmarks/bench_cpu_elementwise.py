"""The body's elementwise kernels on this CPU in fp32 and bf16: RMS norm and rotary, as gpt.py runs them
and in the alternatives that were considered.

    python benchmarks/bench_cpu_elementwise.py            # the CPU demo's shapes: (8, 512, 256) and (8, 256, 2, 128)

bf16 elementwise math on a CPU converts to fp32 inside each kernel, so it is not the 2x of halved
memory traffic that bf16 matmuls get; this shows by how much, per call. Each figure is the median of
`--reps` calls after warm-up; `err` is the largest difference from an fp32 computation of the same op.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nanochat.common import tune_cpu_allocator  # noqa: E402
from nanochat.gpt import apply_rotary, rms_norm  # noqa: E402


def rms_norm_upcast(x):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + torch.finfo(torch.float32).eps)).to(x.dtype)


def rotary_addcmul(x, cos, sin):
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    out = torch.empty_like(x)
    torch.addcmul(x1 * cos, x2, sin, out=out[..., :d])
    torch.addcmul(x2 * cos, x1, sin, value=-1, out=out[..., d:])
    return out


def timed(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    tune_cpu_allocator()  # as init_runtime does: no page faults in the figures
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        x = torch.randn(8, 512, 256).to(dtype)
        ref = F.rms_norm(x.float(), (256,))
        norms = (("rms_norm (gpt.py: F.rms_norm)", rms_norm), ("rms_norm, fp32 upcast by hand", rms_norm_upcast))
        for label, fn in norms:
            err = (fn(x).float() - ref).abs().max().item()
            print(f"{name:9s} {label:32s} {timed(lambda: fn(x), args.reps):6.2f} ms  err {err:.2g}")
        q = torch.randn(8, 256, 2, 128).to(dtype)
        cos, sin = torch.randn(1, 256, 1, 64).to(dtype), torch.randn(1, 256, 1, 64).to(dtype)
        ref = apply_rotary(q.float(), cos.float(), sin.float())
        rotaries = (("rotary (gpt.py: products + cat)", apply_rotary), ("rotary through addcmul", rotary_addcmul))
        for label, fn in rotaries:
            err = (fn(q, cos, sin).float() - ref).abs().max().item()
            print(f"{name:9s} {label:32s} {timed(lambda: fn(q, cos, sin), args.reps):6.2f} ms  err {err:.2g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
