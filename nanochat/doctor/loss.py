"""Loss checks: validation vs training (judged by phase), spikes, and the loss curve with its predictions."""

from __future__ import annotations

import math
import warnings

import numpy as np

from nanochat.doctor import Finding, fmt, num
from nanochat.run_formats import Run
from nanochat.scaling import annealing_area, bootstrap_data_curve, data_curve, fit_data_curve, single_threaded_blas

# validation above training loss, relative, beyond which the val/train check warns. Single-epoch
# pretraining sees every token once, so val tracks train within noise and a few % of split shift;
# fine-tuning runs several epochs over a small mix, where val sits above train by design, and a wide
# gap is the model learning its training conversations by heart.
VAL_ABOVE_TRAIN_WARN = {"base": 0.05, "sft": 0.15, "rl": None}


def _bytes_per_token(run: Run) -> float | None:
    for d in (run.info, run.sizing, run.info.get("eval") or {}, run.info.get("data") or {}):
        for k in ("bytes_per_token", "val_bytes_per_token"):
            if num(d.get(k)):
                return float(d[k])
    return num(run.last("bytes_per_token"))


def training_loss(run: Run) -> tuple[np.ndarray, np.ndarray, str]:
    """(steps, training loss, how): the step losses when the format logs (or recovers) them; else the
    smoothed loss it prints, each value placed at its mean age (`Smoothing.lag`) so that fits and
    comparisons see where the curve was, not where the smoothing lags behind it."""
    steps, x = run.series("raw_loss")
    if len(x):
        return steps, x, "the step losses"
    steps, x = run.series("loss")
    sm = run.knows.loss_smoothing
    if sm is None or len(x) == 0:
        return steps, x, "the logged loss"
    return steps - sm.lag(steps), x, f"the logged loss, {sm.describe()}, read at its mean lag"


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
    dropout = (num(run.args.get("dropout")) or num((run.info.get("model_config") or {}).get("dropout"))
               or num(run.info.get("dropout")))
    # our loop logs the loss of step t from the weights before update t, and evaluates at step s with the
    # weights after update s (so: read the training trend at s + 1); nanoGPT evaluates and logs iter s
    # with the same weights (offset 0)
    offset = float(run.knows.eval_offset)
    ev_steps, val_nats = run.series("val_loss")
    how = "val_loss"
    if len(val_nats) == 0:
        ev_steps, bpb = run.series("val_bpb")
        bpt = _bytes_per_token(run)
        if len(bpb) and bpt:
            val_nats, how = bpb * math.log(2) * bpt, f"val_bpb x ln2 x {bpt:.3g} bytes/token"
    tr_steps, tr, tr_note = training_loss(run)
    phase = run.knows.phase
    nums = dict(dropout=dropout, phase=phase, train_from=tr_note)
    ev_tr_steps, ev_tr = run.series("eval_train_loss")
    drop_note = ""
    if dropout:
        drop_note = (f"dropout={dropout:g} is on: the training loss is measured with dropout active and the validation "
                     "loss without it, so val < train is that train/eval-mode difference, not generalisation")
        if len(ev_tr) and len(val_nats):
            j = int(np.argmin(np.abs(ev_tr_steps - ev_steps[-1])))
            nums.update(eval_mode_train=float(ev_tr[j]), eval_mode_gap=float((val_nats[-1] - ev_tr[j]) / ev_tr[j]))
            drop_note += (f" (in eval mode the training split scores {ev_tr[j]:.4f} vs val {val_nats[-1]:.4f}: "
                          f"a {nums['eval_mode_gap']:+.1%} generalisation gap)")
        drop_note += (". Single-epoch pretraining does not overfit: set dropout = 0, which also trains faster. "
                      if phase == "base" else ". ")
    if len(val_nats) and len(tr):
        gaps = []
        for s, v in zip(ev_steps, val_nats):
            m = (tr_steps <= s + offset) & (tr_steps >= 0.8 * s)  # near the eval: not the fast early descent
            m &= tr_steps > (tr_steps[m][-window] if m.sum() > window else -np.inf)  # the last `window` points
            if m.sum() >= 5:  # quadratic with enough points: early losses curve (convex) within a window
                coef = np.polyfit(tr_steps[m].astype(float) - s, tr[m].astype(float), 2 if m.sum() >= 8 else 1)
                t = float(np.polyval(coef, offset))
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
                               f"nats/token at step {int(s)}" + (f" with dropout={dropout:g}" if dropout else ""), nums,
                               drop_note + ("Otherwise t" if drop_note else "T") + "rain and eval measure different "
                               "things: check that the train loss has no extra terms (z-loss, aux losses), both use the same sequence length and "
                               "no dropout at eval, and that the validation shard does not overlap training data.",
                               severity=30 if dropout else 40)
            first = next((x for x in gaps if x[0] >= 0.2 * gaps[-1][0]), gaps[0])
            nums["relative_gap_first"] = first[3]
            limit = VAL_ABOVE_TRAIN_WARN.get(phase)
            nums["warn_above"] = limit
            trend = f" (from {first[3]:+.1%} at step {int(first[0])})" if len(gaps) >= 3 else ""
            if limit is not None and g > limit and phase != "base":
                return Finding(name, "warn", f"{phase.upper()} validation loss {v:.4f} is {g:.1%} above training loss "
                               f"{t:.4f} at step {int(s)}{trend}: the model fits its training conversations much better than "
                               f"held-out ones (a fine-tuning gap above {limit:.0%})", nums,
                               drop_note + "Overfitting the fine-tuning mix: train fewer epochs (or stop at the step where "
                               "val was lowest), lower the learning rate, or add data; compare checkpoints by val loss and "
                               "the chat evals, not by the training loss.", severity=35)
            if limit is not None and g > limit:
                return Finding(name, "warn", f"validation loss {v:.4f} is {g:.1%} above training loss {t:.4f} nats/token at "
                               f"step {int(s)}{trend}: in single-epoch pretraining the two should track within a few %",
                               nums, drop_note + "The validation split is not from the training distribution, or the "
                               "training data repeats (epochs over a small corpus): check the split, and the data size "
                               "against the tokens trained.", severity=30)
            if phase == "base" and len(gaps) >= 3 and g - first[3] > 0.03:
                return Finding(name, "warn", f"validation no longer tracks training: the gap grew from {first[3]:+.1%} "
                               f"(step {int(first[0])}) to {g:+.1%} (step {int(s)})", nums,
                               drop_note + "Validation falling slower than training means repeated data (epochs over a "
                               "small corpus) or a train/val distribution shift; get more (or fresher) data.", severity=25)
            status = "warn" if dropout and phase == "base" else "ok"
            track = f"; val tracks train ({first[3]:+.1%} at step {int(first[0])})" if len(gaps) >= 3 else ""
            return Finding(name, status, f"validation {v:.4f} vs training {t:.4f} nats/token ({g:+.1%}) at step {int(s)}"
                           + track + (f"; dropout={dropout:g}" if dropout else ""), nums, drop_note, severity=15 if dropout else 0)
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
        return Finding(name, "warn", f"dropout={dropout:g}", nums, drop_note, severity=15)
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
    sm = run.knows.loss_smoothing
    note = ""
    if len(x) == 0:
        steps, x = run.series("loss")
        if sm is not None and sm.kind == "ema" and len(x):
            bad = [int(s) for s, v in zip(steps, x) if not np.isfinite(v)]
            if bad:
                return Finding(name, "warn", f"loss became non-finite at step {bad[0]}", dict(nonfinite_steps=bad[:20]),
                               "Divergence: lower the matrix LR, lengthen warmup, check for fp16 without a grad scaler.")
            return Finding(name, "skip", f"the log prints {sm.describe()}, not the step losses: a one-step spike "
                           f"is spread over ~{round(sm.lag(np.array([1e9]))[0]) + 1} steps at a fraction of its height, "
                           "so raw-loss spikes cannot be told from noise (the other checks use the smoothed loss)")
        if sm is not None and sm.kind == "window":
            note = f" (of {sm.window}-step mean losses: a one-step spike shows at 1/{sm.window} of its height)"
    if len(x) == 0:
        return Finding(name, "skip", "no training loss logged")
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
        return Finding(name, "ok", f"no loss spikes in {len(x)} steps{note}", nums)
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


def _lr_grid(run: Run, last_step: int):
    """(LR multiplier for steps 0..n, n, planned): the planned schedule to the planned end when the
    format records it, else the logged LR up to the last logged step; None without any LR."""
    sz = run.sizing
    steps, lr = run.series("lr")
    n_iter = num(sz.get("num_iterations"))
    if n_iter and run.knows.planned_steps and run.knows.lr_schedule is not None:
        n = int(n_iter)
        try:
            return np.array([run.knows.lr_schedule(s) for s in range(n + 1)], dtype=float), n, True
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    if len(lr) < 2:
        return None
    n = int(max(last_step, steps[-1]))
    grid = np.interp(np.arange(n + 1), steps, lr / lr.max())
    if n_iter and n_iter > n:
        k = min(len(lr), 20)  # printed LRs are rounded (2 decimals): the slope of the last points, not of two
        slope = float(np.polyfit(steps[-k:], lr[-k:], 1)[0]) / lr.max()
        if grid[-1] < 0.99 and slope < 0:  # a linear warmdown under way continues to the planned end
            ext = np.maximum(grid[-1] + slope * np.arange(1, int(n_iter) - n + 1), 0.0)
            return np.concatenate([grid, ext]), int(n_iter), True
    return grid, n, False


def check_loss_curve(run: Run, flat_fraction: float = 0.01, n_boot: int = 60) -> Finding:
    """Why the loss keeps falling, or has flattened, with an interval on every prediction.

    Fitted after warmup: L = E + B S1^-beta - C S2 (Tissue et al. 2024), S1 = the LR-weighted tokens
    (sum of lr multiplier x tokens per step; = tokens at constant LR), S2 = the annealing area of the LR
    schedule. E + B D^-beta is then the constant-LR data curve, and C S2 what the warmdown buys: its
    planned end minus now is the loss the schedule still owes. Without a logged LR, C = 0 and S1 = D.
    A fit whose E sits at its bound, whose window spans under 3x in tokens, or that the run's own last
    losses contradict says so and labels its extrapolations unreliable.
    """
    name = "loss_curve"
    if run.knows.phase != "base":
        return Finding(name, "skip", f"a {run.knows.phase.upper()} run: the data-curve fit describes pretraining (a "
                       "fine-tuning loss falls to its mix's floor within an epoch; val_vs_train judges it)")
    steps_all, L_all, how = training_loss(run)
    if len(L_all) < 30 and len(run.series("val_loss")[1]) >= 30:
        steps_all, L_all = run.series("val_loss")
        how = "the validation loss (the log has no training loss)"
    tok_steps, tok = run.series("tokens")
    sz = run.sizing
    tps = num(sz.get("tokens_per_step"))
    if tps is None and len(tok) >= 2 and tok_steps[-1] > 0:
        tps = float(tok[-1] / tok_steps[-1])
    if len(L_all) == 0 or not tps:
        return Finding(name, "skip", "needs the training loss against tokens trained"
                       + ("; " + "; ".join(s for s in run.skipped if "token" in s) if run.skipped else ""))
    D_all = np.maximum(steps_all, 0.0) * tps
    ok = np.isfinite(L_all) & (D_all > 0)
    steps_all, D_all, L_all = steps_all[ok], D_all[ok], L_all[ok]
    if len(L_all) < 30:
        return Finding(name, "skip", f"needs 30+ (tokens, loss) points; has {len(L_all)}")
    grid = _lr_grid(run, int(math.ceil(steps_all[-1])))
    planned = num(sz.get("total_tokens")) or float(D_all[-1])
    if grid is not None:
        lr, n_grid, has_plan = grid
        s1_grid = np.concatenate([[0.0], np.cumsum(lr[:-1])]) * tps  # LR-weighted tokens before each step
        s2_grid = annealing_area(lr)
        at = np.clip(steps_all, 0, n_grid)  # steps may be fractional: a smoothed loss read at its lag
        S1, S2 = np.interp(at, np.arange(n_grid + 1), s1_grid), np.interp(at, np.arange(n_grid + 1), s2_grid)
        warm = num(sz.get("warmup_steps"))
        if warm is None:
            warm = float(np.argmax(lr >= 0.99 * lr.max()))
        end = (float(s1_grid[-1] + lr[-1] * tps), float(s2_grid[-1])) if has_plan else None
        used = ("LR-weighted tokens, with the warmdown's annealing term" if float(s2_grid[-1]) > 0 else
                "tokens (the LR stays at its peak: no warmdown term)")
    else:
        S1, S2, warm, end, has_plan = D_all, None, num(sz.get("warmup_steps")) or 0, None, False
        used = "tokens (no LR logged: no warmdown term)"
    start = max(warm * tps, 0.1 * D_all[-1])
    m = (D_all >= start) & (S1 > 0)
    if m.sum() < 20:
        return Finding(name, "skip", f"only {int(m.sum())} points after warmup; need 20+")
    D, L, s1 = D_all[m], L_all[m], S1[m]
    s2 = None if S2 is None else S2[m]
    if len(L) > 80:  # bin means of consecutive points: the same curve, a fraction of the cost and less noise
        groups = np.array_split(np.arange(len(L)), 80)
        D, L, s1 = (np.array([a[g].mean() for g in groups]) for a in (D, L, s1))
        s2 = None if s2 is None else np.array([s2[g].mean() for g in groups])
    pred = lambda f, d: float(data_curve(f)(d))  # noqa: E731
    preds = [lambda f: pred(f, planned), lambda f: pred(f, 2 * planned), lambda f: pred(f, 10 * planned)]
    if end is not None:
        preds.append(lambda f: pred(f, end[0]) - f["C"] * end[1])
    with single_threaded_blas():
        fit = fit_data_curve(s1, L, s2)
        boot = bootstrap_data_curve(s1, L, fit, s2, n_boot=n_boot, predict=preds)
    p_plan, p2, p10 = (p(fit) for p in preds[:3])
    tail = max(5, len(L_all) // 20)
    now = float(np.median(L_all[-tail:]))
    s1_tail, s2_tail = S1[m][-tail:], (0.0 if S2 is None else S2[m][-tail:])
    fitted_now = float(np.median(data_curve(fit)(s1_tail) - fit["C"] * s2_tail))
    iv = boot["at"]
    nums = dict(fit={k: fit[k] for k in ("E", "B", "beta", "C")}, fitted_on=used, loss_from=how, fit_points=int(m.sum()),
                window_tokens=(float(D[0]), float(D[-1])), tokens_now=float(D_all[-1]), loss_now=now,
                planned_tokens=planned, loss_at_planned=p_plan, loss_at_2x=p2, loss_at_10x=p10,
                intervals=dict(E=boot["E"], beta=boot["beta"], loss_at_planned=iv[0], loss_at_2x=iv[1], loss_at_10x=iv[2]),
                interval_ci=boot["ci"])
    owed_text = ""
    if s2 is not None:
        s2_now = float(S2[-1])
        gained = fit["C"] * s2_now
        nums.update(warmdown_gain_so_far=gained)
        if end is not None:
            owed = fit["C"] * max(end[1] - s2_now, 0.0)
            end_pred = preds[3](fit)
            nums.update(warmdown_owed=owed, loss_at_planned_end=end_pred, intervals_end=iv[3])
            if steps_all[-1] < n_grid - 1:
                owed_text = (f"; the LR schedule has bought {gained:.4f} so far and still owes {owed:.4f}: "
                             f"{end_pred:.4f} [{iv[3][0]:.4f}, {iv[3][1]:.4f}] at the planned end")
            else:
                owed_text = f"; the warmdown bought {gained:.4f} (complete)"
            if s2_now == 0 and end[1] > 0:
                owed_text += " (the warmdown has not begun, so its size C is not measured yet: the figure assumes C from no data)"
                nums["warmdown_measured"] = False
        else:
            owed_text = "; the log does not say when the warmdown starts, so what it still owes is not estimated"
    flags = []
    if fit["E_at_bound"]:
        flags.append(f"E={fit['E']:.3g} sits at the bound of its range [0, {L.min():.3g}]: the window does not pin the floor")
    span = D[-1] / D[0]
    if span < 3 or m.sum() < 30:
        flags.append(f"the fitted window spans only {span:.2g}x in tokens ({int(m.sum())} steps)")
    noise = 3 * float(np.std(L_all[-tail:])) / math.sqrt(tail) + 0.002 * now
    if abs(now - fitted_now) > noise:
        flags.append(f"the fit misses the run's own last losses ({fitted_now:.4f} vs {now:.4f})")
    nums.update(reliable=not flags, unreliable_because=flags)
    pm = lambda i, v: f"{v:.4f} [{iv[i][0]:.4f}, {iv[i][1]:.4f}]"  # noqa: E731
    anneals = s2 is not None and float(np.max(s2)) > 0
    summary = (f"L = {fit['E']:.3f} + {fit['B']:.3g} D^-{fit['beta']:.3f}" + (f" - {fit['C']:.3g} S2" if anneals else "")
               + f" (fitted to {how}, on {used}; {boot['ci']:.0%} bootstrap intervals): constant-LR loss {pm(0, p_plan)} at the "
               f"planned {fmt(planned)} tokens, {pm(1, p2)} at 2x, {pm(2, p10)} at 10x" + owed_text)
    if flags:
        return Finding(name, "info", "extrapolations UNRELIABLE (" + "; ".join(flags) + "): " + summary, nums,
                       "Do not plan on these numbers: train longer before judging the curve (more steps after warmup), "
                       "or take the floor from a scaling law fitted across sizes (scripts/scaling_fit.py).")
    gain10 = p_plan - p10
    if gain10 < flat_fraction * p_plan:
        return Finding(name, "warn", f"flattened: 10x the tokens would lower the loss by only {gain10 / p_plan:.1%}: " + summary,
                       nums, "More tokens will not help at this size: the curve sits near its floor E. A bigger model "
                       "lowers the floor (see tokens_ratio for what the same compute buys); if the plateau came early and "
                       "far above peers, look at the learning rate (too high: a noisy floor; too low: a slow crawl).",
                       severity=20)
    return Finding(name, "ok", f"still falling as a power law (-{(p_plan - p2) / p_plan:.1%} per doubling of tokens, "
                   f"floor E={fit['E']:.3g} [{boot['E'][0]:.3g}, {boot['E'][1]:.3g}]): " + summary, nums,
                   "Returns diminish as a power law: each doubling of tokens buys less; the loss above E is what more "
                   "data or a bigger model can still remove.")
