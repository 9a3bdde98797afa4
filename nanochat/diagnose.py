"""The run doctor: read a training run -- ours or another program's -- and say, ranked and with
numbers, what is off and what to change.

Runs are read by nanochat/run_formats (our run folder and console output, Hugging Face Trainer,
TensorBoard, wandb exports, nanoGPT, karpathy/nanochat, llm.c, modded-nanogpt). Each format declares
what it knows (`Run.knows`); the checks read those declarations, and what a format lacks makes the
checks that need it skip (and say so), never guess.

Each check returns a `Finding` with a status:
  ok    nothing to change          warn  something to change (the advice says what)
  info  worth knowing, not wrong   skip  the run lacks what the check needs (the summary says what)

The checks, by topic (`CHECKS` at the end lists them in report order):
  size      param_count: recomputed vs printed vs claimed in comments and names, the likeliest typo;
            tokens_ratio: tokens per parameter in both conventions vs the compute-optimal ratio, now and
            at the planned end, and what the same compute buys as a compute-optimal model
  speed     mfu: renormalised to the dense bf16 peak of the GPU that ran (nanochat.gpus)
  loss      val_vs_train (phase-aware: pretraining vs fine-tuning), spikes, loss_curve (a fitted
            L(D) = E + B D^-beta - C S2 with bootstrap intervals, predictions at the planned end / 2x /
            10x, from smoothed logs at their known lag)
  schedule  where the run is in its LR schedule, and whether the logged LR follows the plan
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nanochat.gpus import GPUS, find_gpu
from nanochat.run_formats import Run
from nanochat.run_formats import parse as parse_run
from nanochat.run_formats._text import size_value
from nanochat.run_formats.shapes import explain_size_gap
from nanochat.scaling import (CHINCHILLA, CHINCHILLA_TOKENS_PER_PARAM, annealing_area, bootstrap_data_curve, data_curve,
                              fit_data_curve, single_threaded_blas)
from nanochat.sizing import COMPUTE_OPTIMAL_RATIO

# what a well-tuned bf16 run of this architecture reaches on H100-class GPUs (REFERENCE section 9:
# reference d12 ~41%, d18 ~46%, d24 ~50%); below WARN_MFU something is leaving the GPU idle
EXPECTED_MFU = (0.40, 0.50)
WARN_MFU = 0.30
CHINCHILLA_RATIO = CHINCHILLA_TOKENS_PER_PARAM
# validation above training loss, relative, beyond which the val/train check warns. Single-epoch
# pretraining sees every token once, so val tracks train within noise and a few % of split shift;
# fine-tuning runs several epochs over a small mix, where val sits above train by design, and a wide
# gap is the model learning its training conversations by heart.
VAL_ABOVE_TRAIN_WARN = {"base": 0.05, "sft": 0.15, "rl": None}


def load_run(path, config=None, tokens_per_step: float | None = None) -> Run:
    """Any supported run (auto-detected); `config`: the run's config .py (nanoGPT, wandb exports);
    `tokens_per_step`: for formats that do not record it (HF Trainer, TensorBoard, modded-nanogpt)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder or log not found: {path} (expected <base>/base_checkpoints/<model_tag>/, "
                                "a training log, a Trainer or TensorBoard folder, or a wandb history .csv/.jsonl)")
    run = parse_run(path, config)
    if tokens_per_step and not run.knows.tokens_per_step:
        run.info.setdefault("sizing", {})["tokens_per_step"] = tokens_per_step
        n = run.sizing.get("num_iterations")
        if n:
            run.info["sizing"]["total_tokens"] = n * tokens_per_step
        for m in run.metrics:
            if isinstance(m.get("step"), (int, float)):
                m["tokens"] = m["step"] * tokens_per_step
        run.knows.tokens_per_step = True
        run.skipped = [s for s in run.skipped if not s.startswith("tokens per step")]
    return run


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | info | skip
    summary: str
    numbers: dict = field(default_factory=dict)
    advice: str = ""
    severity: float = 0.0  # ranks warnings: the most consequential first


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


def _check_param_count_ours(run: Run) -> Finding:
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
    declared = size_value(tag)
    actual = nums.get("instantiated_total") or rec_total or nums.get("declared_total")
    if declared:
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


def check_param_count(run: Run) -> Finding:
    """Parameter count: ours against the config and the depth dial; foreign runs against the count the
    program printed and every size claimed in comments, names and file names."""
    if run.knows.builds_model:
        return _check_param_count_ours(run)
    name = "param_count"
    info = run.info
    counts, printed, claims = info.get("counts"), info.get("printed_params"), info.get("claims") or []
    if "counts_table" in info:  # the program printed its count part by part
        table = info.get("counts_table") or {}
        if not table:
            return Finding(name, "skip", "the log has no `Parameter counts:` table")
        parts = sum(v for k, v in table.items() if k != "total")
        nums = dict(table=table, scaling_params=run.sizing.get("scaling_params"))
        if table.get("total") and abs(parts - table["total"]) > 0.001 * table["total"]:
            return Finding(name, "warn", f"the printed parts sum to {_fmt(parts)} but the printed total is "
                           f"{_fmt(table['total'])}", nums, "The log was edited or mixes two runs.", severity=50)
        return Finding(name, "ok", f"{_fmt(table.get('total', parts))} parameters as printed by base_train "
                       f"({_fmt(nums['scaling_params'] or 0)} scaling: transformer matrices + LM head)", nums)
    if not counts and _num(run.sizing.get("num_params")):  # a count the run printed, without the shape behind it
        total, scaling = _num(run.sizing["num_params"]), _num(run.sizing.get("scaling_params"))
        return Finding(name, "ok", f"{_fmt(total)} parameters as the run recorded them"
                       + (f" ({_fmt(scaling)} scaling: block matrices + LM head)" if scaling else "")
                       + "; the shape is not in this format, so it is not recomputed",
                       dict(recorded_total=total, recorded_scaling=scaling))
    if not counts:
        why = "; ".join(s for s in run.skipped if "config" in s or "shape" in s or "parameter" in s)
        return Finding(name, "skip", "no model shape (n_layer, n_embd, vocab size)" + (f": {why}" if why else
                       ": pass the run's --config FILE"))
    dims = info["dims"]
    nums = dict(dims=dims, recomputed_total=counts["total"], recomputed_printed=counts["printed"],
                position_embeddings=counts["wpe"], printed=printed, claims=claims,
                set_by={k: (info.get("config_set_by") or {}).get(k) for k in ("n_layer", "n_embd", "vocab_size", "block_size")})
    family = info.get("family") or "gpt2"
    shape = ", ".join(f"{k}={dims[k]}" for k in ("n_layer", "n_embd", "vocab_size", "block_size") if dims.get(k) is not None)
    pe_note = (f"the printed count is {run.knows.printed_params} ({_fmt(counts['printed'])} that way, {_fmt(counts['total'])} "
               "in all)" if run.knows.printed_params and counts["printed"] != counts["total"] else
               f"{_fmt(counts['total'])} parameters in all")
    issues, advice, severity = [], [], 0.0
    if printed and abs(printed - counts["printed"]) > 0.005 * printed + 5e3:
        gap = explain_size_gap(dims, printed, "printed", family)
        nums["printed_explained_by"] = gap[:3]
        ratio = counts["printed"] / printed
        issues.append(f"the log printed {printed / 1e6:.2f}M but the config recomputes to {counts['printed'] / 1e6:.2f}M "
                      f"({ratio:.2f}x; {shape})")
        if gap:
            advice.append(f"the config read is not the one that ran: {_explain(gap[0], dims, nums)} reproduces the "
                          f"printed {printed / 1e6:.2f}M; check --config and the command line")
        severity = max(severity, 100 * abs(math.log(ratio)))
    reference = printed or counts["printed"]
    bad = []
    for c in claims:
        r_total, r_printed = counts["total"] / c["value"], reference / c["value"]
        if not any(1 / 1.15 <= r <= 1.15 for r in (r_total, r_printed)):
            bad.append((c, r_total))
    if bad:
        c, r = max(bad, key=lambda t: abs(math.log(t[1])))
        gap = explain_size_gap(dims, c["value"], "total", family)
        nums["claim_explained_by"] = gap[:3]
        issues.append(f"{c['where']} says {c['text']!r} but the model has {_fmt(counts['total'])} parameters "
                      f"({r:.2f}x; {shape})")
        if gap:
            alts = "; ".join(_explain(x, dims, nums) for x in gap[1:3])
            advice.append(f"likeliest cause: {_explain(gap[0], dims, nums)}" + (f"; less likely: {alts}" if alts else ""))
        else:
            advice.append("no single field of the config explains it: the claim may count differently (with or without "
                          "embeddings) or describe another model")
        severity = max(severity, 100 * abs(math.log(r)))
    if issues:
        return Finding(name, "warn", "; ".join(issues), nums,
                       "; ".join(advice) + f". ({pe_note}.)", severity=severity)
    said = f"; consistent with {', '.join(repr(c['text']) for c in claims)}" if claims else ""
    return Finding(name, "ok", f"{pe_note}{'; matches the printed count' if printed else ''}{said}", nums)


def _explain(g: dict, dims: dict, nums: dict) -> str:
    """One candidate of `explain_size_gap` in words: what to change, what it gives, where the value came from."""
    fields = ", ".join(f"{k}={v} (it is {dims[k]}, set by {nums['set_by'].get(k) or 'the config'})"
                       for k, v in g["changes"].items())
    known = f", {g['known']}'s shape" if g.get("known") else ""
    return f"{fields} gives {_fmt(g['count'])}{known}"


def compute_equivalent(law, N: float, D: float) -> dict:
    """What the compute C = 6ND buys when split optimally under `law`: (N*, D*), the loss gap, and the
    fraction of C that the compute-optimal split needs to reach this run's predicted loss."""
    C = 6.0 * N * D
    n_opt, d_opt = (float(v) for v in law.compute_optimal(C))
    here, best = float(law.loss(N, D)), float(law.loss(n_opt, d_opt))
    lo, hi = math.log(C) - 30, math.log(C)  # the optimum's loss falls monotonically with compute
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        n_m, d_m = law.compute_optimal(math.exp(mid))
        lo, hi = (mid, hi) if float(law.loss(n_m, d_m)) > here else (lo, mid)
    return dict(compute=C, optimal_params=n_opt, optimal_tokens=d_opt, law_loss=here, law_loss_optimal=best,
                law_loss_gap=here - best, compute_fraction_needed=math.exp(hi) / C)


def check_tokens_ratio(run: Run, law=None) -> Finding:
    """Tokens per parameter, by total and by scaling parameters, now and at the planned end, against the
    compute-optimal ratio of the law in use (a fitted `LossLaw` at this run's compute, else nanochat's
    fitted ~10.5 per scaling parameter and Chinchilla's ~20 per total parameter); and what the same
    compute would buy as a compute-optimal (usually bigger) model."""
    name = "tokens_ratio"
    if run.knows.phase != "base":
        return Finding(name, "skip", f"a {run.knows.phase.upper()} run: compute-optimal tokens per parameter is a "
                       "pretraining question")
    scaling, total = _params(run)
    so_far, planned = _tokens_trained(run), _num(run.sizing.get("total_tokens"))
    if not (scaling or total) or not (so_far or planned):
        why = "; ".join(s for s in run.skipped if "token" in s or "shape" in s or "config" in s or "parameter" in s)
        return Finding(name, "skip", "needs a parameter count and the tokens trained" + (f" ({why})" if why else ""))
    nums = dict(scaling_params=scaling, total_params=total, tokens_so_far=so_far, planned_tokens=planned)
    for when, D in (("now", so_far), ("planned", planned)):
        if D:
            if scaling:
                nums[f"tokens_per_scaling_param_{when}"] = D / scaling
            if total:
                nums[f"tokens_per_total_param_{when}"] = D / total
    D = planned or so_far
    if law is not None:
        count = law.param_count
        n_run = scaling if count == "scaling" else total
        if not n_run:
            return Finding(name, "skip", f"the law counts {count} parameters; this run does not record them", nums)
        n_opt, d_opt = (float(v) for v in law.compute_optimal(6 * n_run * D))
        opt, source = d_opt / n_opt, f"the fitted law's optimum at this compute ({count} parameters)"
    elif scaling and (run.knows.params == "scaling" or not total):
        # nanochat's ~10.5 was fitted on this architecture's scaling parameters; other programs' models are
        # judged by Chinchilla's all-parameter ratio (the format declares which)
        count, n_run, opt, source = "scaling", scaling, COMPUTE_OPTIMAL_RATIO, "nanochat's fitted ratio (scaling parameters)"
    else:
        count, n_run, opt, source = "total", total, CHINCHILLA_RATIO, "Chinchilla's ratio (total parameters)"
    ratio = D / n_run
    nums.update(param_count=count, params=n_run, tokens=D, tokens_per_param=ratio, optimal_tokens_per_param=opt,
                optimal_from=source, multiple_of_optimal=ratio / opt,
                optimal_params=math.sqrt(n_run * D / opt) if law is None else n_opt)
    when = "at the planned end" if planned else "so far"
    parts = []
    if scaling:
        parts.append(f"{D / scaling:.3g} per scaling parameter (optimum ~{COMPUTE_OPTIMAL_RATIO:g})")
    if total:
        parts.append(f"{D / total:.3g} per total parameter (Chinchilla ~{CHINCHILLA_RATIO:g})")
    where = f"{_fmt(D)} tokens {when} = " + ", ".join(parts)
    if planned and so_far and so_far < 0.999 * planned:
        where += f"; so far {_fmt(so_far)} = {so_far / n_run:.3g} per {count} parameter"
    if law is not None:
        where += f"; the law's optimum here is {opt:.3g} per {count} parameter"
    # the same compute as a compute-optimal model, under the law in use (Chinchilla's if none was given;
    # its fit spans 70M-16B parameters, so outside ~10M-100B only the ratio's optimum is given)
    law_used = law if law is not None else CHINCHILLA
    n_law = (scaling if law_used.param_count == "scaling" else total) or n_run
    eq = compute_equivalent(law_used, n_law, D)
    in_range = law is not None or (1e7 <= n_law <= 1e11 and 1e7 <= eq["optimal_params"] <= 1e11)
    nums.update(same_compute=eq, same_compute_law="fitted" if law is not None else "Chinchilla (nats, MassiveText)")
    n_alt = eq["optimal_params"] if in_range else nums["optimal_params"]
    d_alt = eq["optimal_tokens"] if in_range else opt * nums["optimal_params"]
    count_alt = law_used.param_count if in_range else count
    depth_txt = ""
    try:
        from nanochat.scaling import depth_for_params

        dd, dn = depth_for_params(n_alt, count=count_alt, depths=range(1, 65), **_shape_kwargs(run))
        nums["optimal_depth"] = dd
        if run.knows.builds_model:
            depth_txt = (f", nanochat depth {dd}" if 1 / 1.5 <= dn / n_alt <= 1.5 else
                         f", {'smaller' if n_alt < dn else 'larger'} than depth {dd}, the nearest the depth dial gives")
    except Exception:  # noqa: BLE001 -- a shape this version cannot build
        pass
    size = f"{n_alt / n_run:.2g}x {'bigger' if n_alt > n_run else 'smaller'} model ({_fmt(n_alt)} params{depth_txt})"
    if in_range:
        alt = (f"the same {eq['compute']:.3g} FLOPs as a {size} on {_fmt(d_alt)} tokens would reach "
               f"{eq['law_loss_gap']:.3g} lower loss under {nums['same_compute_law']}; this run's loss costs that model "
               f"{eq['compute_fraction_needed']:.2g}x the compute")
    else:
        alt = (f"the same {6 * n_run * D:.3g} FLOPs as a {size} on {_fmt(d_alt)} tokens sits at the ratio's optimum "
               "(how much lower its loss would be is not quantified: Chinchilla's law was fitted on 70M-16B parameters; "
               "pass --fit with your own sweep)")
    m = ratio / opt
    if m > 3:
        return Finding(name, "warn", f"{m:.2g}x past compute-optimal: {where}", nums,
                       "The loss keeps falling past the compute-optimal point, with power-law diminishing returns (see "
                       f"the loss-curve finding): expected, not a bug. For the lowest loss per training FLOP, {alt}. "
                       "Staying small is right if the model will serve many tokens (scripts/plan.py --inference-tokens).",
                       severity=5 * math.log(m))
    if m < 1 / 3:
        return Finding(name, "warn", f"under-trained for its size ({m:.2g}x the optimal ratio): {where}", nums,
                       f"The model is large for its data: {alt}; or train this one longer.",
                       severity=5 * abs(math.log(m)))
    return Finding(name, "ok", f"within 3x of compute-optimal ({m:.2g}x): {where}", nums)


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


def check_mfu(run: Run, gpu: str | None = None, peak_tflops: float | None = None) -> Finding:
    """Median MFU, renormalised from the peak the run divided by to the dense bf16 peak of the GPU that ran.

    nanoGPT divides by an A100's 312 TFLOP/s whatever GPU ran; nanochat (ours and karpathy's) and llm.c by
    the detected GPU's peak (the format declares it). The GPU: `peak_tflops` if given, else `gpu` looked
    up in nanochat.gpus, else the device the run recorded. MFU_true = MFU_logged x peak_logged / peak_gpu.
    An unknown GPU name is a line in the finding, never a refusal."""
    name = "mfu"
    device = str(run.env.get("device_name") or run.info.get("gpu_name") or run.args.get("device_type") or "")
    steps, mfu = run.series("mfu")
    mfu = mfu[np.isfinite(mfu) & (mfu > 0)] if len(mfu) else mfu
    if device.lower().startswith(("cpu", "mps")) and not (gpu or peak_tflops):
        return Finding(name, "skip", f"MFU is not measured on {device} (no known peak FLOP/s); judge CPU speed by tok/s")
    if len(mfu) == 0:
        return Finding(name, "skip", "no MFU values logged" + (f" on {device}" if device else ""), {"device": device})
    skip = max(5, len(mfu) // 10)  # compile and warm-up steps are not representative
    body = mfu[skip:] if len(mfu) > skip + 5 else mfu
    logged = float(np.median(body))
    peak_logged = _num(run.knows.mfu_peak_flops) or _num(run.env.get("peak_flops"))
    nums = dict(device=device, median_mfu_logged=logged, logged_peak_flops=peak_logged, steps_used=len(body))
    unknown = ""
    if peak_tflops:
        target = (f"given {peak_tflops:g} TFLOP/s GPU", peak_tflops * 1e12)
    else:
        entry = find_gpu(gpu) if gpu else (find_gpu(device) if device else None)
        target = (entry.name, entry.peak_flops) if entry else None
        if gpu and entry is None:
            unknown = (f"--gpu {gpu!r} is not in the peak table (nanochat/gpus.py; scripts/diagnose.py --gpu list): "
                       "give --peak-tflops N (dense bf16) to re-base")
            nums["unknown_gpu"] = gpu
    if peak_logged is None:
        return Finding(name, "skip" if target is None else "info",
                       f"median logged MFU {logged:.1%}, but the run does not say which peak it divides by; "
                       "cannot renormalise" + (f"; {unknown}" if unknown else ""), nums)
    if target is None:
        note = run.knows.mfu_peak_note or f"relative to {peak_logged / 1e12:.0f} TFLOP/s"
        return Finding(name, "info", f"median logged MFU {logged:.1%} ({note}); "
                       + (unknown or "give --gpu NAME (or --peak-tflops N) to re-base it on the GPU that ran"), nums,
                       "e.g. --gpu h100, --gpu 4090, --peak-tflops 165")
    label, peak = target
    true = logged * peak_logged / peak
    nums.update(gpu=label, gpu_peak_flops=peak, median_mfu=true, achieved_flops=logged * peak_logged,
                expected_low=EXPECTED_MFU[0], expected_high=EXPECTED_MFU[1])
    rebased = abs(peak_logged - peak) > 0.01 * peak
    what = (f"median MFU {true:.1%} of the {label}'s {peak / 1e12:.0f} TFLOP/s dense bf16 peak"
            + (f" (logged {logged:.1%} of {peak_logged / 1e12:.0f} TFLOP/s: {logged * peak_logged / 1e12:.0f} TFLOP/s achieved)"
               if rebased else ""))
    if true > 0.95:
        return Finding(name, "warn", f"{what}: above what any GPU reaches", nums,
                       f"The run cannot have used a {label}: check --gpu (and the program's own FLOP count).", severity=20)
    if true < WARN_MFU:
        dtype = str(run.env.get("dtype", ""))
        hint = "the run is in fp32: use bf16 on SM80+ GPUs; " if "32" in dtype else ""
        return Finding(name, "warn", f"{what}: the GPU is underused (bf16 runs of this kind reach "
                       f"~{EXPECTED_MFU[0]:.0%}-{EXPECTED_MFU[1]:.0%})", nums,
                       hint + "turn on torch.compile, raise the micro-batch to fill memory (fewer gradient-accumulation "
                       "passes), check the data loader keeps up (dt spikes) and evaluate less often; small models "
                       "(width < 1024) cannot fill a large GPU: use a smaller card or a bigger model.",
                       severity=10 * (WARN_MFU - true) / WARN_MFU + 1)
    return Finding(name, "ok", what + ("; the logged figure understates it" if rebased and true > logged else ""), nums)


def _bytes_per_token(run: Run) -> float | None:
    for d in (run.info, run.sizing, run.info.get("eval") or {}, run.info.get("data") or {}):
        for k in ("bytes_per_token", "val_bytes_per_token"):
            if _num(d.get(k)):
                return float(d[k])
    return _num(run.last("bytes_per_token"))


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
    dropout = (_num(run.args.get("dropout")) or _num((run.info.get("model_config") or {}).get("dropout"))
               or _num(run.info.get("dropout")))
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
    n_iter = _num(sz.get("num_iterations"))
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
    tps = _num(sz.get("tokens_per_step"))
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
    planned = _num(sz.get("total_tokens")) or float(D_all[-1])
    if grid is not None:
        lr, n_grid, has_plan = grid
        s1_grid = np.concatenate([[0.0], np.cumsum(lr[:-1])]) * tps  # LR-weighted tokens before each step
        s2_grid = annealing_area(lr)
        at = np.clip(steps_all, 0, n_grid)  # steps may be fractional: a smoothed loss read at its lag
        S1, S2 = np.interp(at, np.arange(n_grid + 1), s1_grid), np.interp(at, np.arange(n_grid + 1), s2_grid)
        warm = _num(sz.get("warmup_steps"))
        if warm is None:
            warm = float(np.argmax(lr >= 0.99 * lr.max()))
        end = (float(s1_grid[-1] + lr[-1] * tps), float(s2_grid[-1])) if has_plan else None
        used = ("LR-weighted tokens, with the warmdown's annealing term" if float(s2_grid[-1]) > 0 else
                "tokens (the LR stays at its peak: no warmdown term)")
    else:
        S1, S2, warm, end, has_plan = D_all, None, _num(sz.get("warmup_steps")) or 0, None, False
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
               f"planned {_fmt(planned)} tokens, {pm(1, p2)} at 2x, {pm(2, p10)} at 10x" + owed_text)
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


def _check_schedule_ours(run: Run, tolerance: float = 0.02) -> Finding:
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


def check_schedule(run: Run, tolerance: float = 0.02) -> Finding:
    if run.sizing.get("warmdown_ratio") is not None:  # nanochat's trapezoid, recorded in full
        return _check_schedule_ours(run, tolerance)
    name = "schedule"
    steps = run.series("step")[1]
    n_iter = _num(run.sizing.get("num_iterations"))
    if len(steps) == 0:
        return Finding(name, "skip", "no steps logged")
    if n_iter is None:
        why = "; ".join(s for s in run.skipped if "config" in s)
        return Finding(name, "skip", f"the planned number of steps is not in the {run.format}" + (f" ({why})" if why else ""))
    done = int(steps[-1])
    lr = run.series("lr")[1]
    nums = dict(step=done, num_iterations=n_iter, progress=done / n_iter, schedule=run.sizing.get("schedule"),
                lr_multiplier=float(lr[-1]) if len(lr) else None)
    at = f"at step {done}/{int(n_iter)} ({done / n_iter:.0%})" + (f", LR at {lr[-1]:.2f}x its peak" if len(lr) else "")
    if done < n_iter - 1:
        return Finding(name, "info", at + ": unfinished", nums,
                       "Losses before the end of the LR decay are higher than the run's final loss will be; compare runs at their ends.")
    return Finding(name, "ok", at, nums)


CHECKS = (check_param_count, check_tokens_ratio, check_mfu, check_val_vs_train, check_spikes, check_loss_curve,
          check_schedule)
_STATUS_RANK = {"warn": 0, "info": 1, "ok": 2, "skip": 3}


def diagnose(run: Run, law=None, gpu: str | None = None, peak_tflops: float | None = None) -> list[Finding]:
    """All checks, ranked: warnings by severity (the most consequential first), then info, ok, skip.
    `law` (a fitted scaling.LossLaw) sets the compute-optimal ratio; `gpu` / `peak_tflops` re-base MFU."""
    out = []
    for check in CHECKS:
        try:
            if check is check_tokens_ratio:
                out.append(check(run, law=law))
            elif check is check_mfu:
                out.append(check(run, gpu=gpu, peak_tflops=peak_tflops))
            else:
                out.append(check(run))
        except Exception as e:  # noqa: BLE001 -- one broken check must not hide the others
            out.append(Finding(check.__name__.removeprefix("check_"), "skip", f"check failed: {type(e).__name__}: {e}"))
    order = {c.__name__.removeprefix("check_"): i for i, c in enumerate(CHECKS)}
    return sorted(out, key=lambda f: (_STATUS_RANK.get(f.status, 9), -f.severity, order.get(f.check, 99)))


def report(run: Run, findings: list[Finding]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "info": "info", "skip": "skip"}
    fmt = run.format
    lines = [f"run: {run.path} ({fmt})"] + [f"  note: {p}" for p in run.problems]
    lines += [f"  not in this format: {s}" for s in run.skipped]
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. [{mark.get(f.status, f.status)}] {f.check}: {f.summary}")
        if f.advice and f.status in ("warn", "info"):
            lines.append(f"       -> {f.advice}")
    return "\n".join(lines)


def to_json(run: Run, findings: list[Finding]) -> dict:
    return {"run": str(run.path), "source": run.source, "problems": run.problems, "skipped": run.skipped,
            "findings": [asdict(f) for f in findings]}


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
