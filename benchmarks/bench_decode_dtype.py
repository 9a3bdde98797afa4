"""Decoding speed of the engine in fp32 vs bf16 on this CPU, at the CPU demo's model shape.

    python benchmarks/bench_decode_dtype.py                    # depth 4, width 256, 4K vocab, 1 and 8 samples
    python benchmarks/bench_decode_dtype.py --depth 4 --vocab-size 4096 --samples 1,8 --rounds 3

Decoding multiplies a few rows at a time, where bf16's casts cost more than its faster products; this
is the measurement behind inference choosing its `auto` dtype at decode shapes
(nanochat.checkpoint_manager.build_model). Randomly initialised weights: speed does not depend on
them, and no stop token ends a sample early (every sample runs the full --max-tokens). The dtypes are
interleaved round by round so that a change of load hits both alike.
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

from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT  # noqa: E402
from nanochat.sizing import model_config  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--samples", default="1,8", help="comma-separated samples per prompt (the decode batch)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = model_config(args.depth, max_seq_len=args.max_seq_len, vocab_size=args.vocab_size)
    torch.manual_seed(0)
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = GPT(config, compute_dtype=dtype)
        model.init_weights()
        models[dtype] = Engine(model.eval())
    prompt = torch.randint(0, args.vocab_size, (args.prompt_tokens,)).tolist()
    samples = [int(x) for x in args.samples.split(",")]
    rates = {(d, n): [] for d in models for n in samples}
    for _ in range(args.rounds):
        for n in samples:
            for dtype, engine in models.items():
                t0 = time.perf_counter()
                steps = sum(1 for _ in engine.generate(prompt, num_samples=n, max_tokens=args.max_tokens,
                                                       temperature=1.0, top_k=50, seed=1, stop_tokens=set(),
                                                       tools=False))
                rates[(dtype, n)].append(steps * n / (time.perf_counter() - t0))
    print(f"depth {args.depth}, width {config.n_embd}, vocab {args.vocab_size}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, median tok/s (prompt {args.prompt_tokens}, {args.max_tokens} new tokens)")
    print("| samples | fp32 tok/s | bf16 tok/s | bf16 / fp32 |\n|---|---|---|---|")
    for n in samples:
        f32, b16 = (statistics.median(rates[(d, n)]) for d in (torch.float32, torch.bfloat16))
        print(f"| {n} | {f32:,.0f} | {b16:,.0f} | {b16 / f32:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
