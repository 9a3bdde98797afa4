"""CORE evaluation speed: batched (packed forwards), batched + shared multiple-choice context (KV cache),
and the unbatched reference (one example per forward).

A randomly initialised GPT (default depth 4, 32K-row head) and a small BPE tokenizer trained on the
bundle's own rows (offline); N examples per task from the eval bundle. Prints examples/s of both
paths, the speed-ups, and counts decisions that differ from the reference.

    python benchmarks/bench_core.py --eval-bundle ../shared/data/eval_bundle --per-task 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nanochat import core_eval
from nanochat.gpt import GPT
from nanochat.sizing import model_config
from nanochat.tokenizer import Tokenizer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval-bundle", default=os.environ.get(core_eval.EVAL_BUNDLE_ENV), help="eval bundle folder")
    p.add_argument("--per-task", type=int, default=16, help="examples per task (seed-1337 subsample)")
    p.add_argument("--tasks", default="", help="comma-separated task labels (default: all present)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--model-vocab", type=int, default=32768, help="rows of the LM head (the tokenizer uses the first ids)")
    p.add_argument("--tok-vocab", type=int, default=4096)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (the best is kept)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = core_eval.resolve_eval_bundle(args.eval_bundle, download=False)
    specs = core_eval.load_task_specs(bundle)
    # the tokenizer learns from 200 rows of every task present, whatever subset is timed
    texts = [json.dumps(row) for s in specs for row in (core_eval.load_task_data(bundle, s, 200) or [])]
    tokenizer = Tokenizer.train_from_iterator(texts, vocab_size=args.tok_vocab)
    if args.tasks:
        specs = [s for s in specs if s.label in set(args.tasks.split(","))]
    datasets = {s.label: core_eval.load_task_data(bundle, s, args.per_task) for s in specs}
    datasets = {k: v for k, v in datasets.items() if v is not None}
    torch.manual_seed(0)
    config = model_config(args.depth, max_seq_len=args.max_seq_len, vocab_size=args.model_vocab)
    model = GPT(config).to(args.device)
    model.init_weights()
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: depth {args.depth}, d_model {config.n_embd}, {n_params / 1e6:.1f}M params, head {config.vocab_size} rows; "
          f"tokenizer {tokenizer.get_vocab_size()} tokens; device {args.device}, {torch.get_num_threads()} threads")
    pad = tokenizer.get_bos_token_id()
    modes = {"unbatched": dict(batched=False), "batched": dict(batched=True),
             "batched+shared": dict(batched=True, share_prefix=True)}
    totals = {m: 0.0 for m in modes}
    mismatches = {m: 0 for m in modes}
    n_total, tokens_total = 0, 0
    print(f"{'task':<34} {'n':>4} {'tokens':>8} " + " ".join(f"{m + ' ex/s':>19}" for m in modes) + "  speed-ups")
    for spec in specs:
        data = datasets.get(spec.label)
        if data is None:
            print(f"{spec.label:<34} missing")
            continue
        examples = core_eval.prepare_examples(data, list(range(len(data))), spec, tokenizer, args.max_seq_len)
        tokens = sum(len(t) for ex in examples for t in ex.tokens)
        times, decisions = {m: math.inf for m in modes}, {}
        # modes interleaved, best of --repeats: on a machine shared with other jobs the minimum is
        # the time least disturbed by them
        for _ in range(args.repeats):
            for mode, kw in modes.items():
                t0 = time.perf_counter()
                decisions[mode] = core_eval.run_examples(model, examples, pad, args.device,
                                                         batch_tokens=args.batch_tokens, **kw)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[mode] = min(times[mode], time.perf_counter() - t0)
        for mode in modes:
            totals[mode] += times[mode]
            mismatches[mode] += sum(a["correct"] != b["correct"] or a.get("pred") != b.get("pred")
                                    for a, b in zip(decisions["unbatched"], decisions[mode]))
        n_total += len(data)
        tokens_total += tokens
        print(f"{spec.label:<34} {len(data):>4} {tokens:>8} " + " ".join(f"{len(data) / times[m]:>19.2f}" for m in modes)
              + "  " + " ".join(f"{times['unbatched'] / times[m]:.2f}x" for m in modes if m != "unbatched"), flush=True)
    print(f"{'TOTAL':<34} {n_total:>4} {tokens_total:>8} " + " ".join(f"{n_total / totals[m]:>19.2f}" for m in modes)
          + "  " + " ".join(f"{totals['unbatched'] / totals[m]:.2f}x" for m in modes if m != "unbatched"))
    print("decisions that differ from the unbatched reference: "
          + ", ".join(f"{m} {mismatches[m]} of {n_total}" for m in modes if m != "unbatched"))

if __name__ == "__main__":
    main()
