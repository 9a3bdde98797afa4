"""Fit scaling laws to a CSV of runs: Chinchilla approach 3 (with bootstrap intervals) and approach 2.

    python scripts/scaling_fit.py --csv sweep.csv                       # nanochat sweep (scaling_sweep.py)
    python scripts/scaling_fit.py --csv pts.csv --n-col N --c-col C --loss-col loss --budget 1e21 --json
    python scripts/scaling_fit.py --csv sweep.csv --bootstrap 200 --plot-dir plots/

Rows are (N, D, loss) or (N, C, loss) with C = 6ND. The fitted law, the compute-optimal N*, D* and
tokens per parameter for each --budget, and (with --json) one JSON object that scripts/plan.py --fit reads.
"""

import argparse
import json
import math
import os
import sys

if not __package__:  # `python scripts/scaling_fit.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import scaling as sc

N_COLS = ("scaling_params", "N", "params", "n_params", "parameters")
LOSS_COLS = ("val_bpb", "loss", "L", "val_loss")
BUDGET_COLS = ("target_flops",)


def _header(path):
    import csv

    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), [])
    except OSError as e:
        raise SystemExit(f"error: cannot read --csv {path}: {e}") from None


def fit(args) -> dict:
    cols = _header(args.csv)
    n_col = args.n_col or next((c for c in N_COLS if c in cols), None)
    loss_col = args.loss_col or next((c for c in LOSS_COLS if c in cols), None)
    if n_col is None or loss_col is None:
        raise SystemExit(f"error: name the parameter and loss columns with --n-col/--loss-col; columns: {cols}")
    budget_col = args.budget_col if args.budget_col != "auto" else next((c for c in BUDGET_COLS if c in cols), None)
    if budget_col == "none":
        budget_col = None
    try:
        pts = sc.load_points(args.csv, n_col=n_col, loss_col=loss_col, d_col=args.d_col, c_col=args.c_col,
                             budget_col=budget_col)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    param_count = args.param_count or sc.points_param_count(pts)
    loss_unit = args.loss_unit or sc.points_loss_unit(pts)
    out = dict(csv=args.csv, n_col=n_col, loss_col=loss_col, budget_col=budget_col, n_points=len(pts),
               param_count=param_count, loss_unit=loss_unit)
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    f3 = None
    if len(pts) >= 5:
        f3 = sc.fit_approach3(pts, delta=args.delta, param_count=param_count, loss_unit=loss_unit)
        if args.bootstrap > 0:
            def progress(i, n):
                if i % max(1, n // 10) == 0 or i == n:
                    print(f"bootstrap {i}/{n}", file=sys.stderr, flush=True)

            f3 = sc.bootstrap_approach3(pts, n_boot=args.bootstrap, ci=args.ci, seed=args.seed, delta=args.delta,
                                        budgets=args.budget, fit=f3, progress=progress)
        law = f3.law
        out.update(law.to_dict())
        out.update(n_exponent=law.n_exponent, d_exponent=1 - law.n_exponent, G=law.G, objective=f3.objective,
                   intervals=f3.intervals, ci=args.ci if f3.intervals else None, n_bootstrap=f3.n_bootstrap)
    else:
        log(f"note: {len(pts)} rows; approach 3 needs at least 5 -- skipped")

    iso = sc.fit_approach2(pts, bucket_dex=args.bucket_dex)
    out["approach2"] = dict(a=iso.a, b=iso.b, kN=iso.kN, kD=iso.kD, slices=iso.slices)

    budgets = []
    for C in args.budget:
        row = dict(C=C)
        if f3:
            N, D = (float(v) for v in f3.law.compute_optimal(C))
            row.update(N_opt=N, D_opt=D, tokens_per_param=D / N, loss=float(f3.law.loss(N, D)))
            ci = f3.intervals.get(f"N_opt@{C:.3g}")
            if ci:
                row["N_opt_interval"] = ci
        if iso.a is not None:
            N2, D2 = (float(v) for v in iso.compute_optimal(C))
            row.update(approach2_N_opt=N2, approach2_D_opt=D2)
        budgets.append(row)
    out["budgets"] = budgets

    out["caveats"] = caveats(pts, out, args.budget)
    if args.plot_dir:
        out["plots"] = [str(p) for p in sc.plot_fit(pts, f3.law if f3 else None, iso, args.plot_dir)]
    return out


def caveats(pts, out: dict, budgets) -> list[str]:
    """What the data cannot support: constants at their bounds, few points per free constant, slices
    without an interior minimum, budgets outside the measured compute range."""
    notes = []
    n_dec = math.log10(pts.N.max() / pts.N.min())
    c_dec = math.log10(pts.C.max() / pts.C.min())
    notes.append(f"the runs span {n_dec:.2g} decades in N and {c_dec:.2g} in compute ({pts.C.min():.3g}-{pts.C.max():.3g} FLOPs)")
    if "E" in out:
        lo_e, hi_e = (math.exp(b) for b in sc._BOUNDS[2])
        for k, (lo, hi) in (("alpha", sc._BOUNDS[3]), ("beta", sc._BOUNDS[4])):
            if out[k] <= lo * 1.01 or out[k] >= hi * 0.99:
                notes.append(f"approach 3: {k} = {out[k]:.3g} sits at its bound [{lo:g}, {hi:g}]: not determined by the data")
        if out["E"] <= lo_e * 1.01 or out["E"] >= hi_e * 0.99:
            notes.append(f"approach 3: E = {out['E']:.3g} sits at its bound: the floor is not determined by the data")
        if out["n_points"] < 15:
            notes.append(f"approach 3: {out['n_points']} runs for 5 free constants: expect wide intervals")
        iv = out.get("intervals") or {}
        for k in ("alpha", "beta"):
            if k in iv and iv[k][1] - iv[k][0] > 0.5 * max(out[k], 1e-9):
                notes.append(f"approach 3: {k}'s interval [{iv[k][0]:.3g}, {iv[k][1]:.3g}] is wider than half its value")
    sl = out["approach2"]["slices"]
    bad = [s for s in sl if s["N_opt"] is None or not s["in_range"]]
    if bad:
        notes.append(f"approach 2: {len(bad)} of {len(sl)} IsoFLOP slices have no minimum inside the sampled N "
                     "(add smaller or larger models there)")
    for C in budgets:
        d = math.log10(C / pts.C.max())
        if d > 0.5:
            notes.append(f"budget {C:.3g} is {d:.2g} decades beyond the largest run: an extrapolation")
    return notes


def print_report(out: dict) -> None:
    print(f"{out['n_points']} runs from {out['csv']}: N = {out['n_col']} ({out['param_count']} parameters), "
          f"loss = {out['loss_col']} ({out['loss_unit']})")
    if "E" in out:
        iv = out.get("intervals") or {}

        def show(k, fmt):
            s = format(out[k], fmt)
            return s + (f" [{format(iv[k][0], fmt)}, {format(iv[k][1], fmt)}]" if k in iv else "")

        print("approach 3: L = E + A/N^alpha + B/D^beta" + (f"  ({out['ci']:.0%} bootstrap intervals, "
                                                              f"{out['n_bootstrap']} resamples)" if iv else ""))
        for k, fmt in (("E", ".4f"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".4f"), ("beta", ".4f")):
            print(f"  {k:<6} {show(k, fmt)}")
        print(f"  N* = G (C/6)^{out['n_exponent']:.4f}, G = {out['G']:.4g};  D* ~ C^{out['d_exponent']:.4f}")
    a2 = out["approach2"]
    for s in a2["slices"]:
        if s["N_opt"] is None:
            print(f"  IsoFLOP C={s['C']:.3g}: {s['n_points']} runs, no interior minimum")
        else:
            print(f"  IsoFLOP C={s['C']:.3g}: {s['n_points']} runs, N*={s['N_opt']:.4g} D*={s['D_opt']:.4g} "
                  f"loss*={s['loss_opt']:.4f}" + ("" if s["in_range"] else " (outside the sampled N: not used)"))
    if a2["a"] is not None:
        print(f"approach 2: N* = {a2['kN']:.4g} C^{a2['a']:.4f}, D* = {a2['kD']:.4g} C^{a2['b']:.4f}")
    else:
        print("approach 2: needs two or more IsoFLOP slices with an interior minimum")
    for b in out["budgets"]:
        line = f"budget C={b['C']:.3g}:"
        if "N_opt" in b:
            line += (f" N*={b['N_opt']:.4g} D*={b['D_opt']:.4g} ({b['tokens_per_param']:.1f} tokens/param), "
                     f"predicted {out['loss_col']} {b['loss']:.4f}")
            if "N_opt_interval" in b:
                line += f", N* interval [{b['N_opt_interval'][0]:.4g}, {b['N_opt_interval'][1]:.4g}]"
        if "approach2_N_opt" in b:
            line += f"; approach 2 N*={b['approach2_N_opt']:.4g}"
        print(line)
    for c in out.get("caveats", []):
        print(f"caveat: {c}")
    for p in out.get("plots", []):
        print(f"wrote {p}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", required=True, help="CSV of runs (e.g. from scripts/scaling_sweep.py)")
    p.add_argument("--n-col", default=None, help=f"parameter-count column (default: first of {', '.join(N_COLS)})")
    p.add_argument("--d-col", default=None, help="training-tokens column (default: tokens, D)")
    p.add_argument("--c-col", default=None, help="training-FLOPs column, used when no --d-col: D = C / (6N)")
    p.add_argument("--loss-col", default=None, help=f"loss column (default: first of {', '.join(LOSS_COLS)})")
    p.add_argument("--budget-col", default="auto",
                   help="column grouping runs into IsoFLOP slices exactly (default: target_flops if present; "
                        "'none' buckets 6ND instead)")
    p.add_argument("--bucket-dex", type=float, default=0.05, help="6ND bucketing width in decades (approach 2)")
    p.add_argument("--param-count", choices=("scaling", "total"), default=None,
                   help="which parameter count the N column is (default: guessed from its name)")
    p.add_argument("--loss-unit", choices=("bpb", "nats"), default=None, help="default: guessed from the column name")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for confidence intervals")
    p.add_argument("--ci", type=float, default=0.95, help="interval coverage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delta", type=float, default=1e-3, help="Huber delta on log-loss")
    p.add_argument("--budget", type=float, action="append", default=[], help="FLOP budget C to solve for (repeatable)")
    p.add_argument("--plot-dir", default=None, help="write isoflop.png, frontier.png, contours.png here")
    p.add_argument("--json", action="store_true", help="print one JSON object (read by scripts/plan.py --fit)")
    args = p.parse_args(argv)
    if not 0 < args.ci < 1:
        p.error("--ci must be in (0, 1)")
    if any(not (c > 0 and math.isfinite(c)) for c in args.budget):
        p.error("--budget must be a positive number of FLOPs, e.g. 1e21")
    out = fit(args)
    if args.json:
        print(json.dumps(out, default=float))
    else:
        print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
