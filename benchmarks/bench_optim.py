"""Optimizer step time against one forward+backward of the GPT: what the optimizer costs per step.

    python benchmarks/bench_optim.py --depth 4                              # CPU, d_model 256
    python benchmarks/bench_optim.py --depth 4 --orth-dtype fp32            # CPU without bf16 matmuls
    python benchmarks/bench_optim.py --depth 12 --device cuda --batch-size 32 --seq-len 2048

Prints the median wall-clock (and, on CPU, process CPU) milliseconds of forward+backward on one
(batch, seq) micro-batch, of `MuonAdamW.step()`, and of the orthogonalisation alone (every Muon
stack of the model once), plus the ratio step / forward+backward. With gradient accumulation the
step is paid once per `grad_accum_steps` micro-batches.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nanochat.gpt import GPT
from nanochat.optim import build_optimizer, orthogonalize
from nanochat.sizing import model_config

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one call, synchronising the GPU around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--orth", default="polar_express", choices=["polar_express", "quintic"])
    p.add_argument("--orth-dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--no-normuon", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the orthogonalisation (CUDA only)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but torch.cuda.is_available() is False")

    device = torch.device(args.device)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.depth, max_seq_len=args.seq_len)
    with torch.device(device):
        model = GPT(config, compute_dtype=compute_dtype)
    model.init_weights()
    opt = build_optimizer(model, weight_decay=0.1, orth=args.orth, orth_dtype=DTYPES[args.orth_dtype],
                          normuon=not args.no_normuon, compile=args.compile)
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def fwd_bwd():
        model(x, y).backward()

    stacks = [torch.randn(len(u.params), *u.shape, device=device)
              for units in opt._get_plan() for u in units if hasattr(u, "shape")]

    def orth_only():
        for g in stacks:
            orthogonalize(g, args.orth, dtype=DTYPES[args.orth_dtype])

    n_params = sum(q.numel() for q in model.parameters())
    print(f"depth {args.depth}: d_model {config.n_embd}, {n_params / 1e6:.1f}M params, "
          f"micro-batch {args.batch_size}x{args.seq_len}, device {device}, threads {torch.get_num_threads()}, "
          f"orth {args.orth} in {args.orth_dtype}, normuon {not args.no_normuon}")
    print("muon stacks: " + ", ".join(f"{g.shape[0]}x{tuple(g.shape[1:])}" for g in stacks))
    fb, st, orth = [], [], []
    for i in range(args.warmup + args.steps):
        t_fb = timed(fwd_bwd, device)
        t_st = timed(opt.step, device)
        opt.zero_grad(set_to_none=True)
        t_or = timed(orth_only, device)
        if i >= args.warmup:
            fb.append(t_fb), st.append(t_st), orth.append(t_or)

    def med(rows, k):
        return statistics.median(r[k] for r in rows)

    print(f"{'':>22} {'wall ms':>10} {'CPU ms':>10}")
    for name, rows in (("forward+backward", fb), ("optimizer step", st), ("  orthogonalisation", orth)):
        print(f"{name:>22} {med(rows, 0):10.1f} {med(rows, 1):10.1f}")
    print(f"step / forward+backward: {med(st, 0) / med(fb, 0):.2f} (wall), {med(st, 1) / med(fb, 1):.2f} (CPU)")


if __name__ == "__main__":
    main()
