"""IsoFLOP sweep: train a grid of depths x FLOP budgets with base_train, collect one CSV for scaling_fit.

    python scripts/scaling_sweep.py --preset cpu                      # 4 depths x 3 budgets, ~40 min on 2 cores
    python scripts/scaling_sweep.py --preset gpu --nproc 8            # d10-d20 x 1e18-1e19 on an 8-GPU node
    python scripts/scaling_sweep.py --depths 8,10,12,14,16 --flops 1e18,3e18,1e19 --nproc 8
    python scripts/scaling_sweep.py --preset cpu --collect-only       # rebuild the CSV from the run folders
    python scripts/scaling_fit.py --csv <base>/scaling_sweep/<name>/results.csv --plot-dir plots/

Each run is `scripts/base_train.py --depth D --target-flops C --model-tag <name>_d<D>_c<C>` (torchrun with
--nproc > 1) with CORE and samples off and val bpb at the end; its log goes beside the CSV. Finished runs
(last logged step = planned steps) are skipped, so an interrupted sweep resumes; a failed run gets an
empty val_bpb and the sweep goes on. Anything after `--` is passed to base_train unchanged.
"""

import argparse
import csv
import io
import os
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # `python scripts/scaling_sweep.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import get_base_dir
from nanochat.env import atomic_write_text
from nanochat.run_dir import run_dir
from nanochat.diagnose import load_run, run_summary

REPO = Path(__file__).resolve().parents[1]

# `cpu`: the sweep committed in benchmarks/results/scaling_sweep_cpu.* (~45 minutes on 2 shared, loaded
# cores). Data: the embedded offline corpus (python -m nanochat.dataset embedded) and a 4K tokenizer
# (scripts/tok_train.py --vocab-size 4096). head_dim 64 gives widths 64..256 at depths 1..4 (0.31M..4.2M
# scaling parameters, of which the LM head is 84%..25%). The LRs are the cpu speedrun's (8x the
# reference's base values: its sqrt(B/2^19) rule starves a 2,048-token batch). One thread per run: on a
# loaded machine two torch threads stall on each other (measured: 3.8 s/step vs 1.1 s/step at depth 2).
# Treat the fitted exponents as a demonstration of the method at 1e12-5e12 FLOPs, not a law for GPUs.
PRESETS = {
    "cpu": dict(depths=[1, 2, 3, 4], flops=[1e12, 2.15e12, 4.64e12], threads=1,
                train_args=["--head-dim", "64", "--max-seq-len", "256", "--device-batch-size", "8",
                            "--total-batch-size", "2048", "--warmup-steps", "5", "--keep-remainder", "32",
                            "--matrix-lr", "0.16", "--embedding-lr", "2.4", "--unembedding-lr", "0.064",
                            "--scalar-lr", "1.0", "--eval-tokens", "16384", "--device-type", "cpu"]),
    # the reference's GPU sweep shape on one 8-GPU node: d10-d20 at 1e18-1e19 FLOPs
    # (python scripts/scaling_sweep.py --preset gpu --nproc 8)
    "gpu": dict(depths=[10, 12, 14, 16, 18, 20], flops=[1e18, 2.15e18, 4.64e18, 1e19], train_args=[]),
}

CSV_COLUMNS = ["model_tag", "depth", "target_flops", "val_bpb", "train_loss", "scaling_params", "total_params",
               "tokens", "flops", "flops_6ND", "steps", "num_iterations", "complete", "status"]


def run_tag(name: str, depth: int, flops: float) -> str:
    return f"{name}_d{depth}_c{flops:.2e}".replace("+", "")


def collect(run_dirs) -> list[dict]:
    """One CSV row per run folder (missing folders give a row with status 'missing')."""
    rows = []
    for d in run_dirs:
        d = Path(d)
        try:
            row = run_summary(load_run(d))
            row["status"] = "complete" if row["complete"] else "incomplete"
        except FileNotFoundError:
            row = {"model_tag": d.name, "status": "missing"}
        rows.append(row)
    return rows


def write_csv(rows, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    atomic_write_text(path, text.getvalue())


def train_command(depth: int, flops: float, tag: str, nproc: int, extra: list[str]) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return launcher + ["-m", "scripts.base_train", "--depth", str(depth), "--target-flops", f"{flops:g}",
                       "--model-tag", tag, "--eval-every", "-1", "--core-metric-every", "0", "--sample-every", "0",
                       "--save-every", "-1", "--run", "dummy", *extra]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a ready grid (flags below override)")
    p.add_argument("--depths", default=None, help="comma-separated depths, e.g. 8,10,12")
    p.add_argument("--flops", default=None, help="comma-separated FLOP budgets, e.g. 1e18,3e18")
    p.add_argument("--name", default=None, help="sweep name: run tags and the output folder (default: preset or 'sweep')")
    p.add_argument("--nproc", type=int, default=1, help="GPUs per run (torchrun when > 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for each run (default: the preset's, else torch's own choice)")
    p.add_argument("--out", default=None, help="CSV path (default <base>/scaling_sweep/<name>/results.csv)")
    p.add_argument("--collect-only", action="store_true", help="do not train; rebuild the CSV from run folders")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--force", action="store_true", help="re-run runs that already finished")
    args = p.parse_args(argv)

    preset = PRESETS[args.preset] if args.preset else dict(depths=None, flops=None, train_args=[])
    threads = args.threads if args.threads is not None else preset.get("threads")
    if threads is not None and threads < 1:
        p.error("--threads must be >= 1")
    try:
        depths = [int(x) for x in args.depths.split(",")] if args.depths else preset["depths"]
        budgets = [float(x) for x in args.flops.split(",")] if args.flops else preset["flops"]
    except ValueError as e:
        p.error(f"--depths takes integers and --flops numbers, comma-separated ({e})")
    if not depths or not budgets:
        p.error("give --preset, or both --depths and --flops")
    if any(d < 1 for d in depths) or any(c <= 0 for c in budgets):
        p.error("depths must be >= 1 and budgets > 0")
    name = args.name or args.preset or "sweep"
    base = get_base_dir()
    out_dir = base / "scaling_sweep" / name
    csv_path = Path(args.out) if args.out else out_dir / "results.csv"
    grid = [(d, c, run_tag(name, d, c)) for c in budgets for d in depths]
    run_dirs = [run_dir("base", tag, base) for _, _, tag in grid]
    train_args = preset["train_args"] + extra
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)

    if args.dry_run:
        for d, c, tag in grid:
            print(" ".join(train_command(d, c, tag, args.nproc, train_args)))
        return 0
    if not args.collect_only:
        out_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.time()
        for i, ((d, c, tag), folder) in enumerate(zip(grid, run_dirs), 1):
            prefix = f"[{i}/{len(grid)}] depth {d}, C={c:.3g}"
            if not args.force and folder.is_dir() and collect([folder])[0]["status"] == "complete":
                print(f"{prefix}: already complete, skipped", flush=True)
                continue
            log_path = out_dir / f"{tag}.log"
            t0 = time.time()
            print(f"{prefix}: training ({log_path})", flush=True)
            with open(log_path, "w") as log:
                rc = subprocess.run(train_command(d, c, tag, args.nproc, train_args), cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, env=env).returncode
            row = collect([folder])[0]
            if rc != 0:
                tail = log_path.read_text().splitlines()[-5:]
                print(f"{prefix}: FAILED (exit {rc}) after {time.time() - t0:.0f}s; last lines of the log:\n    "
                      + "\n    ".join(tail), flush=True)
            else:
                print(f"{prefix}: val bpb {row.get('val_bpb')}, {row.get('tokens')} tokens, "
                      f"{time.time() - t0:.0f}s (sweep {time.time() - t_start:.0f}s)", flush=True)
            write_csv(collect(run_dirs), csv_path)  # after every run, so a partial sweep is usable
    rows = collect(run_dirs)
    write_csv(rows, csv_path)
    done = sum(r["status"] == "complete" for r in rows)
    print(f"wrote {csv_path}: {done}/{len(rows)} runs complete")
    if done < len(rows):
        print("  not complete: " + ", ".join(f"{r['model_tag']} ({r['status']})" for r in rows if r["status"] != "complete"))
    print(f"fit it: python scripts/scaling_fit.py --csv {csv_path}")
    return 0 if done == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
