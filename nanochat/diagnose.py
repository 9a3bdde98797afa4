"""The run doctor: read a run folder (metrics.jsonl + run.json) and say, with numbers, what is off
and what to change.

Each check returns a `Finding` with a status:
  ok    nothing to change          warn  something to change (the advice says what)
  info  worth knowing, not wrong   skip  the run lacks what the check needs (the summary says what)

Checks: declared vs instantiated parameter count; tokens:params vs the compute-optimal ratio;
MFU vs what the GPU should reach; validation below training loss; loss spikes; a plateau test
(fits loss(D) = E + B D^-beta and predicts 1x / 2x / 10x the planned tokens); schedule position.
Every field of the run files is optional; a check without its inputs skips rather than guesses.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nanochat.scaling import OPTIMAL_RATIO, single_threaded_blas

# what a well-tuned bf16 run of this architecture reaches on H100-class GPUs (REFERENCE section 9:
# reference d12 ~41%, d18 ~46%, d24 ~50%); below WARN_MFU something is leaving the GPU idle
EXPECTED_MFU = (0.40, 0.50)
WARN_MFU = 0.30


@dataclass
class Run:
    path: Path
    metrics: list[dict]
    info: dict  # run.json, {} when absent
    problems: list[str] = field(default_factory=list)  # unreadable lines, missing files

    @property
    def args(self) -> dict:
        return self.info.get("args") or {}

    @property
    def sizing(self) -> dict:
        return self.info.get("sizing") or {}

    @property
    def env(self) -> dict:
        return self.info.get("env") or {}

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, value) over the metric lines that carry a numeric `key` (and `x`)."""
        xs, vs = [], []
        for m in self.metrics:
            v, s = m.get(key), m.get(x)
            if isinstance(v, (int, float)) and isinstance(s, (int, float)):
                xs.append(float(s))
                vs.append(float(v))
        return np.array(xs), np.array(vs)

    def last(self, key: str):
        for m in reversed(self.metrics):
            if m.get(key) is not None:
                return m[key]
        return None


def load_run(run_dir) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir} (expected <base>/base_checkpoints/<model_tag>/)")
    problems, metrics, info = [], [], {}
    mpath, ipath = run_dir / "metrics.jsonl", run_dir / "run.json"
    if mpath.is_file():
        for i, line in enumerate(mpath.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                problems.append(f"metrics.jsonl line {i} is not JSON (a run killed mid-write?); skipped")
                continue
            if isinstance(obj, dict):
                metrics.append(obj)
    else:
        problems.append("no metrics.jsonl")
    if ipath.is_file():
        try:
            info = json.loads(ipath.read_text())
        except json.JSONDecodeError as e:
            problems.append(f"run.json is not valid JSON ({e}); metadata checks skipped")
        if not isinstance(info, dict):
            problems.append("run.json is not a JSON object; metadata checks skipped")
            info = {}
    else:
        problems.append("no run.json")
    if not mpath.is_file() and not ipath.is_file():
        raise FileNotFoundError(f"{run_dir} holds neither metrics.jsonl nor run.json: is it a run folder?")
    metrics.sort(key=lambda m: m.get("step", 0) if isinstance(m.get("step"), (int, float)) else 0)
    return Run(run_dir, metrics, info, problems)


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | info | skip
    summary: str
    numbers: dict = field(default_factory=dict)
    advice: str = ""


def _num(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _fmt(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.3g}{s}"
    return f"{n:.3g}"


def _gpt_config(model_config: dict):
    """GPTConfig from run.json's model_config, ignoring keys this version does not know."""
    import dataclasses

    from nanochat.gpt import GPTConfig

    known = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in model_config.items() if k in known})


def _params(run: Run) -> tuple[float | None, float | None]:
    """(scaling, total) parameters as instantiated, else from the config's closed form."""
    s, t = _num(run.sizing.get("scaling_params")), _num(run.sizing.get("num_params"))
    if (s is None or t is None) and run.info.get("model_config"):
        try:
            from nanochat.sizing import count_params

            c = count_params(_gpt_config(run.info["model_config"]))
            s, t = s or float(c["scaling"]), t or float(c["total"])
        except Exception:  # noqa: BLE001 -- a config this version cannot build: leave unknown
            pass
    return s, t


def _tokens_trained(run: Run) -> float | None:
    return _num(run.last("tokens")) or _num(run.sizing.get("total_tokens"))


# ---------------------------------------------------------------------------------------------
# the checks

_SIZE_RE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([kmb])(?![a-z])", re.IGNORECASE)


def _meta_counts(model_config: dict) -> dict:
    """Parameter counts of the model as `GPT` actually builds it, on the meta device (no memory)."""
    import torch

    from nanochat.gpt import GPT

    with torch.device("meta"):
        return GPT(_gpt_config(model_config)).num_params()


def _depth_dial_config(run: Run, mc: dict):
    """The config the depth dial gives for this run's flags (vocab from the recorded config)."""
    from nanochat.sizing import model_config

    a = run.args
    kw = {k: a[k] for k in ("aspect_ratio", "head_dim", "max_seq_len", "n_kv_head", "window_pattern",
                            "value_embeds", "resid_scalars") if a.get(k) is not None}
    return model_config(int(a["depth"]), vocab_size=mc.get("vocab_size", 32768), **kw)


def check_param_count(run: Run) -> Finding:
    """Declared vs instantiated parameters. Declared: the closed form `sizing.count_params` of the
    recorded config, of the config the depth dial gives for the run's flags, and any size in the model
    tag ("gpt-124m"). Instantiated: `GPT(config)` built on the meta device, and the count run.json
    recorded. A config typo can make these differ 3-4x (REFERENCE section 10)."""
    name = "param_count"
    rec_total, rec_scaling = _num(run.sizing.get("num_params")), _num(run.sizing.get("scaling_params"))
    mc = run.info.get("model_config")
    nums, issues = {"recorded_total": rec_total, "recorded_scaling": rec_scaling}, []
    if mc:
        from nanochat.sizing import count_params

        try:
            c = count_params(_gpt_config(mc))
            nums.update(declared_total=c["total"], declared_scaling=c["scaling"])
        except Exception as e:  # noqa: BLE001 -- a config this version cannot build
            c = None
            nums["config_error"] = f"{type(e).__name__}: {e}"
        try:
            inst = _meta_counts(mc)
            nums.update(instantiated_total=inst["total"], instantiated_scaling=inst["scaling"])
        except Exception as e:  # noqa: BLE001
            inst = None
            nums["instantiate_error"] = f"{type(e).__name__}: {e}"
        for kind in ("total", "scaling"):
            pairs = [("closed-form", c and c[kind]), ("instantiated", inst and inst[kind]),
                     ("recorded in run.json", nums[f"recorded_{kind}"])]
            pairs = [(label, v) for label, v in pairs if v]
            ref_label, ref = pairs[0] if pairs else (None, None)
            for label, v in pairs[1:]:
                if abs(v - ref) > 0.01 * ref:
                    issues.append(f"{ref_label} {kind} count {_fmt(ref)} != {label} {_fmt(v)} ({v / ref:.2f}x)")
        if isinstance(run.args.get("depth"), int) and run.args["depth"] > 0:
            try:
                dial = count_params(_depth_dial_config(run, mc))["total"]
                nums["depth_dial_total"] = dial
                if c and abs(dial - c["total"]) > 0.01 * dial:
                    issues.append(f"--depth={run.args['depth']} implies {_fmt(dial)} parameters but the config "
                                  f"has {_fmt(c['total'])} ({c['total'] / dial:.2f}x; n_layer={mc.get('n_layer')}, "
                                  f"n_embd={mc.get('n_embd')})")
            except Exception:  # noqa: BLE001 -- flags this version does not understand
                pass
    tag = str(run.args.get("model_tag") or run.path.name)
    m = _SIZE_RE.search(tag)
    actual = nums.get("instantiated_total") or rec_total or nums.get("declared_total")
    if m:
        declared = float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
        nums["tag_declared"] = declared
        if actual and not (1 / 1.5 <= actual / declared <= 1.5):
            issues.append(f"the tag {tag!r} declares ~{_fmt(declared)} parameters but the model has "
                          f"{_fmt(actual)} ({actual / declared:.2f}x)")
    if actual is None:
        return Finding(name, "skip", "run.json has neither model_config nor sizing.num_params", nums)
    if issues:
        return Finding(name, "warn", "; ".join(issues), nums,
                       "Check n_layer / n_embd / n_head / vocab_size in the config against what you meant "
                       "(sizing.model_config(depth) gives the intended shape); fix before comparing runs.")
    scaling = nums.get("instantiated_scaling") or rec_scaling
    return Finding(name, "ok", f"parameter count consistent: {_fmt(actual)} total"
                   + (f", {_fmt(scaling)} scaling" if scaling else ""), nums)


def check_tokens_ratio(run: Run, law=None) -> Finding:
    """Tokens per parameter vs the compute-optimal ratio: from a fitted `LossLaw` at this run's compute
    when given (in the law's parameter counting), else the reference's ~10.5 per scaling parameter."""
    name = "tokens_ratio"
    scaling, total = _params(run)
    so_far = _tokens_trained(run)
    planned = _num(run.sizing.get("total_tokens"))
    tokens = planned or so_far  # judge the plan; an unfinished run is reported by the schedule check
    count = law.param_count if law is not None else "scaling"
    n_run = scaling if count == "scaling" else total
    if not n_run or not tokens:
        return Finding(name, "skip", f"needs the {count}-parameter count and the tokens trained")
    C = 6 * n_run * tokens  # this run's compute, C = 6ND in the chosen counting
    if law is not None:
        n_opt, d_opt = (float(v) for v in law.compute_optimal(C))
        opt, source = d_opt / n_opt, "the fitted law's optimum at this compute"
    else:
        opt, source = OPTIMAL_RATIO[count], "the reference's fitted optimum"
        n_opt = math.sqrt(C / (6 * opt))
    ratio = tokens / n_run
    nums = dict(tokens=tokens, tokens_so_far=so_far, planned_tokens=planned, param_count=count, params=n_run,
                tokens_per_param=ratio, optimal_tokens_per_param=opt, optimal_from=source,
                multiple_of_optimal=ratio / opt, scaling_params=scaling, total_params=total,
                compute_6ND=C, optimal_params=n_opt, optimal_tokens=opt * n_opt)
    if scaling:
        nums["tokens_per_scaling_param"] = tokens / scaling
    if total:
        nums["tokens_per_total_param"] = tokens / total
    try:
        from nanochat.scaling import depth_for_params

        nums["optimal_depth"], _ = depth_for_params(n_opt, count=count, **_shape_kwargs(run))
    except Exception:  # noqa: BLE001
        pass
    where = f"{ratio:.3g} tokens per {count} parameter = {ratio / opt:.2g}x the compute-optimal ~{opt:.3g} ({source})"
    if planned and so_far and so_far < planned * 0.999:
        where += f" as planned ({so_far / n_run:.3g} so far)"
    if total and count == "scaling":
        where += f"; {tokens / total:.3g} per total parameter (Chinchilla counting optimum ~20)"
    alt = (f"the compute-optimal model for these {C:.3g} FLOPs has ~{_fmt(n_opt)} {count} params"
           + (f" (depth {nums['optimal_depth']})" if "optimal_depth" in nums else "")
           + f" trained on ~{_fmt(opt * n_opt)} tokens")
    if ratio > 3 * opt:
        return Finding(name, "warn", f"over-trained for its size: {where}", nums,
                       "Loss keeps falling past the compute-optimal point, with power-law diminishing returns (see "
                       f"the plateau check): that is expected, not a bug. For the lowest loss per FLOP, {alt}. "
                       "Staying small is right if the model will serve many tokens (scripts/plan.py --inference-tokens).")
    if ratio < opt / 3:
        return Finding(name, "warn", f"under-trained for its size: {where}", nums,
                       f"The model is large for its data: {alt}; or train this one longer "
                       "(--target-param-data-ratio).")
    return Finding(name, "ok", where, nums)


def _shape_kwargs(run: Run) -> dict:
    mc = run.info.get("model_config") or {}
    kw = {}
    if mc.get("n_embd") and mc.get("n_layer") and mc.get("n_head"):
        kw["head_dim"] = mc["n_embd"] // mc["n_head"]
    for k_in, k_out in (("vocab_size", "vocab_size"), ("sequence_len", "max_seq_len")):
        if mc.get(k_in):
            kw[k_out] = mc[k_in]
    if run.args.get("aspect_ratio"):
        kw["aspect_ratio"] = run.args["aspect_ratio"]
    return kw


def check_mfu(run: Run) -> Finding:
    name = "mfu"
    device = str(run.env.get("device_name") or run.args.get("device_type") or "")
    steps, mfu = run.series("mfu")
    if device.lower().startswith(("cpu", "mps")) or (not run.env.get("peak_flops") and len(mfu) == 0):
        return Finding(name, "skip", f"MFU is not measured on {device or 'this device'} (no known peak FLOP/s); "
                       "judge CPU speed by tok/s instead", {"device": device})
    if len(mfu) == 0:
        return Finding(name, "skip", "no mfu values in metrics.jsonl", {"device": device})
    skip = max(5, len(mfu) // 10)  # compile and warm-up steps are not representative
    body = mfu[skip:] if len(mfu) > skip + 5 else mfu
    med = float(np.median(body))  # base_train logs MFU as a fraction of peak
    dtype = str(run.env.get("dtype", ""))
    nums = dict(device=device, median_mfu=med, expected_low=EXPECTED_MFU[0], expected_high=EXPECTED_MFU[1],
                steps_used=len(body), dtype=dtype)
    tps = run.series("tok_per_sec")[1]
    if len(tps):
        nums["median_tok_per_sec"] = float(np.median(tps[skip:] if len(tps) > skip + 5 else tps))
    if med < WARN_MFU:
        hint = ("the run is in fp32: use bf16 (--dtype bfloat16) on SM80+ GPUs; " if "32" in dtype else "")
        return Finding(name, "warn", f"median MFU {med:.1%} on {device}; bf16 runs of this size reach "
                       f"~{EXPECTED_MFU[0]:.0%}-{EXPECTED_MFU[1]:.0%} on H100-class GPUs", nums,
                       hint + "make sure torch.compile is on, raise --device-batch-size to fill memory (fewer "
                       "gradient-accumulation passes), check the data loader keeps up (dt spikes), and evaluate less often.")
    return Finding(name, "ok", f"median MFU {med:.1%} on {device}", nums)


def _bytes_per_token(run: Run) -> float | None:
    for d in (run.info, run.sizing, run.info.get("eval") or {}, run.info.get("data") or {}):
        for k in ("bytes_per_token", "val_bytes_per_token"):
            if _num(d.get(k)):
                return float(d[k])
    return _num(run.last("bytes_per_token"))


def check_val_vs_train(run: Run, window: int = 20, tolerance: float = 0.02) -> Finding:
    """Validation loss below training loss on single-epoch data means the two are not measured alike.

    Compared in nats per token: val_loss when logged, else val_bpb * ln2 * (bytes per token). Training
    loss: a quadratic (a line below 8 points) fitted to raw_loss (not the EMA, which lags high) over
    the `window` steps ending at the eval step, read at the next step. The loss logged at step t
    comes from the weights before update t, while the eval at step s sees the weights after update
    s, i.e. those of step s + 1; early in a run, when the loss falls fast, a plain window mean sits
    well above the evaluated model and flags a healthy run. Without bytes/token the units differ and
    only the val_bpb trend is checked.
    """
    name = "val_vs_train"
    dropout = _num(run.args.get("dropout")) or _num((run.info.get("model_config") or {}).get("dropout"))
    ev_steps, val_nats = run.series("val_loss")
    how = "val_loss"
    if len(val_nats) == 0:
        ev_steps, bpb = run.series("val_bpb")
        bpt = _bytes_per_token(run)
        if len(bpb) and bpt:
            val_nats, how = bpb * math.log(2) * bpt, f"val_bpb x ln2 x {bpt:.3g} bytes/token"
    tr_steps, tr = run.series("raw_loss")
    if len(tr) == 0:
        tr_steps, tr = run.series("loss")
    nums = dict(dropout=dropout)
    drop_note = (f"dropout={dropout:g} is on: on a single-epoch corpus it only costs capacity; set it to 0. "
                 if dropout else "")
    if len(val_nats) and len(tr):
        gaps = []
        for s, v in zip(ev_steps, val_nats):
            m = (tr_steps <= s) & (tr_steps > s - window)
            if m.sum() >= 5:  # quadratic with enough points: early losses curve (convex) within a window
                coef = np.polyfit(tr_steps[m].astype(float) - s, tr[m].astype(float), 2 if m.sum() >= 8 else 1)
                t = float(np.polyval(coef, 1.0))
            elif m.sum() >= 1:
                t = float(tr[m].mean())
            else:
                continue
            gaps.append((s, v, t, (v - t) / t))
        if gaps:
            s, v, t, g = gaps[-1]
            nums.update(step=s, val_nats=v, train_nats=t, relative_gap=g, val_from=how,
                        evals_below=sum(x[3] < -tolerance for x in gaps), evals=len(gaps))
            if g < -tolerance:
                return Finding(name, "warn", f"validation loss {v:.4f} is {-g:.1%} below training loss {t:.4f} "
                               f"nats/token at step {int(s)}", nums,
                               drop_note + ("Otherwise t" if drop_note else "T") + "rain and eval measure different "
                               "things: check that the train loss has no extra terms (z-loss, aux losses), both use the same sequence length and "
                               "no dropout at eval, and that the validation shard does not overlap training data.")
            status = "warn" if dropout else "ok"
            return Finding(name, status, f"validation {v:.4f} vs training {t:.4f} nats/token ({g:+.1%}) at step {int(s)}",
                           nums, drop_note)
    ev_steps, bpb = run.series("val_bpb")
    if len(bpb) >= 3:
        best = float(bpb.min())
        nums.update(val_bpb_first=float(bpb[0]), val_bpb_best=best, val_bpb_last=float(bpb[-1]))
        if bpb[-1] > best * 1.01:
            return Finding(name, "warn", f"val bpb rose from its best {best:.4f} to {bpb[-1]:.4f}", nums,
                           drop_note + "Validation getting worse while training continues means repeated data "
                           "(epochs over a small corpus) or train/val leakage; get more data or stop earlier.")
        return Finding(name, "warn" if dropout else "info",
                       "val bpb falls steadily; no bytes-per-token figure, so val (bits/byte) and train "
                       "(nats/token) cannot be compared directly", nums, drop_note)
    if dropout:
        return Finding(name, "warn", f"dropout={dropout:g}", nums, drop_note)
    return Finding(name, "skip", "needs val_loss or val_bpb (+ bytes per token) and a training loss", nums)


def find_spikes(x: np.ndarray, window: int = 50, k: float = 6.0, min_rel: float = 0.02) -> list[int]:
    """Indices where x exceeds its trailing rolling median by more than k robust sigmas (1.4826 MAD)
    and by at least `min_rel` relative. A trailing window does not flag the fast early descent."""
    x = np.asarray(x, dtype=float)
    start = min(10, window)
    if len(x) <= start:
        return []
    # trailing windows x[max(0, i-window):i] for every i >= start, padded with NaN at the front
    padded = np.concatenate([np.full(window, np.nan), x])
    wins = np.lib.stride_tricks.sliding_window_view(padded, window)[start:len(x)]  # (n - start, window)
    wins = np.where(np.isfinite(wins), wins, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows at the very start
        med = np.nanmedian(wins, axis=1)
        mad = np.nanmedian(np.abs(wins - med[:, None]), axis=1) * 1.4826
    enough = np.isfinite(wins).sum(axis=1) >= 5
    xi = x[start:]
    hit = enough & (~np.isfinite(xi) | (xi > med + np.maximum(k * mad, min_rel * np.abs(med))))
    return [int(i) + start for i in np.flatnonzero(hit)]


def check_spikes(run: Run, **kw) -> Finding:
    name = "spikes"
    steps, x = run.series("raw_loss")
    if len(x) == 0:
        steps, x = run.series("loss")
    if len(x) < 20:
        return Finding(name, "skip", f"only {len(x)} loss values; need 20+")
    nonfinite = [int(s) for s, v in zip(steps, x) if not np.isfinite(v)]
    idx = find_spikes(x, **kw)
    events = [i for j, i in enumerate(idx) if j == 0 or idx[j - 1] != i - 1]  # runs of steps = one event
    nums = dict(count=len(events), steps=[int(steps[i]) for i in events][:20], nonfinite_steps=nonfinite[:20])
    if nonfinite:
        return Finding(name, "warn", f"loss became non-finite at step {nonfinite[0]}", nums,
                       "Divergence: lower the matrix LR, lengthen warmup, check for fp16 without a grad scaler.")
    if not events:
        return Finding(name, "ok", f"no loss spikes in {len(x)} steps", nums)
    rel = []
    for i in events:
        med = float(np.median(x[max(0, i - 50):i]))
        rel.append((float(x[i]) - med) / med)
    nums["max_relative_jump"] = max(rel)
    return Finding(name, "warn", f"{len(events)} loss spike(s), largest +{max(rel):.1%} over the rolling median, "
                   f"at step(s) {nums['steps'][:10]}", nums,
                   "Occasional spikes that recover are harmless; repeated or growing ones mean the LR is too high "
                   "for this batch: lower --matrix-lr (or raise the batch), lengthen warmup, and inspect the batches "
                   "at those steps for garbage data.")


def fit_data_curve(D: np.ndarray, L: np.ndarray) -> dict:
    """Fit L(D) = E + B D^-beta by robust least squares; returns E, B, beta."""
    from scipy.optimize import least_squares

    logD = np.log(D)
    Lmin = float(L.min())

    def resid(p):
        E, logB, beta = p
        return (E + np.exp(logB - beta * logD)) - L

    best = None
    with single_threaded_blas():  # a 3-parameter problem: BLAS threads only add contention
        for beta0 in (0.1, 0.3, 0.6):
            E0 = 0.8 * Lmin
            logB0 = math.log(max(L[0] - E0, 1e-6)) + beta0 * logD[0]
            r = least_squares(resid, [E0, logB0, beta0], loss="soft_l1", f_scale=0.01 * Lmin,
                              bounds=([0.0, -50, 1e-3], [Lmin, 200, 3.0]))
            if best is None or r.cost < best.cost:
                best = r
    E, logB, beta = best.x
    return dict(E=float(E), B=float(math.exp(logB)), beta=float(beta))


def check_plateau(run: Run, flat_fraction: float = 0.01) -> Finding:
    """Fit loss(D) = E + B D^-beta after warmup and predict the planned end, 2x and 10x its tokens.

    Plateaued = the fit predicts less than `flat_fraction` (1%) lower loss at 10x the planned tokens.
    The warmdown bends the curve down on its own, so the fit uses the pre-warmdown part when that
    has enough points (the prediction is then for a constant LR: the warmdown adds its own drop).
    """
    name = "plateau"
    D, L = run.series("raw_loss", x="tokens")
    if len(L) == 0:
        D, L = run.series("loss", x="tokens")
    ok = np.isfinite(L) & (D > 0)
    D, L = D[ok], L[ok]
    if len(L) < 30:
        return Finding(name, "skip", f"needs 30+ (tokens, loss) points; has {len(L)}")
    sz = run.sizing
    tps = _num(sz.get("tokens_per_step")) or float(np.median(np.diff(D))) or 1.0
    warm = _num(sz.get("warmup_steps")) or 0
    start = max(warm * tps, 0.1 * D[-1])
    n_iter = _num(sz.get("num_iterations"))
    used = "after warmup"
    wd_start = None
    if n_iter and _num(sz.get("warmdown_ratio")) is not None:
        wd_start = (n_iter - round(sz["warmdown_ratio"] * n_iter)) * tps
        if ((D >= start) & (D <= wd_start)).sum() >= 30 and D[-1] > wd_start:
            used = "after warmup, before warmdown"
    m = (D >= start) & (D <= wd_start) if used.endswith("before warmdown") else D >= start
    if m.sum() < 20:
        return Finding(name, "skip", f"only {int(m.sum())} points after warmup; need 20+")
    fit = fit_data_curve(D[m], L[m])
    planned = _num(sz.get("total_tokens")) or float(D[-1])
    pred = lambda d: fit["E"] + fit["B"] * d ** -fit["beta"]  # noqa: E731
    now = float(np.median(L[-max(5, len(L) // 20):]))
    nums = dict(fit=fit, fitted_on=used, fit_points=int(m.sum()), tokens_now=float(D[-1]), loss_now=now,
                planned_tokens=planned, loss_at_planned=pred(planned), loss_at_2x=pred(2 * planned),
                loss_at_10x=pred(10 * planned))
    gain2, gain10 = pred(planned) - pred(2 * planned), pred(planned) - pred(10 * planned)
    summary = (f"fit E={fit['E']:.3f} + {fit['B']:.3g} D^-{fit['beta']:.3f} ({used}): predicted loss "
               f"{pred(planned):.4f} at the planned {_fmt(planned)} tokens, {pred(2 * planned):.4f} at 2x "
               f"(-{gain2 / pred(planned):.1%}), {pred(10 * planned):.4f} at 10x (-{gain10 / pred(planned):.1%})")
    if gain10 < flat_fraction * pred(planned):
        return Finding(name, "warn", "plateau: " + summary, nums,
                       "More tokens will not help at this size: the curve sits at its floor E. A bigger model "
                       "(higher --depth) lowers the floor. If the plateau came during the constant-LR phase, "
                       "the warmdown will still lower it; a plateau early in training at a loss far above "
                       "peers points at the learning rate (too high: noisy floor; too low: slow crawl).")
    return Finding(name, "ok", "still improving: " + summary, nums,
                   "Returns diminish as a power law: each doubling of tokens buys less.")


def check_schedule(run: Run, tolerance: float = 0.02) -> Finding:
    name = "schedule"
    sz = run.sizing
    steps, lr = run.series("lr")
    n_iter = _num(sz.get("num_iterations"))
    all_steps = run.series("step")[1]
    if len(all_steps) == 0:
        return Finding(name, "skip", "no steps logged")
    # base_train logs `step` = optimizer steps done (1, 2, ...); a 0-based log counts one more
    done_steps = int(all_steps[-1]) + (1 if all_steps[0] == 0 else 0)
    last = done_steps - 1  # index of the last step taken
    nums = dict(step=done_steps, num_iterations=n_iter)
    if n_iter is None:
        return Finding(name, "skip", "run.json lacks sizing.num_iterations", nums)
    warm = int(_num(sz.get("warmup_steps")) or 0)
    wd_ratio = _num(sz.get("warmdown_ratio"))
    final = _num(sz.get("final_lr_frac"))
    wd_steps = round((wd_ratio or 0) * n_iter)
    if last < warm:
        phase = f"warmup ({last + 1}/{warm} steps)"
    elif last <= n_iter - wd_steps:
        phase = f"constant LR (warmdown starts at step {int(n_iter - wd_steps)})"
    else:
        phase = f"warmdown ({(last - (n_iter - wd_steps)) / max(wd_steps, 1):.0%} through)"
    nums.update(phase=phase.split(" (")[0], warmup_steps=warm, warmdown_steps=wd_steps,
                progress=done_steps / n_iter, step=done_steps)
    notes, status = [], "ok"
    if len(lr) and wd_ratio is not None and final is not None:
        from nanochat.sizing import lr_multiplier

        expect = lambda s: lr_multiplier(int(s), int(n_iter), warm, wd_ratio, final)  # noqa: E731
        sched = {s: expect(s) for s in range(int(steps.min()) - 1, int(steps.max()) + 2)}
        # allow an off-by-one in how the loop numbers its steps
        diff = np.array([min(abs(v - sched[int(s) + d]) for d in (-1, 0, 1)) for s, v in zip(steps, lr)])
        nums["max_lr_deviation"] = float(diff.max())
        if diff.max() > tolerance:
            i = int(diff.argmax())
            status = "warn"
            notes.append(f"logged LR multiplier {lr[i]:.3f} at step {int(steps[i])} != schedule {expect(steps[i]):.3f}")
    if len(lr):
        nums["lr_multiplier"] = float(lr[-1])
    done = done_steps >= n_iter
    if not done:
        notes.append(f"stopped at step {done_steps} of {int(n_iter)} ({done_steps / n_iter:.0%})")
    summary = f"at step {done_steps}/{int(n_iter)}: {phase}" + ("; " + "; ".join(notes) if notes else "")
    advice = ""
    if status == "warn":
        advice = ("The LR the loop applied differs from the schedule it recorded: check the resume logic and "
                  "the schedule arguments.")
    elif not done:
        status = "info"
        advice = ("The run is unfinished: losses before the warmdown are higher than the run's final loss will be; "
                  "compare runs at their ends (or resume this one).")
    return Finding(name, status, summary, nums, advice)


CHECKS = (check_param_count, check_tokens_ratio, check_mfu, check_val_vs_train, check_spikes, check_plateau,
          check_schedule)


def diagnose(run: Run, law=None) -> list[Finding]:
    """All checks; `law` (a fitted scaling.LossLaw) sets the compute-optimal ratio."""
    out = []
    for check in CHECKS:
        try:
            out.append(check(run, law=law) if check is check_tokens_ratio else check(run))
        except Exception as e:  # noqa: BLE001 -- one broken check must not hide the others
            out.append(Finding(check.__name__.removeprefix("check_"), "skip", f"check failed: {type(e).__name__}: {e}"))
    return out


def report(run: Run, findings: list[Finding]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "info": "info", "skip": "skip"}
    lines = [f"run: {run.path}"] + [f"  note: {p}" for p in run.problems]
    for f in findings:
        lines.append(f"[{mark.get(f.status, f.status)}] {f.check}: {f.summary}")
        if f.advice and f.status in ("warn", "info"):
            lines.append(f"       -> {f.advice}")
    return "\n".join(lines)


def to_json(run: Run, findings: list[Finding]) -> dict:
    return {"run": str(run.path), "problems": run.problems, "findings": [asdict(f) for f in findings]}


# ---------------------------------------------------------------------------------------------
# one row of a scaling sweep


def run_summary(run: Run) -> dict:
    """The sweep CSV row of one run: final val bpb, parameter counts, tokens, FLOPs."""
    scaling, total = _params(run)
    mc = run.info.get("model_config") or {}
    steps, bpb = run.series("val_bpb")
    final = run.info.get("final") or {}
    val = _num(final.get("val_bpb")) if final else None
    if val is None and len(bpb):
        val = float(bpb[-1])
    n_iter = _num(run.sizing.get("num_iterations"))
    all_steps = run.series("step")[1]
    done_steps = int(all_steps[-1]) + (1 if all_steps[0] == 0 else 0) if len(all_steps) else None
    raw = run.series("raw_loss")[1]
    train_loss = float(np.mean(raw[-max(1, len(raw) // 20):])) if len(raw) else None  # last 5% of steps
    tokens = _tokens_trained(run)
    flops = _num(run.last("flops"))
    if flops is None and tokens and _num(run.sizing.get("flops_per_token")):
        flops = tokens * run.sizing["flops_per_token"]
    return dict(model_tag=run.args.get("model_tag") or run.path.name, depth=run.args.get("depth") or mc.get("n_layer"),
                target_flops=_num(run.args.get("target_flops")), val_bpb=val, train_loss=train_loss,
                val_step=int(steps[-1]) if len(steps) else None,
                scaling_params=scaling, total_params=total, tokens=tokens, flops=flops,
                flops_6ND=6 * scaling * tokens if scaling and tokens else None,
                steps=done_steps, num_iterations=n_iter,
                complete=bool(done_steps is not None and n_iter and done_steps >= n_iter))
