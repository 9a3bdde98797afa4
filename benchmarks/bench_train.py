"""Training throughput of the real loop (scripts/base_train.py) and where a step's time goes.

    python benchmarks/bench_train.py                        # CPU: depth 4, seq 256, 2,048-token steps, 32K vocab
    python benchmarks/bench_train.py --real-data DIR        # the same on real text: DIR holds tokenizer/ and base_data/
    python benchmarks/bench_train.py --depth 12 --max-seq-len 2048 --device-batch-size 32 --total-batch-size 524288

Runs `base_train` on synthetic tokens (or, with --real-data, on real text through the real tokenizer
and data loader, evaluations off) in a throw-away base dir, reads its metrics.jsonl and prints the
median tok/s (and MFU on a GPU) over the steps after the first `--skip` (warm-up / compilation), then
times the forward+backward and the optimizer step of the same model separately (`--no-breakdown`
skips that). `--json` prints one JSON line last (for benchmarks/bench_vs_reference.py).
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
    p.add_argument("--real-data", default=None, help="a base dir with tokenizer/ and base_data/: train on real text")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", action="store_true")
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
        if args.real_data:
            real = Path(args.real_data).resolve()
            if not (real / "tokenizer").is_dir() or not (real / "base_data").is_dir():
                sys.exit(f"error: --real-data {real} needs tokenizer/ and base_data/ (bench_vs_reference.py makes them)")
            os.symlink(real / "tokenizer", Path(base) / "tokenizer")
            os.symlink(real / "base_data", Path(base) / "base_data")
            if (real / "dtype_probe.json").is_file():  # the probe's cache: measured once per machine
                os.symlink(real / "dtype_probe.json", Path(base) / "dtype_probe.json")
            data = ["--eval-every", "0", "--core-metric-every", "0", "--sample-every", "0"]
        else:
            data = ["--synthetic-data", "--vocab-size", str(args.vocab_size)]
        flags = data + ["--depth", str(args.depth),
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
        records = [r for r in records if "tok_per_sec" in r]
        run = json.loads((Path(base) / "base_checkpoints/bench/run.json").read_text())
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
    if args.breakdown:
        breakdown(args)
    if args.json:
        print(json.dumps({"impl": "ours", "tok_per_sec": tok_s, "step_s": statistics.median(r["dt"] for r in timed),
                          "first_step_s": first, "wall_s": wall, "dtype": run["env"]["dtype"],
                          "real_data": bool(args.real_data), "threads": torch.get_num_threads(),
                          "loss": records[-1].get("loss")}))


def breakdown(args) -> None:
    """Forward+backward vs optimizer step of the same model, outside the loop."""
    import torch

    from nanochat import sizing
    from nanochat.common import init_runtime, matmul_probe_shapes
    from nanochat.gpt import GPT
    from nanochat.optim import build_optimizer

    config = sizing.model_config(args.depth, max_seq_len=args.max_seq_len, vocab_size=args.vocab_size,
                                 window_pattern=args.window_pattern, value_embeds=args.value_embeds)
    ctx = init_runtime(args.device_type, args.dtype, seed=0,
                       probe_shapes=matmul_probe_shapes(config.n_embd, args.device_batch_size * args.max_seq_len,
                                                        config.padded_vocab_size))
    device_type, device = ctx.device_type, ctx.device
    model = GPT(config, compute_dtype=ctx.dtype).to(device)
    model.init_weights()
    lrs = sizing.learning_rates(args.total_batch_size, config.n_embd)
    opt = build_optimizer(model, **lrs, orth_dtype=ctx.orth_dtype)
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
