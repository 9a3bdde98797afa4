"""Scaling laws: fit them to measurements, and use them to choose a model size.

The loss law is Chinchilla's parametric form (Hoffmann et al. 2022, "approach 3"):

    L(N, D) = E + A / N^alpha + B / D^beta        N = parameters, D = training tokens

fitted as in the paper (and Epoch AI's replication, arXiv 2404.10102): a Huber loss (delta 1e-3) on
log L, with log L written as a log-sum-exp LSE(a - alpha log N, b - beta log D, e), A = exp(a),
B = exp(b), E = exp(e), minimised with L-BFGS from a grid of starting points. "Approach 2" fits a
parabola of loss against log N on each IsoFLOP slice and power laws through the minima.

Training compute is C = 6ND throughout. Which parameter count N means (nanochat's "scaling"
parameters, or all parameters as in Chinchilla) is the caller's choice; a fitted law carries a
`param_count` label so that the planner maps N to a depth with the same counting.

Pure numpy/scipy; matplotlib only inside `plot_fit`.
"""

from __future__ import annotations

import contextlib
import ctypes
import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------------------------
# the law


@dataclass(frozen=True)
class LossLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    param_count: str = "total"  # which N the law was fitted with: "scaling" or "total"
    loss_unit: str = "nats"  # what L measures: "nats" (per token) or "bpb"

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def G(self) -> float:
        """N*(C) = G (C/6)^(beta/(alpha+beta)): the constant of the compute-optimal frontier."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    @property
    def n_exponent(self) -> float:
        """a in N* ~ C^a."""
        return self.beta / (self.alpha + self.beta)

    def compute_optimal(self, C):
        """(N*, D*) minimising L subject to 6ND = C (closed form; Hoffmann et al. appendix D.2)."""
        C = np.asarray(C, dtype=float)
        N = self.G * (C / 6.0) ** self.n_exponent
        D = C / (6.0 * N)
        return N, D

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LossLaw":
        missing = [k for k in ("E", "A", "B", "alpha", "beta") if k not in d]
        if missing:
            raise ValueError(f"a loss law needs E, A, B, alpha, beta; missing {missing}")
        extra = {k: d[k] for k in ("param_count", "loss_unit") if k in d}
        return cls(float(d["E"]), float(d["A"]), float(d["B"]), float(d["alpha"]), float(d["beta"]), **extra)


# Published constants (REFERENCE section 10). Both count all parameters and measure loss in nats
# per token on MassiveText, so absolute losses do not transfer to other data or tokenizers.
CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, param_count="total", loss_unit="nats")
EPOCH_AI = LossLaw(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658, param_count="total", loss_unit="nats")

# Compute-optimal tokens per *total* parameter in Chinchilla's counting (Hoffmann et al. 2022). nanochat's
# own ratio, per *scaling* parameter, is nanochat.sizing.COMPUTE_OPTIMAL_RATIO: the one constant training,
# the planner and the doctor share (`optimal_ratio` below gives either).
CHINCHILLA_TOKENS_PER_PARAM = 20.0


def optimal_ratio(count: str = "scaling") -> float:
    """Compute-optimal tokens per parameter without a fit: sizing.COMPUTE_OPTIMAL_RATIO for nanochat's
    scaling parameters, Chinchilla's ~20 for all parameters."""
    if count == "scaling":
        from nanochat.sizing import COMPUTE_OPTIMAL_RATIO

        return COMPUTE_OPTIMAL_RATIO
    if count == "total":
        return CHINCHILLA_TOKENS_PER_PARAM
    raise ValueError(f"count must be 'scaling' or 'total', got {count!r}")


def ratio_optimum(C, tokens_per_param: float):
    """(N, D) with D = r N and 6ND = C: N = sqrt(C / 6r) (1e23 FLOPs at r = 20: ~29B on ~577B tokens)."""
    N = np.sqrt(np.asarray(C, dtype=float) / (6.0 * tokens_per_param))
    return N, tokens_per_param * N

# ---------------------------------------------------------------------------------------------
# data points


@dataclass
class Points:
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    budget: np.ndarray | None = None  # an explicit per-row budget label to group IsoFLOP slices by
    n_col: str = "N"
    loss_col: str = "loss"

    @property
    def C(self) -> np.ndarray:
        return 6.0 * self.N * self.D

    def __len__(self) -> int:
        return len(self.N)

    def subset(self, idx) -> "Points":
        return Points(self.N[idx], self.D[idx], self.L[idx], None if self.budget is None else self.budget[idx],
                      self.n_col, self.loss_col)


def load_points(path, n_col="scaling_params", loss_col="val_bpb", d_col=None, c_col=None,
                budget_col=None) -> Points:
    """Read (N, D, loss) or (N, C, loss) rows from a CSV. D = C / (6N) when only C is given.

    Rows with an empty or non-numeric value in a needed column (e.g. a failed run) are skipped.
    `budget_col` (e.g. the sweep's `target_flops`) groups IsoFLOP slices exactly instead of by
    bucketing 6ND.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        rows = list(reader)
    if d_col is None and c_col is None:
        d_col = next((c for c in ("tokens", "D", "d") if c in cols), None)
        c_col = next((c for c in ("flops", "C", "c") if c in cols), None) if d_col is None else None
        if d_col is None and c_col is None:
            raise ValueError(f"{path}: name the data column with --d-col (tokens) or --c-col (FLOPs); columns: {cols}")
    need = [n_col, loss_col, d_col or c_col] + ([budget_col] if budget_col else [])
    absent = [c for c in need if c not in cols]
    if absent:
        raise ValueError(f"{path}: column(s) {absent} not found; columns are {cols} (use --n-col/--d-col/--c-col/--loss-col)")
    N, X, L, Bud = [], [], [], []
    for row in rows:
        try:
            vals = [float(row[c]) for c in need]
        except (TypeError, ValueError):
            continue
        if not all(math.isfinite(v) and v > 0 for v in vals):
            continue
        N.append(vals[0])
        L.append(vals[1])
        X.append(vals[2])
        if budget_col:
            Bud.append(vals[3])
    if len(N) == 0:
        raise ValueError(f"{path}: no usable rows (need positive numbers in {need})")
    N, X, L = np.array(N), np.array(X), np.array(L)
    D = X if d_col else X / (6.0 * N)
    return Points(N, D, L, np.array(Bud) if budget_col else None, n_col=n_col, loss_col=loss_col)


# ---------------------------------------------------------------------------------------------
# approach 3: Huber on log-loss over the log-sum-exp parameterisation

# theta = (a, b, e, alpha, beta); Hoffmann et al.'s initialisation grid
_GRID = dict(a=np.arange(0, 30, 5.0), b=np.arange(0, 30, 5.0), e=np.arange(-1, 1.5, 0.5),
             alpha=np.arange(0, 2.5, 0.5), beta=np.arange(0, 2.5, 0.5))
_BOUNDS = [(-20, 80), (-20, 80), (-10, 10), (1e-4, 5.0), (1e-4, 5.0)]


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta, logN, logD, logL, delta):
    """Sum of Huber(log L_pred - log L) and its gradient w.r.t. theta."""
    a, b, e, alpha, beta = theta
    z = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])  # (3, n)
    zmax = z.max(axis=0)
    ez = np.exp(z - zmax)
    s = ez.sum(axis=0)
    pred = zmax + np.log(s)
    w = ez / s  # softmax weights = d pred / d z
    r = pred - logL
    g_r = np.clip(r, -delta, delta)  # Huber'(r)
    grad = np.array([
        (g_r * w[0]).sum(), (g_r * w[1]).sum(), (g_r * w[2]).sum(),
        -(g_r * w[0] * logN).sum(), -(g_r * w[1] * logD).sum(),
    ])
    return _huber(r, delta).sum(), grad


def _grid_objectives(thetas, logN, logD, logL, delta):
    """Objective for many starting points at once: thetas (S, 5) -> (S,)."""
    a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    z1 = a - alpha * logN[None]
    z2 = b - beta * logD[None]
    z3 = np.broadcast_to(e, z1.shape)
    pred = np.logaddexp(np.logaddexp(z1, z2), z3)
    return _huber(pred - logL[None], delta).sum(axis=1)


@contextlib.contextmanager
def single_threaded_blas():
    """Run the enclosed code with OpenBLAS on one thread (this thread only; restored after).

    L-BFGS-B calls BLAS on 5-vectors; with OpenBLAS's thread pool awake on a busy 2-core machine each
    call costs several times more (benchmarks/results/scaling_fit.md: a 45-point fit 2.9 s -> 0.4 s).
    Uses OpenBLAS's per-thread `openblas_set_num_threads_local` (>= 0.3.27) on the libraries numpy/scipy loaded;
    a no-op wherever that is unavailable.
    """
    restore = []
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        paths = set()
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        restore.append((fn, fn(1)))
    try:
        yield
    finally:
        for fn, previous in restore:
            fn(max(previous, 1))


def _lbfgs(theta0, logN, logD, logL, delta):
    from scipy.optimize import minimize

    # The objective is tiny (residuals ~1e-3, squared) so the default tolerances stop far from the
    # optimum; Epoch AI traced part of Chinchilla's mis-fit to exactly that. Scale and tighten.
    scale = 1.0 / (delta * delta)

    def f(th):
        v, g = _objective(th, logN, logD, logL, delta)
        return v * scale, g * scale

    res = minimize(f, theta0, jac=True, method="L-BFGS-B", bounds=_BOUNDS,
                   options=dict(maxiter=5000, ftol=1e-12, gtol=1e-8))
    return res.x, res.fun / scale


@dataclass
class Approach3Fit:
    law: LossLaw
    objective: float
    n_points: int
    intervals: dict = field(default_factory=dict)  # name -> (lo, hi) from the bootstrap
    n_bootstrap: int = 0


def fit_approach3(points: Points, delta: float = 1e-3, n_starts: int = 8, param_count: str = "scaling",
                  loss_unit: str = "bpb", _extra_starts=()) -> Approach3Fit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta. The whole grid is scored in one vectorised pass and
    L-BFGS runs from its `n_starts` best points (on the test data with 1% noise, 200 starts reach
    the same optimum as 8, to 1e-9 in alpha and beta).
    BLAS is kept to one thread meanwhile (see `single_threaded_blas`)."""
    if len(points) < 5:
        raise ValueError(f"approach 3 has 5 free constants; got only {len(points)} data points")
    logN, logD, logL = np.log(points.N), np.log(points.D), np.log(points.L)
    mesh = np.stack(np.meshgrid(*_GRID.values(), indexing="ij"), axis=-1).reshape(-1, 5)
    mesh[:, 3:] = np.maximum(mesh[:, 3:], _BOUNDS[3][0])
    scores = _grid_objectives(mesh, logN, logD, logL, delta)
    starts = list(mesh[np.argsort(scores)[:n_starts]]) + [np.asarray(s) for s in _extra_starts]
    import scipy.optimize  # noqa: F401 -- load scipy's BLAS before limiting its threads

    best_theta, best_val = None, np.inf
    with single_threaded_blas():
        for th0 in starts:
            th, val = _lbfgs(th0, logN, logD, logL, delta)
            if val < best_val:
                best_theta, best_val = th, val
    a, b, e, alpha, beta = best_theta
    law = LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                  beta=float(beta), param_count=param_count, loss_unit=loss_unit)
    return Approach3Fit(law=law, objective=float(best_val), n_points=len(points))


def law_theta(law: LossLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap_approach3(points: Points, n_boot: int = 100, ci: float = 0.95, seed: int = 0,
                        delta: float = 1e-3, budgets=(), fit: Approach3Fit | None = None,
                        progress=None) -> Approach3Fit:
    """Percentile bootstrap: resample rows with replacement, refit, take the (1-ci)/2 quantiles.

    Refits start from the full-data optimum plus a few grid points (a full grid per resample is
    slower and lands in the same basin). Intervals also cover N*(C) for each C in `budgets`.
    """
    fit = fit or fit_approach3(points, delta=delta, param_count=points_param_count(points),
                               loss_unit=points_loss_unit(points))
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n_boot):
        idx = rng.integers(0, len(points), len(points))
        if len(np.unique(idx)) < 5:
            continue
        f = fit_approach3(points.subset(idx), delta=delta, n_starts=2, _extra_starts=[law_theta(fit.law)])
        L = f.law
        row = dict(E=L.E, A=L.A, B=L.B, alpha=L.alpha, beta=L.beta, a=L.n_exponent)
        for C in budgets:
            row[f"N_opt@{C:.3g}"] = float(L.compute_optimal(C)[0])
        samples.append(row)
        if progress:
            progress(i + 1, n_boot)
    q = (1 - ci) / 2
    intervals = {k: (float(np.quantile([s[k] for s in samples], q)), float(np.quantile([s[k] for s in samples], 1 - q)))
                 for k in (samples[0] if samples else {})}
    return Approach3Fit(law=fit.law, objective=fit.objective, n_points=fit.n_points, intervals=intervals,
                        n_bootstrap=len(samples))


def points_param_count(points: Points) -> str:
    """Guess the counting convention from the column name: nanochat's sweep writes `scaling_params`."""
    return "scaling" if "scaling" in points.n_col.lower() else "total"


def points_loss_unit(points: Points) -> str:
    return "bpb" if "bpb" in points.loss_col.lower() else "nats"


# ---------------------------------------------------------------------------------------------
# approach 2: IsoFLOP parabolas


def group_budgets(C: np.ndarray, budget: np.ndarray | None = None, bucket_dex: float = 0.05) -> np.ndarray:
    """Integer slice label per row: equal `budget` values, or 6ND within `bucket_dex` decades of the
    smallest budget in the bucket (runs aimed at the same budget land a little apart)."""
    key = np.log10(budget if budget is not None else C)
    order = np.argsort(key)
    labels = np.empty(len(key), dtype=int)
    label, start = -1, -np.inf
    for i in order:
        if key[i] - start > (bucket_dex if budget is None else 1e-9):
            label, start = label + 1, key[i]
        labels[i] = label
    return labels


@dataclass
class IsoFlopFit:
    slices: list  # dicts: C, n_points, N_opt, D_opt, loss_opt, in_range
    a: float | None = None  # N* = kN C^a
    kN: float | None = None
    b: float | None = None  # D* = kD C^b
    kD: float | None = None

    def compute_optimal(self, C):
        if self.a is None:
            raise ValueError("approach 2 needs at least two IsoFLOP slices with a minimum")
        C = np.asarray(C, dtype=float)
        return self.kN * C**self.a, self.kD * C**self.b


def fit_approach2(points: Points, bucket_dex: float = 0.05, min_points: int = 3,
                  use_out_of_range: bool = False) -> IsoFlopFit:
    """Per-budget parabola of loss vs ln N; N*(C), D*(C) power laws fitted in log space.

    A slice's C is the geometric mean of its rows' 6ND. Slices whose minimum falls outside the sampled
    N range are reported but (by default) left out of the power laws: an extrapolated vertex is
    mostly the curvature's guess.
    """
    labels = group_budgets(points.C, points.budget, bucket_dex)
    slices = []
    for lab in np.unique(labels):
        m = labels == lab
        x, y = np.log(points.N[m]), points.L[m]
        C = float(np.exp(np.log(points.C[m]).mean()))
        s = dict(C=C, n_points=int(m.sum()), N_opt=None, D_opt=None, loss_opt=None, in_range=False)
        if len(np.unique(x)) >= min_points:
            c2, c1, c0 = np.polyfit(x, y, 2)
            if c2 > 0:
                xo = -c1 / (2 * c2)
                s.update(N_opt=float(np.exp(xo)), D_opt=float(C / (6 * np.exp(xo))),
                         loss_opt=float(c0 + c1 * xo + c2 * xo * xo), in_range=bool(x.min() <= xo <= x.max()))
        slices.append(s)
    fit = IsoFlopFit(slices=slices)
    use = [s for s in slices if s["N_opt"] is not None and (s["in_range"] or use_out_of_range)]
    if len(use) >= 2 and len({round(math.log10(s["C"]), 6) for s in use}) >= 2:
        lc = np.log([s["C"] for s in use])
        fit.a, lkN = np.polyfit(lc, np.log([s["N_opt"] for s in use]), 1)
        fit.b, lkD = np.polyfit(lc, np.log([s["D_opt"] for s in use]), 1)
        fit.a, fit.b, fit.kN, fit.kD = float(fit.a), float(fit.b), float(np.exp(lkN)), float(np.exp(lkD))
    return fit


# ---------------------------------------------------------------------------------------------
# inference-aware optimum (Sardana et al., arXiv 2401.00448)


def tokens_for_loss(law: LossLaw, N, loss: float):
    """D such that L(N, D) = loss; inf where N alone cannot reach it."""
    N = np.asarray(N, dtype=float)
    gap = loss - law.E - law.A / N**law.alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap > 0, (law.B / np.where(gap > 0, gap, 1.0)) ** (1.0 / law.beta), np.inf)


def lifetime_flops(N, D, inference_tokens):
    """Training (6ND) plus inference (2N per token served) FLOPs."""
    return 6.0 * N * D + 2.0 * N * inference_tokens


def inference_optimal(law: LossLaw, loss: float, inference_tokens: float):
    """(N, D) minimising 6ND + 2N D_inf subject to L(N, D) = loss."""
    if loss <= law.E:
        raise ValueError(f"target loss {loss:.4g} is at or below the law's floor E={law.E:.4g}")
    from scipy.optimize import minimize_scalar

    u_min = math.log(law.A / (loss - law.E)) / law.alpha  # ln N below which the loss is unreachable

    def log_cost(u):
        N = np.exp(u)
        D = tokens_for_loss(law, N, loss)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(np.isfinite(D), np.log(lifetime_flops(N, D, inference_tokens)), 1e300)

    us = u_min + np.geomspace(1e-6, 40, 800)  # coarse bracket, then Brent inside it
    costs = log_cost(us)
    i = int(np.argmin(costs))
    lo, hi = us[max(i - 1, 0)], us[min(i + 1, len(us) - 1)]
    res = minimize_scalar(lambda u: float(log_cost(u)), bounds=(lo, hi), method="bounded", options=dict(xatol=1e-10))
    N = math.exp(res.x if res.fun <= costs[i] else us[i])
    return N, float(tokens_for_loss(law, N, loss))


def inference_plan(law: LossLaw, C: float, inference_tokens: float) -> dict:
    """Chinchilla optimum at training budget C vs the inference-aware choice at the same loss."""
    N0, D0 = (float(v) for v in law.compute_optimal(C))
    loss = float(law.loss(N0, D0))
    N1, D1 = inference_optimal(law, loss, inference_tokens) if inference_tokens > 0 else (N0, D0)
    cost0, cost1 = lifetime_flops(N0, D0, inference_tokens), lifetime_flops(N1, D1, inference_tokens)
    return dict(loss=loss, chinchilla=dict(N=N0, D=D0, train_flops=6 * N0 * D0, total_flops=cost0),
                inference_aware=dict(N=N1, D=D1, train_flops=6 * N1 * D1, total_flops=cost1),
                saving=1.0 - cost1 / cost0)


def breakeven_inference_tokens(law: LossLaw, C: float, saving: float = 0.10) -> float | None:
    """Smallest inference volume D_inf at which the inference-aware model (same loss as the Chinchilla
    optimum for training budget C) has a lifetime cost at least `saving` lower than the Chinchilla
    model's. None if the saving is never reached (it saturates as D_inf grows)."""
    D0 = float(law.compute_optimal(C)[1])

    def s(log_dinf):
        return inference_plan(law, C, math.exp(log_dinf))["saving"] - saving

    lo, hi = math.log(D0 * 1e-4), math.log(D0 * 1e6)
    if s(hi) < 0:
        return None
    if s(lo) >= 0:
        return math.exp(lo)
    for _ in range(45):  # bisection: the saving grows monotonically with D_inf
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if s(mid) < 0 else (lo, mid)
    return math.exp(hi)


# ---------------------------------------------------------------------------------------------
# from a parameter count to nanochat's depth dial


def depth_for_params(N: float, count: str = "scaling", depths=range(2, 65), **shape) -> tuple[int, int]:
    """The depth whose `count` ("scaling" or "total") parameter count is closest to N in log space.

    `shape` goes to sizing.model_config (aspect_ratio, head_dim, max_seq_len, vocab_size, ...).
    Returns (depth, that depth's count).
    """
    from nanochat.sizing import count_params, model_config

    if count not in ("scaling", "total"):
        raise ValueError(f"count must be 'scaling' or 'total', got {count!r}")
    best = min(((abs(math.log(count_params(model_config(d, **shape))[count] / N)), d) for d in depths))
    d = best[1]
    return d, int(count_params(model_config(d, **shape))[count])


# ---------------------------------------------------------------------------------------------
# plots


def plot_fit(points: Points, law: LossLaw | None, iso: IsoFlopFit | None, out_dir) -> list[Path]:
    """IsoFLOP curves, the fitted frontier and loss contours, as PNGs in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    labels = group_budgets(points.C, points.budget)
    cmap = plt.get_cmap("viridis")
    nlab = labels.max() + 1

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for lab in range(nlab):
        m = labels == lab
        color = cmap(lab / max(nlab - 1, 1))
        C = float(np.exp(np.log(points.C[m]).mean()))
        order = np.argsort(points.N[m])
        ax.plot(points.N[m][order], points.L[m][order], "o", color=color, label=f"C={C:.2g}")
        if law is not None:
            Ns = np.geomspace(points.N[m].min() / 1.5, points.N[m].max() * 1.5, 100)
            ax.plot(Ns, law.loss(Ns, C / (6 * Ns)), "-", color=color, alpha=0.6)
    if iso is not None:
        for s in iso.slices:
            if s["N_opt"] is not None:
                ax.plot(s["N_opt"], s["loss_opt"], "kx")
    ax.set_xscale("log")
    ax.set_xlabel(f"N ({points.n_col})")
    ax.set_ylabel(points.loss_col)
    ax.set_title("IsoFLOP slices (x: approach-2 minima, lines: approach-3 law)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "isoflop.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    Cs = np.geomspace(points.C.min() / 3, points.C.max() * 30, 100)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(points.C, points.N, s=10, c="0.7", label="runs")
    if law is not None:
        ax.plot(Cs, law.compute_optimal(Cs)[0], "-", label=f"approach 3: N* ~ C^{law.n_exponent:.3f}")
    if iso is not None and iso.a is not None:
        ax.plot(Cs, iso.compute_optimal(Cs)[0], "--", label=f"approach 2: N* ~ C^{iso.a:.3f}")
        for s in iso.slices:
            if s["N_opt"] is not None:
                ax.plot(s["C"], s["N_opt"], "kx")
    ax.set(xscale="log", yscale="log", xlabel="C = 6ND (FLOPs)", ylabel="N*")
    ax.set_title("compute-optimal frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "frontier.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    if law is not None:
        Ns = np.geomspace(points.N.min() / 3, points.N.max() * 10, 80)
        Ds = np.geomspace(points.D.min() / 3, points.D.max() * 10, 80)
        NN, DD = np.meshgrid(Ns, Ds)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        levels = np.linspace(points.L.min() * 0.97, points.L.max() * 1.03, 12)  # the measured range
        cs = ax.contour(NN, DD, law.loss(NN, DD), levels=levels, cmap="viridis")
        ax.clabel(cs, fontsize=6)
        for C in np.geomspace(points.C.min(), points.C.max(), 4):
            ax.plot(Ns, C / (6 * Ns), ":", color="0.6", lw=0.8)
        Nf, Df = law.compute_optimal(Cs)
        ax.plot(Nf, Df, "r-", label="compute-optimal")
        ax.scatter(points.N, points.D, s=8, c="k", label="runs")
        ax.set(xscale="log", yscale="log", xlim=(Ns[0], Ns[-1]), ylim=(Ds[0], Ds[-1]), xlabel="N",
               ylabel="D (tokens)")
        ax.set_title("fitted loss contours (dotted: IsoFLOP lines)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "contours.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------
# one run's loss curve: L(D) = E + B D^-beta - C S2, with a block bootstrap (the run doctor's loss_curve)

def fit_data_curve(D: np.ndarray, L: np.ndarray, S2: np.ndarray | None = None, start=None) -> dict:
    """Fit L = E + B D^-beta - C S2 by robust least squares (soft-L1). With S2 None (or all zero) C = 0:
    the plain data curve. D is the tokens trained, or with an LR schedule the LR-weighted tokens S1 (see
    `check_loss_curve`). Returns E, B, beta, C and whether E sits at a bound of its range [0, min L].
    `start` (a previous fit) replaces the multi-start search."""
    from scipy.optimize import least_squares

    logD = np.log(D)
    Lmin = float(L.min())
    anneal = S2 is not None and float(np.max(S2)) > 0
    s2 = S2 if anneal else np.zeros_like(L)

    def resid(p):
        E, logB, beta = p[:3]
        c = p[3] if anneal else 0.0
        return (E + np.exp(logB - beta * logD) - c * s2) - L

    def jac(p):
        _, logB, beta = p[:3]
        t = np.exp(logB - beta * logD)
        cols = [np.ones_like(L), t, -logD * t] + ([-s2] if anneal else [])
        return np.stack(cols, axis=1)

    lo, hi = [0.0, -50, 1e-3] + ([0.0] if anneal else []), [Lmin, 200, 3.0] + ([10.0] if anneal else [])
    # the floor can sit at the latest level (a plateau) but not below zero: only E -> 0 is a bound problem
    if start is not None:
        x0s = [[start["E"], math.log(start["B"]), start["beta"]] + ([start.get("C", 0.0)] if anneal else [])]
    else:
        x0s = []
        for beta0 in (0.1, 0.3, 0.6):
            E0 = 0.8 * Lmin
            x0s.append([E0, math.log(max(L[0] - E0, 1e-6)) + beta0 * logD[0], beta0] + ([0.01] if anneal else []))
    best = None
    for x0 in x0s:
        x0 = [min(max(v, a + 1e-9 * (b - a)), b - 1e-9 * (b - a)) for v, a, b in zip(x0, lo, hi)]
        r = least_squares(resid, x0, jac=jac, loss="soft_l1", f_scale=0.01 * Lmin, bounds=(lo, hi),
                          max_nfev=None if start is None else 100)
        if best is None or r.cost < best.cost:
            best = r
    E, logB, beta = best.x[:3]
    return dict(E=float(E), B=float(math.exp(logB)), beta=float(beta), C=float(best.x[3]) if anneal else 0.0,
                E_at_bound=bool(E <= 0.01 * Lmin))


def data_curve(fit):
    """The constant-LR curve E + B D^-beta of a fit."""
    return lambda d: fit["E"] + fit["B"] * np.asarray(d, dtype=float) ** -fit["beta"]


def bootstrap_data_curve(D, L, fit, S2=None, n_boot=100, seed=0, ci=0.9, predict=()) -> dict:
    """Moving-block bootstrap of the fit's residuals (losses are autocorrelated): refit each resample and
    return (lo, hi) percentile intervals of E, beta and of each `predict(fit) -> float` in `predict`."""
    rng = np.random.default_rng(seed)
    s2 = np.zeros_like(L) if S2 is None else S2
    fitted = data_curve(fit)(D) - fit["C"] * s2
    res = L - fitted
    n = len(L)
    block = max(3, n // 10)
    samples = []
    for _ in range(n_boot):
        starts = rng.integers(0, n - block + 1, size=n // block + 1)
        r = np.concatenate([res[s:s + block] for s in starts])[:n]
        f = fit_data_curve(D, fitted + r, S2, start=fit)
        samples.append([f["E"], f["beta"]] + [float(p(f)) for p in predict])
    q = (1 - ci) / 2
    arr = np.array(samples)
    lo, hi = np.quantile(arr, q, axis=0), np.quantile(arr, 1 - q, axis=0)
    return dict(E=(float(lo[0]), float(hi[0])), beta=(float(lo[1]), float(hi[1])), n_boot=n_boot, ci=ci,
                at=[(float(a), float(b)) for a, b in zip(lo[2:], hi[2:])])


def annealing_area(lr: np.ndarray, decay: float = 0.999) -> np.ndarray:
    """S2 of Tissue et al. 2024 (arXiv 2408.11029), per step: m_i = decay m_{i-1} + (lr_{i-1} - lr_i),
    S2_i = sum of m up to i. The loss drop an LR warmdown buys is ~ proportional to S2 (their
    L = L0 + A S1^-alpha - C S2). LR as a multiplier of its peak; warmup steps (rising LR) count zero."""
    m, s, out = 0.0, 0.0, np.zeros(len(lr))
    for i in range(1, len(lr)):
        m = decay * m + max(lr[i - 1] - lr[i], 0.0)
        s += m
        out[i] = s
    return out
