"""The planner: from a compute budget and an inference volume to (N, D), a nanochat depth and flags.

Every view answers one question, `question(out)`: which model reaches the predicted loss of the
compute-optimal model for the training budget C, at the lowest lifetime cost (training 6ND plus
serving 2N per token for D_inf tokens)? (Sardana et al. 2024.) The compute-optimal plan is the N whose
training cost for that loss is lowest (it spends exactly C); the inference-aware plan the N whose
lifetime cost is lowest. It is smaller and trained longer, so its training alone can need more than
C: `make_plan` measures that (`over_budget`) and every view says so.

Used by scripts/plan.py: `make_plan` (the numbers), `print_table` (the side-by-side table), `memo`
(a markdown memo with the closed-form derivation, the constants, the three loss terms, both plans,
the break-even inference volumes and a plot) and `html_page` (one self-contained page with sliders
that opens at the command's C and D_inf; template nanochat/assets/planner.html). The plot and the page
draw the same two curves: FLOPs to reach that loss against N, training only and training + serving.
"""

from __future__ import annotations

import json
import math
from importlib import resources
from pathlib import Path

import numpy as np

from nanochat import scaling as sc
from nanochat.config import TrainConfig
from nanochat.sizing import count_params, model_config, plan_run

DEFAULT_LAW_NOTE = ("Epoch AI's refit of Chinchilla (arXiv 2404.10102): all-parameter counting, loss in nats per "
                    "token on MassiveText. Absolute losses are indicative only; pass --fit with your own sweep's fit.")
LAWS = {"epoch": (sc.EPOCH_AI, DEFAULT_LAW_NOTE),
        "chinchilla": (sc.CHINCHILLA, "Hoffmann et al. 2022 approach 3 as published (all parameters, nats on MassiveText)")}


def realise(law: sc.LossLaw, N: float, D: float, shape: dict, peak: float | None, mfu: float, num_gpus: int,
            keep_loss: float | None = None, inference_tokens: float = 0.0, depths=range(2, 65)) -> dict:
    """The nanochat run closest to (N, D): depth, tokens, batch, steps, FLOPs, wall time, base_train flags.

    Depths are discrete, so the depth's own token count is re-derived: at equal 6ND (Chinchilla plan:
    the depth nearest N), or, with `keep_loss`, the tokens that bring a depth to the plan's predicted
    loss, choosing among the depths around N the one with the lowest lifetime cost.
    """
    depth, n_depth = sc.depth_for_params(N, count=law.param_count, depths=depths, **shape)
    if keep_loss is None:
        D_depth = N * D / n_depth
    else:
        best = None
        for d in (depth - 1, depth, depth + 1):
            if d not in depths:
                continue
            n_d = count_params(model_config(d, **shape))[law.param_count]
            D_d = float(sc.tokens_for_loss(law, n_d, keep_loss))  # inf: too small to ever reach the loss
            cost = sc.lifetime_flops(n_d, D_d, inference_tokens)
            if math.isfinite(cost) and (best is None or cost < best[0]):
                best = (cost, d, n_d, D_d)
        if best is None:
            raise ValueError(f"no depth in {min(depths)}..{max(depths)} reaches the predicted loss {keep_loss:.4g}")
        _, depth, n_depth, D_depth = best
    counts = count_params(model_config(depth, **shape))
    ratio = D_depth / counts["scaling"]  # tokens per scaling parameter, the ratio base_train takes
    # batch, steps and FLOPs exactly as base_train will plan them (sizing.plan_run, the one computation);
    # the micro-batch does not change the plan, so one row per pass keeps every batch size divisible
    train_cfg = TrainConfig(depth=depth, target_param_data_ratio=ratio, device_batch_size=1,
                            **{k: shape[k] for k in ("aspect_ratio", "head_dim", "max_seq_len", "n_kv_head")
                               if k in shape}).with_device_defaults(record_recipe=False)
    plan = plan_run(train_cfg, shape.get("vocab_size", 32768), world_size=1)
    batch, steps, flops = plan.tokens_per_step, plan.num_iterations, plan.total_flops
    flags = (f"--depth={depth} --target-param-data-ratio={ratio:.4g}"
             + (f" --aspect-ratio={shape['aspect_ratio']}" if shape.get("aspect_ratio", 64) != 64 else "")
             + (f" --head-dim={shape['head_dim']}" if shape.get("head_dim", 128) != 128 else "")
             + (f" --max-seq-len={shape['max_seq_len']}" if shape.get("max_seq_len", 2048) != 2048 else ""))
    out = dict(N=N, D=D, tokens_per_param=D / N, predicted_loss=float(law.loss(N, D)), train_flops_6ND=6 * N * D,
               depth=depth, depth_params=n_depth, depth_scaling_params=counts["scaling"],
               depth_total_params=counts["total"], depth_tokens=D_depth,
               depth_predicted_loss=float(law.loss(n_depth, D_depth)),
               target_param_data_ratio=ratio, total_batch_size=batch, num_iterations=steps, train_flops=flops,
               clipped=depth in (min(depths), max(depths)), base_train_flags=flags)
    if peak:
        out["wall_hours"] = flops / (peak * mfu * num_gpus) / 3600
        out["gpu_hours"] = out["wall_hours"] * num_gpus
    return out


def load_law(fit: str | None, law_name: str = "epoch", param_count: str | None = None) -> tuple[sc.LossLaw, str]:
    if fit:
        try:
            with open(fit) as f:
                law = sc.LossLaw.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            raise ValueError(f"--fit {fit}: {e} (expected the output of scripts/scaling_fit.py --json)") from None
        note = f"fitted law from {fit} ({law.param_count} parameters, loss in {law.loss_unit})"
    else:
        law, note = LAWS[law_name]
    if param_count:
        law = sc.LossLaw(**{**law.to_dict(), "param_count": param_count})
    return law, note


def make_plan(law: sc.LossLaw, law_note: str, C: float, budget_note: str, inference_tokens: float, shape: dict,
              gpu: str | None = None, peak: float | None = None, mfu: float = 0.45, num_gpus: int = 8,
              saving_pct: float = 10.0) -> dict:
    ia = sc.inference_plan(law, C, inference_tokens)
    plans = {}
    for key in ("chinchilla", "inference_aware"):
        p = ia[key]
        plans[key] = realise(law, p["N"], p["D"], shape, peak, mfu, num_gpus,
                             keep_loss=ia["loss"] if key == "inference_aware" else None,
                             inference_tokens=inference_tokens)
        plans[key]["lifetime_flops"] = p["total_flops"]
    N0, D0 = plans["chinchilla"]["N"], plans["chinchilla"]["D"]
    terms = dict(E=law.E, params_term=law.A / N0 ** law.alpha, data_term=law.B / D0 ** law.beta)
    breakeven = sc.breakeven_inference_tokens(law, C, saving_pct / 100)
    # the inference-aware model is trained past the budget when it is smaller: how far (1.0 = exactly C)
    over_budget = plans["inference_aware"]["train_flops_6ND"] / C
    return dict(budget_flops=C, budget=budget_note, over_budget=over_budget, law=law.to_dict(), law_note=law_note, G=law.G,
                n_exponent=law.n_exponent, inference_tokens=inference_tokens, gpu=gpu, mfu=mfu, num_gpus=num_gpus,
                peak_flops=peak, predicted_loss=ia["loss"], loss_terms=terms, saving=ia["saving"],
                saving_pct=saving_pct, breakeven_inference_tokens=breakeven,
                breakeven_definition=(f"smallest D_inf at which the inference-aware plan's lifetime cost "
                                      f"(6ND + 2N D_inf) is {saving_pct:g}% below the Chinchilla plan's"),
                inference_equals_training_tokens=3 * D0,
                rule_of_thumb=dict(zip(("N", "D"), (float(v) for v in sc.ratio_optimum(C, sc.CHINCHILLA_TOKENS_PER_PARAM)))),
                plans=plans)


def _f(x: float) -> str:
    return f"{x:.3g}"


def question(out: dict) -> str:
    """The one question the table, the memo, the plot and the page answer."""
    return (f"Which model reaches the predicted loss of the compute-optimal model for {_f(out['budget_flops'])} "
            f"training FLOPs at the lowest lifetime cost, serving D_inf = {_f(out['inference_tokens'])} tokens?")


def budget_warning(out: dict) -> str | None:
    """A line when the inference-aware plan's training alone needs more than the budget (None otherwise)."""
    ratio = out.get("over_budget", 0.0)
    if ratio <= 1.01:  # (the depth rows' rounding to a whole depth is not what this is about)
        return None
    ia = out["plans"]["inference_aware"]
    hours = (f" (as nanochat depth {ia['depth']}: {_f(ia['train_flops'])} FLOPs, ~{ia['gpu_hours']:.3g} GPU-hours on "
             f"{out['gpu']} at MFU {out['mfu']:g})" if ia.get("gpu_hours") is not None else "")
    return (f"warning: the inference-aware plan trains for {_f(ia['train_flops_6ND'])} FLOPs, {ratio:.2g}x the "
            f"budget {_f(out['budget_flops'])}{hours}: it reaches the same loss more cheaply over the model's life only if that "
            f"extra training can be paid. Within the budget, train the compute-optimal plan, or plan with a smaller "
            f"budget until the inference-aware plan's training fits (at a higher loss).")


def print_table(out: dict) -> str:
    unit = out["law"]["loss_unit"]
    lines = [f"question: {question(out)}", f"budget: {out['budget']}", f"law:    {out['law_note']}",
             f"        E={out['law']['E']:.4g} A={out['law']['A']:.4g} B={out['law']['B']:.4g} "
             f"alpha={out['law']['alpha']:.4g} beta={out['law']['beta']:.4g}",
             f"serving D_inf = {_f(out['inference_tokens'])} tokens; both plans reach predicted loss "
             f"{out['predicted_loss']:.4f} ({unit})"]
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    count = out["law"]["param_count"]
    rows = [
        (f"N ({count} params)", _f(ch["N"]), _f(ia["N"])),
        ("D (training tokens)", _f(ch["D"]), _f(ia["D"])),
        ("tokens per param", f"{ch['tokens_per_param']:.1f}", f"{ia['tokens_per_param']:.1f}"),
        ("training FLOPs 6ND", _f(ch["train_flops_6ND"]), _f(ia["train_flops_6ND"])),
        ("lifetime FLOPs", _f(ch["lifetime_flops"]), _f(ia["lifetime_flops"])),
        ("nanochat depth", str(ch["depth"]) + (" (range edge)" if ch["clipped"] else ""),
         str(ia["depth"]) + (" (range edge)" if ia["clipped"] else "")),
        (f"  its {count} params", _f(ch["depth_params"]), _f(ia["depth_params"])),
        ("  its scaling / total", f"{_f(ch['depth_scaling_params'])} / {_f(ch['depth_total_params'])}",
         f"{_f(ia['depth_scaling_params'])} / {_f(ia['depth_total_params'])}"),
        ("  its training tokens", _f(ch["depth_tokens"]), _f(ia["depth_tokens"])),
        (f"  predicted loss ({unit})", f"{ch['depth_predicted_loss']:.4f}", f"{ia['depth_predicted_loss']:.4f}"),
        ("  --target-param-data-ratio", f"{ch['target_param_data_ratio']:.1f}", f"{ia['target_param_data_ratio']:.1f}"),
        ("  total batch (tokens)", str(ch["total_batch_size"]), str(ia["total_batch_size"])),
        ("  steps", str(ch["num_iterations"]), str(ia["num_iterations"])),
        ("  training FLOPs (sizing)", _f(ch["train_flops"]), _f(ia["train_flops"])),
    ]
    if "wall_hours" in ch:
        rows.append((f"  wall time on {out['num_gpus']}x {out['gpu']} @ MFU {out['mfu']:g}",
                     f"{ch['wall_hours']:.3g} h", f"{ia['wall_hours']:.3g} h"))
    w = max(len(r[0]) for r in rows) + 2
    lines.append(f"{'':<{w}}{'chinchilla':>20}{'inference-aware':>20}")
    lines += [f"{name:<{w}}{a:>20}{b:>20}" for name, a, b in rows]
    lines.append("(depth rows: Chinchilla takes the nearest depth at 6ND = C; inference-aware the cheapest depth near N "
                 "trained to the same loss)")
    lines.append(f"inference-aware saves {out['saving']:.1%} of lifetime FLOPs at D_inf = {_f(out['inference_tokens'])}")
    if budget_warning(out):
        lines.append(budget_warning(out))
    be = out["breakeven_inference_tokens"]
    lines.append(f"break-even: {out['breakeven_definition']}: "
                 + (f"D_inf = {_f(be)} tokens" if be else "never reached (the saving saturates below it)"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# FLOPs to reach the plan's loss against N (the plot and the HTML page)


def cost_vs_n(law: sc.LossLaw, loss: float, inference_tokens: float, N) -> tuple[np.ndarray, np.ndarray]:
    """(training FLOPs 6N D(N), lifetime FLOPs 6N D(N) + 2N D_inf) for a model of N parameters trained on the
    D(N) tokens that bring it to `loss` (inf where N alone cannot reach it). The training curve's minimum is
    the compute-optimal N for the budget whose loss this is; the lifetime curve's, the inference-aware N."""
    N = np.asarray(N, dtype=float)
    D = sc.tokens_for_loss(law, N, loss)
    train = 6.0 * N * D
    return train, train + 2.0 * N * inference_tokens


def plot(out: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    law = sc.LossLaw.from_dict(out["law"])
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    n_min = (law.A / (out["predicted_loss"] - law.E)) ** (1 / law.alpha)  # below this N the loss is out of reach
    Ns = np.geomspace(max(n_min * 1.05, min(ia["N"], ch["N"]) / 30), ch["N"] * 30, 600)
    train, life = cost_vs_n(law, out["predicted_loss"], out["inference_tokens"], Ns)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    ax.plot(Ns, train, color="tab:blue", label="training FLOPs to reach the loss")
    ax.plot(Ns, life, color="tab:red", label=f"lifetime FLOPs: + serving {out['inference_tokens']:.3g} tokens")
    ax.axhline(out["budget_flops"], color="gray", ls="--", lw=1, label=f"training budget C = {out['budget_flops']:.3g}")
    ax.plot(ch["N"], ch["train_flops_6ND"], "o", color="tab:blue", label=f"compute-optimal: N={ch['N']:.3g}")
    ax.plot(ia["N"], ia["lifetime_flops"], "o", color="tab:red", label=f"inference-aware: N={ia['N']:.3g}")
    ax.plot(ia["N"], ia["train_flops_6ND"], "o", mfc="none", color="tab:red",
            label=f"inference-aware training: {ia['train_flops_6ND']:.3g}")
    finite = np.concatenate([train[np.isfinite(train)], life[np.isfinite(life)]])
    ax.set(xscale="log", yscale="log", xlabel=f"N ({law.param_count} parameters)", ylabel="FLOPs",
           ylim=(finite.min() / 2, min(finite.max(), finite.min() * 1e3)))
    ax.set_title(f"FLOPs to reach loss {out['predicted_loss']:.4f} (the compute-optimal loss for C = "
                 f"{out['budget_flops']:.3g})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def memo(out: dict, plot_path: str | None = None) -> str:
    """A markdown memo of the plan (the caller writes it; `plot_path` is linked when given)."""
    L = out["law"]
    a, b = L["alpha"], L["beta"]
    C = out["budget_flops"]
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    t = out["loss_terms"]
    unit, count = L["loss_unit"], L["param_count"]
    rt = out["rule_of_thumb"]
    be = out["breakeven_inference_tokens"]
    lines = [
        f"# Training plan for {C:.3g} FLOPs",
        "",
        f"Question: {question(out)}",
        "",
        f"Budget: {out['budget']}. Inference volume over the model's life: D_inf = {_f(out['inference_tokens'])} tokens.",
        "",
        "## The law and its constants",
        "",
        f"L(N, D) = E + A / N^alpha + B / D^beta, N = {count} parameters, D = training tokens, loss in {unit}.",
        f"{out['law_note']}",
        "",
        "| E | A | B | alpha | beta |", "|---|---|---|---|---|",
        f"| {L['E']:.4g} | {L['A']:.4g} | {L['B']:.4g} | {a:.4g} | {b:.4g} |",
        "",
        "## Compute-optimal split (closed form)",
        "",
        "Minimise L(N, D) subject to 6ND = C. With the Lagrangian ℒ = L + λ(6ND − C):",
        "",
        "- ∂ℒ/∂N = −alpha A N^(−alpha−1) + 6λD = 0 and ∂ℒ/∂D = −beta B D^(−beta−1) + 6λN = 0,",
        "- so alpha A / N^alpha = beta B / D^beta at the optimum, and with D = C / 6N:",
        "- N* = G (C/6)^(beta/(alpha+beta)), D* = G^−1 (C/6)^(alpha/(alpha+beta)), "
        "G = (alpha A / (beta B))^(1/(alpha+beta)).",
        "",
        f"Here G = {out['G']:.4g} and beta/(alpha+beta) = {out['n_exponent']:.4f}, so "
        f"**N\\* = {_f(ch['N'])}** and **D\\* = {_f(ch['D'])}** tokens ({ch['tokens_per_param']:.1f} tokens per parameter).",
        f"For comparison, the 20-tokens-per-parameter rule of thumb (N = sqrt(C/120)) gives N = {_f(rt['N'])}, "
        f"D = {_f(rt['D'])}.",
        "",
        "Predicted loss at the optimum, term by term:",
        "",
        "| term | value |", "|---|---|",
        f"| E (irreducible: the entropy of the data; no model or data removes it) | {t['E']:.4f} |",
        f"| A / N*^alpha (finite model) | {t['params_term']:.4f} |",
        f"| B / D*^beta (finite data) | {t['data_term']:.4f} |",
        f"| total | {t['E'] + t['params_term'] + t['data_term']:.4f} |",
        "",
        "## Inference-aware optimum",
        "",
        "Minimise the lifetime cost 6ND + 2N D_inf at the same predicted loss (Sardana et al. 2024): a smaller "
        "model trained longer costs more to train and less to serve.",
        "",
        "| | compute-optimal | inference-aware |", "|---|---|---|",
        f"| N ({count} params) | {_f(ch['N'])} | {_f(ia['N'])} |",
        f"| D (training tokens) | {_f(ch['D'])} | {_f(ia['D'])} |",
        f"| tokens per parameter | {ch['tokens_per_param']:.1f} | {ia['tokens_per_param']:.1f} |",
        f"| training FLOPs | {_f(ch['train_flops_6ND'])} | {_f(ia['train_flops_6ND'])} |",
        f"| lifetime FLOPs | {_f(ch['lifetime_flops'])} | {_f(ia['lifetime_flops'])} |",
        f"| predicted loss ({unit}) | {out['predicted_loss']:.4f} | {out['predicted_loss']:.4f} |",
        f"| nanochat depth | {ch['depth']} | {ia['depth']} |",
        f"| its {count} params / tokens | {_f(ch['depth_params'])} / {_f(ch['depth_tokens'])} | "
        f"{_f(ia['depth_params'])} / {_f(ia['depth_tokens'])} |",
        f"| base_train flags | `{ch['base_train_flags']}` | `{ia['base_train_flags']}` |",
        "",
        f"At D_inf = {_f(out['inference_tokens'])} the inference-aware plan saves {out['saving']:.1%} of lifetime FLOPs.",
        "",
        *([f"**{budget_warning(out)[0].upper()}{budget_warning(out)[1:]}**", ""] if budget_warning(out) else []),
        "Break-even inference volumes:",
        "",
        f"- serving costs as much as training the compute-optimal model at D_inf = 3 D* = {_f(out['inference_equals_training_tokens'])} "
        "tokens (2N D_inf = 6N D);",
        f"- the inference-aware plan saves {out['saving_pct']:g}% of lifetime compute from D_inf = "
        + (f"{_f(be)} tokens." if be else "never (the saving saturates below it)."),
        "",
        "Run either plan with `python -m scripts.base_train <flags>` (torchrun for several GPUs); the depth rows "
        "re-derive the tokens for the discrete depth nearest N.",
    ]
    if "wall_hours" in ch:
        lines += ["", f"Wall time on {out['num_gpus']}x {out['gpu']} at MFU {out['mfu']:g}: {ch['wall_hours']:.3g} h "
                  f"(compute-optimal), {ia['wall_hours']:.3g} h (inference-aware)."]
    if plot_path:
        lines += ["", "The plot answers the same question: FLOPs to reach that loss against N, training only (its "
                  "minimum is the compute-optimal plan) and training + serving (its minimum is the inference-aware "
                  "plan), with the training budget as a dashed line.",
                  "", f"![FLOPs to reach the compute-optimal loss against N]({plot_path})"]
    lines += ["", "Caveats: the constants' absolute losses belong to their data and tokenizer; a law fitted to your "
              "own sweep (scripts/scaling_sweep.py, scripts/scaling_fit.py, then --fit) is the one to plan with."]
    return "\n".join(lines) + "\n"


def html_page(out: dict) -> str:
    """One self-contained HTML page (no network) answering `question`: sliders for the training budget and the
    inference volume, opening at the command's values."""
    template = resources.files("nanochat").joinpath("assets/planner.html").read_text()
    data = dict(law=out["law"], budget=out["budget_flops"], inference_tokens=out["inference_tokens"],
                law_note=out["law_note"])
    return template.replace("/*__PLAN_DATA__*/null", json.dumps(data))
