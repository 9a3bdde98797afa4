"""What memory handling costs a CPU training step: the fused loss's reused buffers and glibc's heap.

    python benchmarks/bench_cpu_memory.py                 # 32K-vocab loss, then the demo's 4K-vocab step
    python benchmarks/bench_cpu_memory.py --rounds 6 --dtype bfloat16

1. The fused LM loss (nanochat/lm_loss.py) at 2,048 rows x 32K vocab, forward+backward, with its chunk
   buffers kept between calls (what it does) against fresh ones every call (the buffer cache emptied
   before each call, as the code did before).
2. A depth-4 forward+backward at the CPU demo's shape (4K vocab, 8 x 256 tokens), each round in two
   fresh processes: with `nanochat.common.tune_cpu_allocator` (what init_runtime does on CPU) and
   without it (MALLOC_CHECK_=0 in the child's environment, which makes the tuning stand aside).
Rounds alternate the two variants so that a change of the machine's speed hits both alike; medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STEP_CHILD = """
import sys, time, torch
from nanochat.common import tune_cpu_allocator
print("tuned" if tune_cpu_allocator() else "untuned", file=sys.stderr)
from nanochat.gpt import GPT, GPTConfig
torch.manual_seed(0)
V = {vocab}
with torch.device("meta"):
    m = GPT(GPTConfig(sequence_len=256, vocab_size=V, n_layer=4, n_head=2, n_kv_head=2, n_embd=256))
m.to_empty(device="cpu"); m.init_weights(); m.compute_dtype = torch.{dtype}
x, y = torch.randint(0, V, (8, 256)), torch.randint(0, V, (8, 256))
for _ in range(3):
    m(x, y).backward()
t = time.perf_counter()
for _ in range({steps}):
    m(x, y).backward()
print((time.perf_counter() - t) / {steps} * 1e3)
"""


def loss_ms(dtype: torch.dtype, fresh: bool, reps: int) -> float:
    from nanochat import lm_loss

    torch.manual_seed(0)
    x = torch.randn(2048, 256).to(dtype).requires_grad_()
    w = (torch.randn(32768, 256) * 0.02).requires_grad_()
    t = torch.randint(0, 32768, (2048,))
    times = []
    for i in range(reps + 1):
        if fresh:
            lm_loss._BUFFERS.tensors = {}
        t0 = time.perf_counter()
        lm_loss.linear_softcap_cross_entropy(x, w, t, softcap=15.0).backward()
        if i:  # the first call allocates either way
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def step_ms(tuned: bool, vocab: int, dtype: str, steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    if not tuned:
        env["MALLOC_CHECK_"] = "0"
    out = subprocess.run([sys.executable, "-c", STEP_CHILD.format(vocab=vocab, dtype=dtype, steps=steps)],
                         capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.strip())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--step-vocab", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    kept, fresh = [], []
    for r in range(args.rounds):
        for name, out in ((("kept", kept), ("fresh", fresh)) if r % 2 == 0 else (("fresh", fresh), ("kept", kept))):
            out.append(loss_ms(dtype, name == "fresh", reps=4))
    print(f"fused loss fwd+bwd, 2,048 x 32K: buffers kept {statistics.median(kept):.0f} ms "
          f"({', '.join(f'{v:.0f}' for v in kept)}), fresh {statistics.median(fresh):.0f} ms "
          f"({', '.join(f'{v:.0f}' for v in fresh)})", flush=True)
    tuned, untuned = [], []
    for r in range(args.rounds):
        for flag in ((True, False) if r % 2 == 0 else (False, True)):
            (tuned if flag else untuned).append(step_ms(flag, args.step_vocab, args.dtype, args.steps))
    print(f"depth-4 fwd+bwd, 2,048 tokens, vocab {args.step_vocab}: allocator tuned "
          f"{statistics.median(tuned):.0f} ms ({', '.join(f'{v:.0f}' for v in tuned)}), untuned "
          f"{statistics.median(untuned):.0f} ms ({', '.join(f'{v:.0f}' for v in untuned)})")
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
