"""Time the reference implementation's (karpathy/nanochat) training step on this machine.

    python benchmarks/reference_step.py --reference-dir /tmp/refnc --tokens tokens.npy --steps 12

Run by `benchmarks/bench_vs_reference.py`, in a subprocess whose import path holds only the
reference checkout (`--reference-dir` holds its `nanochat/` package; nothing of it is in this
repository). It repeats what the reference's `scripts/base_train.py` does per step on CPU: its
`GPT` at the given depth (its defaults: aspect ratio 64, head dim 128, window pattern SSSL, value
embeddings), `torch.compile(model, dynamic=False)` as its base_train always does, its
`setup_optimizer` (MuonAdamW with compiled kernels), its compute dtype (fp32 on CPU unless
NANOCHAT_DTYPE says otherwise), forward+backward then `optimizer.step()`, on consecutive windows of
real-text tokens from `--tokens` (an int32 .npy written by the caller). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", required=True, help="folder holding the reference's nanochat/ package")
    p.add_argument("--tokens", required=True, help="int32 .npy of real-text token ids (< vocab size)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="run the reference model uncompiled")
    args = p.parse_args()
    sys.path.insert(0, args.reference_dir)
    import numpy as np
    import torch

    from nanochat.gpt import (  # the reference's package (reference_dir is first on the path)
        GPT,
        GPTConfig,
    )

    if "nanochat" not in sys.modules or args.reference_dir not in (sys.modules["nanochat"].__file__ or ""):
        sys.exit(f"error: nanochat was not imported from {args.reference_dir}")
    dim = args.depth * 64
    heads = max(1, dim // 128)
    config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=args.vocab_size, n_layer=args.depth, n_head=heads,
                       n_kv_head=heads, n_embd=dim)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    optimizer = model.setup_optimizer()
    train_model = model if args.no_compile else torch.compile(model, dynamic=False)
    tokens = torch.from_numpy(np.load(args.tokens).astype(np.int64))
    B, T = args.device_batch_size, args.max_seq_len
    per_step = B * (T + 1)
    times = []
    for step in range(args.steps):
        lo = (step * per_step) % max(1, tokens.numel() - per_step)
        batch = tokens[lo:lo + per_step].view(B, T + 1)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # as its data loader hands them over
        t0 = time.time()
        loss = train_model(x, y)
        loss.backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.time() - t0)
    timed = times[args.skip:]
    print(json.dumps({"impl": "reference", "tok_per_sec": B * T / statistics.median(timed), "step_s": statistics.median(timed),
                      "first_step_s": times[0], "loss": float(loss), "threads": torch.get_num_threads(),
                      "params": sum(p.numel() for p in model.parameters()), "compiled": not args.no_compile,
                      "dtype": str(next(model.parameters()).dtype)}))


if __name__ == "__main__":
    main()
