"""Approach-3 fit time with OpenBLAS pinned to one thread (the default) vs its thread pool.

    python benchmarks/bench_scaling_fit.py [--repeats 5] [--points-per-budget 9]

A 5-parameter L-BFGS-B fit calls BLAS on tiny vectors; on a busy machine an awake OpenBLAS thread pool
costs more than the arithmetic. Prints median wall and process-CPU seconds per fit on 5 IsoFLOP budgets,
and the wall time of a 20-resample bootstrap.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402,F401 -- imported up front: its BLAS must be loaded before timing

from nanochat import scaling as sc  # noqa: E402


def points(per_budget: int) -> sc.Points:
    law = sc.LossLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.32)
    rng = np.random.default_rng(0)
    N, D = [], []
    for C in np.geomspace(1e17, 1e21, 5):
        n_opt = law.compute_optimal(C)[0]
        for f in np.geomspace(1 / 8, 8, per_budget):
            N.append(n_opt * f)
            D.append(C / (6 * n_opt * f))
    N, D = np.array(N), np.array(D)
    return sc.Points(N, D, law.loss(N, D) * np.exp(0.002 * rng.standard_normal(len(N))))


def timed(fn, repeats):
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--points-per-budget", type=int, default=9)
    args = p.parse_args()
    pts = points(args.points_per_budget)
    pinned = sc.single_threaded_blas
    for label, ctx in (("one BLAS thread (default)", pinned), ("OpenBLAS thread pool", contextlib.nullcontext)):
        sc.single_threaded_blas = ctx
        wall, cpu = timed(lambda: sc.fit_approach3(pts), args.repeats)
        bwall, _ = timed(lambda: sc.bootstrap_approach3(pts, n_boot=20), 1)
        print(f"{label:<28} fit ({len(pts)} points): {wall:.3f} s wall, {cpu:.3f} s CPU | bootstrap x20: {bwall:.2f} s")
    sc.single_threaded_blas = pinned


if __name__ == "__main__":
    main()
