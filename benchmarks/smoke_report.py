"""Summaries for benchmarks/gpu_bench.sh, read from run folders' metrics.jsonl (works for any run).

    python benchmarks/smoke_report.py throughput RUN_DIR [--skip 3]   # median tok/s, MFU, peak memory
    python benchmarks/smoke_report.py compare RUN_A RUN_B             # same steps, same losses? (resume check)
    python benchmarks/smoke_report.py evals RUN_DIR                   # last val bpb / CORE

Exits non-zero when a run folder is missing or a comparison fails, so the shell script can stop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"smoke_report: {path} not found (did the run start?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(run_dir: Path, skip: int) -> dict:
    records = read_metrics(run_dir)
    timed = records[skip:] or records
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"steps": len(records), "tok_per_sec": statistics.median(r["tok_per_sec"] for r in timed),
            "step_ms": 1000 * statistics.median(r["dt"] for r in timed),
            "mfu": statistics.median(mfu) if mfu else None,
            "peak_mem_mb": max(r["peak_mem_mb"] for r in records), "first_step_s": records[0]["dt"]}


def compare(run_a: Path, run_b: Path, rtol: float) -> list[str]:
    a, b = read_metrics(run_a), read_metrics(run_b)
    problems = []
    if [r["step"] for r in a] != [r["step"] for r in b]:
        problems.append(f"steps differ: {[r['step'] for r in a]} vs {[r['step'] for r in b]}")
    for ra, rb in zip(a, b, strict=False):
        x, y = ra["raw_loss"], rb["raw_loss"]
        if abs(x - y) > rtol * abs(x):
            problems.append(f"step {ra['step']}: loss {x:.6f} vs {y:.6f}")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("run_dir", type=Path)
    t.add_argument("--skip", type=int, default=3, help="warm-up / compile steps left out")
    c = sub.add_parser("compare")
    c.add_argument("run_a", type=Path)
    c.add_argument("run_b", type=Path)
    c.add_argument("--rtol", type=float, default=1e-2, help="GPU kernels are not bitwise deterministic")
    e = sub.add_parser("evals")
    e.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "throughput":
        s = throughput(args.run_dir, args.skip)
        mfu = f"{100 * s['mfu']:.2f}%" if s["mfu"] is not None else "n/a"
        print(f"{args.run_dir.name}: {s['tok_per_sec']:,.0f} tok/s, {s['step_ms']:.0f} ms/step, MFU {mfu}, "
              f"peak memory {s['peak_mem_mb']:,.0f} MB, first step {s['first_step_s']:.1f} s ({s['steps']} steps)")
    elif args.cmd == "compare":
        problems = compare(args.run_a, args.run_b, args.rtol)
        if problems:
            print("resume check FAILED:\n  " + "\n  ".join(problems))
            return 1
        print(f"resume check ok: {args.run_b.name} matches {args.run_a.name} step for step (rtol {args.rtol})")
    else:
        records = read_metrics(args.run_dir)
        bpb = [r for r in records if "val_bpb" in r]
        core = [r for r in records if "core" in r]
        print(f"{args.run_dir.name}: val bpb " + (f"{bpb[-1]['val_bpb']:.4f} at step {bpb[-1]['step']}" if bpb else "none")
              + ", CORE " + (f"{core[-1]['core']:.4f} at step {core[-1]['step']}" if core else "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
