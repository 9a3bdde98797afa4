"""Training throughput of the real loop (scripts/base_train.py) and where a step's time goes.

    python benchmarks/bench_train.py                        # CPU: depth 4, seq 256, 2,048-token steps, 32K vocab
    python benchmarks/bench_train.py --depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288

Runs `base_train` on synthetic tokens (throughput does not depend on the text) in a throw-away
base dir, reads its metrics.jsonl and prints the median tok/s (and MFU on a GPU) over the steps
after the first `--skip` (warm-up / compilation), then times the forward+backward and the optimizer
step of the same model separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--total-batch-size", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--window-pattern", default="L", help="e.g. SSSL (the reference's default architecture)")
    p.add_argument("--value-embeds", action="store_true")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="steps left out of the median (warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device-type", default=None)
    p.add_argument("--dtype", default=None)
    return p.parse_args()


def main() -> None:
    args = parse()
    import os

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from scripts.base_train import main as base_train

    with tempfile.TemporaryDirectory() as base:
        os.environ["NANOCHAT_BASE_DIR"] = base
        flags = ["--synthetic-data", "--vocab-size", str(args.vocab_size), "--depth", str(args.depth),
                 "--max-seq-len", str(args.max_seq_len), "--device-batch-size", str(args.device_batch_size),
                 "--total-batch-size", str(args.total_batch_size), "--num-iterations", str(args.steps),
                 "--model-tag", "bench", "--weight-decay", "0", "--window-pattern", args.window_pattern]
        flags += ["--value-embeds"] if args.value_embeds else []
        flags += ["--compile"] if args.compile else ["--no-compile"] if args.compile is False else []
        flags += ["--device-type", args.device_type] if args.device_type else []
        flags += ["--dtype", args.dtype] if args.dtype else []
        t0 = time.time()
        code = base_train(flags)
        wall = time.time() - t0
        if code != 0:
            sys.exit(code)
        records = [json.loads(x) for x in (Path(base) / "base_checkpoints/bench/metrics.jsonl").read_text().splitlines()]
    timed = records[args.skip:]
    tok_s = statistics.median(r["tok_per_sec"] for r in timed)
    first = records[0]["dt"]
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    print("-" * 72)
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"depth {args.depth}, seq {args.max_seq_len}, {args.total_batch_size:,}-token steps, vocab {args.vocab_size:,}, "
          f"windows {args.window_pattern}, value embeddings {'on' if args.value_embeds else 'off'}")
    print(f"tok/s (median of steps {args.skip + 1}-{args.steps}): {tok_s:,.0f}   "
          f"step {statistics.median(r['dt'] for r in timed) * 1000:.0f} ms   first step {first:.2f} s   "
          f"wall {wall:.1f} s (incl. start-up)")
    if mfu:
        print(f"MFU {100 * statistics.median(mfu):.2f}%   peak memory {max(r['peak_mem_mb'] for r in records):,.0f} MB")
    breakdown(args)


def breakdown(args) -> None:
    """Forward+backward vs optimizer step of the same model, outside the loop."""
    import torch

    from nanochat import sizing
    from nanochat.common import autodetect_device_type, resolve_dtype
    from nanochat.gpt import GPT
    from nanochat.optim import build_optimizer

    device_type = autodetect_device_type(args.device_type)
    device = torch.device(device_type)
    config = sizing.model_config(args.depth, max_seq_len=args.max_seq_len, vocab_size=args.vocab_size,
                                 window_pattern=args.window_pattern, value_embeds=args.value_embeds)
    model = GPT(config, compute_dtype=resolve_dtype(device_type, args.dtype)).to(device)
    model.init_weights()
    lrs = sizing.learning_rates(args.total_batch_size, config.n_embd)
    opt = build_optimizer(model, **lrs, **({"orth_dtype": torch.float32} if device_type == "cpu" else {}))
    x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len + 1), device=device)
    fb, st = [], []
    for _ in range(5):
        t0 = time.time()
        model(x[:, :-1], x[:, 1:]).backward()
        if device_type == "cuda":
            torch.cuda.synchronize()
        t1 = time.time()
        opt.step()
        model.zero_grad(set_to_none=True)
        if device_type == "cuda":
            torch.cuda.synchronize()
        fb.append(t1 - t0)
        st.append(time.time() - t1)
    print(f"breakdown (median of 4 after 1 warm-up, one micro-batch): forward+backward "
          f"{statistics.median(fb[1:]) * 1000:.0f} ms, optimizer step {statistics.median(st[1:]) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
