"""Evaluation under the CPU dtype policy: val bpb and every CORE decision in fp32 and in bf16.

    NANOCHAT_BASE_DIR=DIR python benchmarks/bench_eval_dtype.py --max-per-task 16 --split-tokens 65536

Loads the newest base checkpoint of DIR (or --model-tag) twice, computing in float32 and in
bfloat16, and runs on each the validation bpb of the first --split-tokens tokens and CORE on a
subsample of the bundle (--max-per-task examples per task, --tasks to choose). Prints the bpb of
both and their relative difference, and for CORE each task's accuracy under both and the examples
whose decision (the chosen answer, or the all-argmax match of a language-modelling task) differs,
with the time each pass took. `--dtype auto` is what base_eval uses by default; this shows whether
bf16 changes what the evaluations decide.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-tag", default=None)
    p.add_argument("--max-per-task", type=int, default=16)
    p.add_argument("--tasks", default=None, help="comma-separated task labels (default: all in the bundle)")
    p.add_argument("--split-tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-bundle", default=None)
    args = p.parse_args()
    import torch

    from nanochat import core_eval
    from nanochat.checkpoint_manager import load_model
    from nanochat.common import init_runtime
    from nanochat.loss_eval import evaluate_split_bpb
    from nanochat.tokenizer import get_token_bytes

    ctx = init_runtime("cpu", "float32")
    bundle = core_eval.resolve_eval_bundle(args.eval_bundle)
    specs = core_eval.load_task_specs(bundle)
    if args.tasks:
        wanted = set(args.tasks.split(","))
        specs = [s for s in specs if s.label in wanted]
    data = {s.label: core_eval.load_task_data(bundle, s, args.max_per_task) for s in specs}
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer, _ = load_model("base", ctx.device, model_tag=args.model_tag, compute_dtype=dtype)
        seq = model.config.sequence_len
        t0 = time.time()
        with torch.no_grad():
            bpb = evaluate_split_bpb(model, tokenizer, get_token_bytes(), ctx, "val", args.split_tokens,
                                     args.batch_size, seq)
        t_bpb = time.time() - t0
        t0 = time.time()
        tasks = {}
        with torch.no_grad():
            for s in specs:
                if data[s.label] is None:
                    continue  # missing from the bundle (core_eval says which)
                tasks[s.label] = core_eval.evaluate_task(model, tokenizer, data[s.label], ctx.device, s,
                                                         max_seq_len=seq, collect_examples=True, ctx=ctx)
        results[dtype] = {"bpb": bpb, "tasks": tasks, "t_bpb": t_bpb, "t_core": time.time() - t0}
        print(f"{dtype!s:15s} val bpb {bpb:.5f} ({t_bpb:.1f} s)  CORE tasks {len(tasks)} ({time.time() - t0:.1f} s)",
              flush=True)
    f32, b16 = results[torch.float32], results[torch.bfloat16]
    n_total = n_diff = 0
    print("\n| task | n | accuracy fp32 | accuracy bf16 | decisions that differ |\n|---|---|---|---|---|")
    for label, t in f32["tasks"].items():
        u = b16["tasks"][label]
        diff = [a["idx"] for a, b in zip(t["examples"], u["examples"])
                if a["correct"] != b["correct"] or a.get("pred") != b.get("pred")]
        n_total += len(t["examples"])
        n_diff += len(diff)
        print(f"| {label} | {t['n']} | {t['accuracy']:.4f} | {u['accuracy']:.4f} | {len(diff)}{' ' + str(diff) if diff else ''} |")
    rel = abs(b16["bpb"] - f32["bpb"]) / f32["bpb"]
    print(f"\nval bpb fp32 {f32['bpb']:.5f}, bf16 {b16['bpb']:.5f}: {100 * rel:.3f}% apart; "
          f"CORE decisions differing: {n_diff} of {n_total}; "
          f"time fp32 {f32['t_bpb'] + f32['t_core']:.1f} s, bf16 {b16['t_bpb'] + b16['t_core']:.1f} s")


if __name__ == "__main__":
    main()
