"""Size checks: is the model the size its author meant (param_count), and how many tokens per parameter
it trains on against the compute-optimal ratio (tokens_ratio)."""

from __future__ import annotations

import math

from nanochat.doctor import Finding, fmt, num
from nanochat.run_formats import Run
from nanochat.run_formats._text import size_value
from nanochat.run_formats.shapes import explain_size_gap
from nanochat.scaling import CHINCHILLA, CHINCHILLA_TOKENS_PER_PARAM
from nanochat.sizing import COMPUTE_OPTIMAL_RATIO

CHINCHILLA_RATIO = CHINCHILLA_TOKENS_PER_PARAM


def _gpt_config(model_config: dict):
    """GPTConfig from run.json's model_config, ignoring keys this version does not know."""
    import dataclasses

    from nanochat.gpt import GPTConfig

    known = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in model_config.items() if k in known})


def params(run: Run) -> tuple[float | None, float | None]:
    """(scaling, total) parameters as instantiated, else from the config's closed form."""
    s, t = num(run.sizing.get("scaling_params")), num(run.sizing.get("num_params"))
    if (s is None or t is None) and run.info.get("model_config"):
        try:
            from nanochat.sizing import count_params

            c = count_params(_gpt_config(run.info["model_config"]))
            s, t = s or float(c["scaling"]), t or float(c["total"])
        except Exception:  # noqa: BLE001 -- a config this version cannot build: leave unknown
            pass
    return s, t


def tokens_trained(run: Run) -> float | None:
    return num(run.last("tokens")) or num(run.sizing.get("total_tokens"))


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
    rec_total, rec_scaling = num(run.sizing.get("num_params")), num(run.sizing.get("scaling_params"))
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
                    issues.append(f"{ref_label} {kind} count {fmt(ref)} != {label} {fmt(v)} ({v / ref:.2f}x)")
        if isinstance(run.args.get("depth"), int) and run.args["depth"] > 0:
            try:
                dial = count_params(_depth_dial_config(run, mc))["total"]
                nums["depth_dial_total"] = dial
                if c and abs(dial - c["total"]) > 0.01 * dial:
                    issues.append(f"--depth={run.args['depth']} implies {fmt(dial)} parameters but the config "
                                  f"has {fmt(c['total'])} ({c['total'] / dial:.2f}x; n_layer={mc.get('n_layer')}, "
                                  f"n_embd={mc.get('n_embd')})")
            except Exception:  # noqa: BLE001 -- flags this version does not understand
                pass
    tag = str(run.args.get("model_tag") or run.path.name)
    declared = size_value(tag)
    actual = nums.get("instantiated_total") or rec_total or nums.get("declared_total")
    if declared:
        nums["tag_declared"] = declared
        if actual and not (1 / 1.5 <= actual / declared <= 1.5):
            issues.append(f"the tag {tag!r} declares ~{fmt(declared)} parameters but the model has "
                          f"{fmt(actual)} ({actual / declared:.2f}x)")
    if actual is None:
        return Finding(name, "skip", "run.json has neither model_config nor sizing.num_params", nums)
    if issues:
        return Finding(name, "warn", "; ".join(issues), nums,
                       "Check n_layer / n_embd / n_head / vocab_size in the config against what you meant "
                       "(sizing.model_config(depth) gives the intended shape); fix before comparing runs.")
    scaling = nums.get("instantiated_scaling") or rec_scaling
    return Finding(name, "ok", f"parameter count consistent: {fmt(actual)} total"
                   + (f", {fmt(scaling)} scaling" if scaling else ""), nums)


def check_param_count(run: Run) -> Finding:
    """Parameter count. A nanochat model (`knows.builds_model`): built from its config, against the depth
    dial and the tag. Otherwise the count the program printed (part by part, or one figure in the
    convention `knows.printed_params` names), the closed form of the recorded shape, and every size
    claimed in comments, names and file names, with the likeliest change of shape behind a gap."""
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
            return Finding(name, "warn", f"the printed parts sum to {fmt(parts)} but the printed total is "
                           f"{fmt(table['total'])}", nums, "The log was edited or mixes two runs.", severity=50)
        return Finding(name, "ok", f"{fmt(table.get('total', parts))} parameters as printed by base_train "
                       f"({fmt(nums['scaling_params'] or 0)} scaling: transformer matrices + LM head)", nums)
    if not counts and num(run.sizing.get("num_params")):  # a count the run printed, without the shape behind it
        total, scaling = num(run.sizing["num_params"]), num(run.sizing.get("scaling_params"))
        return Finding(name, "ok", f"{fmt(total)} parameters as the run recorded them"
                       + (f" ({fmt(scaling)} scaling: block matrices + LM head)" if scaling else "")
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
    pe_note = (f"the printed count is {run.knows.printed_params} ({fmt(counts['printed'])} that way, {fmt(counts['total'])} "
               "in all)" if run.knows.printed_params and counts["printed"] != counts["total"] else
               f"{fmt(counts['total'])} parameters in all")
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
        issues.append(f"{c['where']} says {c['text']!r} but the model has {fmt(counts['total'])} parameters "
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
    return f"{fields} gives {fmt(g['count'])}{known}"


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
    scaling, total = params(run)
    so_far, planned = tokens_trained(run), num(run.sizing.get("total_tokens"))
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
    where = f"{fmt(D)} tokens {when} = " + ", ".join(parts)
    if planned and so_far and so_far < 0.999 * planned:
        where += f"; so far {fmt(so_far)} = {so_far / n_run:.3g} per {count} parameter"
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
    size = f"{n_alt / n_run:.2g}x {'bigger' if n_alt > n_run else 'smaller'} model ({fmt(n_alt)} params{depth_txt})"
    if in_range:
        alt = (f"the same {eq['compute']:.3g} FLOPs as a {size} on {fmt(d_alt)} tokens would reach "
               f"{eq['law_loss_gap']:.3g} lower loss under {nums['same_compute_law']}; this run's loss costs that model "
               f"{eq['compute_fraction_needed']:.2g}x the compute")
    else:
        alt = (f"the same {6 * n_run * D:.3g} FLOPs as a {size} on {fmt(d_alt)} tokens sits at the ratio's optimum "
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
