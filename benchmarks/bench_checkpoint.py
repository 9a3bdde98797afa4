"""How long a training checkpoint takes to write: what a preemption grace period must cover.

    python benchmarks/bench_checkpoint.py                  # depth 12, 32K vocab, one process
    python benchmarks/bench_checkpoint.py --depth 20 --rounds 3 --dir /scratch/ckpt

One optimizer step first (so the optimizer state exists), then per round: `save_training_checkpoint`'s
parts timed separately: `MuonAdamW.state_dict()` (now references to the live tensors), the copy of
that state which state_dict() used to make (`clone()` of every tensor: time and bytes, which on a GPU
were allocated at save time), the model file and the optimizer file (each written to a temporary
name, fsynced, renamed; nanochat.checkpoint_manager.atomic_torch_save). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanochat import sizing  # noqa: E402
from nanochat.checkpoint_manager import atomic_torch_save, build_model  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=str, default=None, help="where to write (default: a temporary folder)")
    ap.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = sizing.model_config(args.depth, vocab_size=args.vocab_size, max_seq_len=256)
    model = build_model(cfg.to_dict(), args.device)
    opt = build_optimizer(model)
    x = torch.randint(0, args.vocab_size, (1, 64), device=args.device)
    model(x, x).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    folder.mkdir(parents=True, exist_ok=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"depth {args.depth}: {params / 1e6:.0f}M parameters on {args.device}, writing to {folder}")
    times: dict[str, list[float]] = {"state_dict": [], "old copy": [], "model file": [], "optimizer file": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        state = opt.state_dict()
        t1 = time.perf_counter()
        copy = {"state": [[{k: (v.clone() if torch.is_tensor(v) else v) for k, v in unit.items()} for unit in g]
                          for g in state["state"]]}
        if args.device == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        copy_bytes = sum(v.numel() * v.element_size() for g in copy["state"] for unit in g for v in unit.values()
                         if torch.is_tensor(v))
        del copy
        atomic_torch_save(model.state_dict(), folder / "model.pt")
        t3 = time.perf_counter()
        atomic_torch_save(state, folder / "optim.pt")
        t4 = time.perf_counter()
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    sizes = {"model file": os.path.getsize(folder / "model.pt"), "optimizer file": os.path.getsize(folder / "optim.pt")}
    for k, dt in med.items():
        extra = f" ({sizes[k] / 1e6:,.0f} MB)" if k in sizes else (f" ({copy_bytes / 1e6:,.0f} MB)" if k == "old copy" else "")
        print(f"  {k:15s} {dt:7.3f} s{extra}")
    now = med["state_dict"] + med["model file"] + med["optimizer file"]
    print(f"  checkpoint      {now:7.3f} s now, {now + med['old copy']:.3f} s with the copy "
          f"({args.rounds} rounds, medians)")
    if not args.dir:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
