"""What the checkpoint checksums cost: CRC-32 computed while writing each file, checked before loading it.

    python benchmarks/bench_checkpoint_checksum.py              # depth 8, 32K vocab, CPU, 5 rounds
    python benchmarks/bench_checkpoint_checksum.py --depth 20 --dir /scratch   # the real thing, if it fits

One optimizer step first (so the optimizer state exists), then per round, interleaved: a checkpoint saved
(`save_checkpoint`: model + optimizer file, the CRC-32 computed from the bytes as they are written), the
CRC-32 of the same bytes alone (what the save pays for the checksum), torch.load of both files without the
check, and the check alone (`file_checksum`: one more sequential read, from the page cache here). Medians.
The depth-20 line scales the measured bytes per parameter and throughputs to depth 20's parameter count.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from nanochat import checkpoint_manager as cm  # noqa: E402
from nanochat import sizing  # noqa: E402
from nanochat.optim import build_optimizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", type=str, default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args(argv)
    cfg = sizing.model_config(args.depth, vocab_size=args.vocab_size, max_seq_len=256)
    model = cm.build_model(cfg.to_dict(), "cpu", torch.float32)
    opt = build_optimizer(model)
    x = torch.randint(0, args.vocab_size, (1, 64))
    model(x, x).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench_crc_"))
    folder.mkdir(parents=True, exist_ok=True)
    params = sum(p.numel() for p in model.parameters())
    meta = {"model_config": cfg.to_dict(), "world_size": 1}
    t: dict[str, list[float]] = {"save (with CRC)": [], "CRC of the bytes": [], "load (torch.load)": [],
                                 "check (read + CRC)": []}
    nbytes = 0
    for r in range(args.rounds):
        step = r + 1
        t0 = time.perf_counter()
        cm.save_checkpoint(folder, step, model.state_dict(), opt.state_dict(), meta)
        t1 = time.perf_counter()
        files = [cm.model_path(folder, step), cm.optim_path(folder, step, 0)]
        blobs = [p.read_bytes() for p in files]
        nbytes = sum(len(b) for b in blobs)
        t2 = time.perf_counter()
        for b in blobs:
            zlib.crc32(b)
        t3 = time.perf_counter()
        del blobs
        for p in files:
            torch.load(p, weights_only=True)
        t4 = time.perf_counter()
        for p in files:
            cm.file_checksum(p)
        t5 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t3 - t2, t4 - t3, t5 - t4)):
            t[k].append(v)
        cm.delete_checkpoint(folder, step)
    med = {k: statistics.median(v) for k, v in t.items()}
    print(f"depth {args.depth}: {params / 1e6:.0f}M parameters, checkpoint {nbytes / 1e6:.0f} MB "
          f"({nbytes / params:.1f} bytes/parameter), {args.rounds} rounds, medians:")
    for k, v in med.items():
        print(f"  {k:<20} {v:7.3f} s  ({nbytes / v / 1e9:.2f} GB/s)")
    print(f"  save overhead   {100 * med['CRC of the bytes'] / med['save (with CRC)']:.0f}% of the save; "
          f"load overhead {100 * med['check (read + CRC)'] / med['load (torch.load)']:.0f}% of torch.load")
    d20 = sizing.count_params(sizing.model_config(20, vocab_size=args.vocab_size))["total"]
    if d20:
        b20 = d20 * nbytes / params
        print(f"depth 20 (estimate): {d20 / 1e6:.0f}M parameters, checkpoint ~{b20 / 1e9:.1f} GB: CRC while saving "
              f"~{b20 / (nbytes / med['CRC of the bytes']):.1f} s, check before loading "
              f"~{b20 / (nbytes / med['check (read + CRC)']):.1f} s (page cache; a cold disk adds its read time)")
    if args.dir is None:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
