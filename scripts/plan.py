"""What model to train with this budget, given how much it will serve.

    python scripts/plan.py --flops 1e20
    python scripts/plan.py --gpu-hours 24 --gpu h100 --mfu 0.45 --inference-tokens 1e12
    python scripts/plan.py --flops 3e17 --fit fit.json --json     # fit.json from scaling_fit.py --json

Two plans side by side, from a loss law L(N, D) = E + A/N^alpha + B/D^beta:
  chinchilla       the (N, D) with the lowest predicted loss for training compute C = 6ND;
  inference-aware  the (N, D) reaching that same predicted loss with the smallest lifetime cost
                   6ND + 2N D_inf (Sardana et al., arXiv 2401.00448): smaller, trained longer.
Break-even inference volume := the smallest D_inf at which the inference-aware plan's lifetime cost is
--saving-pct percent below the Chinchilla plan's (both serving D_inf tokens).

Each N is mapped to the nanochat depth whose parameter count (the count the law was fitted with) is
closest; batch, steps and wall time follow from nanochat.sizing for that depth.
"""

import argparse
import json
import math
import os
import sys

if not __package__:  # `python scripts/plan.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import scaling as sc

DEFAULT_LAW_NOTE = ("Epoch AI's refit of Chinchilla (arXiv 2404.10102): all-parameter counting, loss in nats per "
                    "token on MassiveText. Absolute losses are indicative only; pass --fit with your own sweep's fit.")


def realise(law: sc.LossLaw, N: float, D: float, shape: dict, peak: float | None, mfu: float, num_gpus: int,
            keep_loss: float | None = None, inference_tokens: float = 0.0, depths=range(2, 65)) -> dict:
    """The nanochat run closest to (N, D): depth, tokens, batch, steps, FLOPs, wall time.

    Depths are discrete, so the depth's own token count is re-derived: at equal 6ND (Chinchilla plan:
    the depth nearest N), or, with `keep_loss`, the tokens that bring a depth to the plan's predicted
    loss, choosing among the depths around N the one with the lowest lifetime cost.
    """
    from nanochat.sizing import auto_total_batch_size, count_params, flops_per_token, model_config, reference_tokens

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
            raise SystemExit(f"error: no depth in {min(depths)}..{max(depths)} reaches the predicted loss {keep_loss:.4g}")
        _, depth, n_depth, D_depth = best
    cfg = model_config(depth, **shape)
    counts = count_params(cfg)
    ratio = D_depth / counts["scaling"]  # tokens per scaling parameter, the ratio base_train takes
    batch = auto_total_batch_size(D_depth, reference_tokens(cfg, ratio))
    steps = max(1, round(D_depth / batch))
    flops = flops_per_token(cfg) * steps * batch
    out = dict(N=N, D=D, tokens_per_param=D / N, predicted_loss=float(law.loss(N, D)), train_flops_6ND=6 * N * D,
               depth=depth, depth_params=n_depth, depth_scaling_params=counts["scaling"],
               depth_total_params=counts["total"], depth_tokens=D_depth,
               depth_predicted_loss=float(law.loss(n_depth, D_depth)),
               target_param_data_ratio=ratio, total_batch_size=batch, num_iterations=steps, train_flops=flops,
               clipped=depth in (min(depths), max(depths)))
    if peak:
        out["wall_hours"] = flops / (peak * mfu * num_gpus) / 3600
        out["gpu_hours"] = out["wall_hours"] * num_gpus
    return out


def make_plan(args) -> dict:
    if args.fit:
        try:
            with open(args.fit) as f:
                law = sc.LossLaw.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --fit {args.fit}: {e} (expected the output of scripts/scaling_fit.py --json)") from None
        law_note = f"fitted law from {args.fit} ({law.param_count} parameters, loss in {law.loss_unit})"
    else:
        law, law_note = sc.EPOCH_AI, DEFAULT_LAW_NOTE
    if args.param_count:
        law = sc.LossLaw(**{**law.to_dict(), "param_count": args.param_count})
    from nanochat.common import get_peak_flops

    peak = get_peak_flops(args.gpu)
    if args.flops:
        C, budget_note = args.flops, f"C = {args.flops:.3g} FLOPs"
    else:
        if peak is None:
            raise SystemExit(f"error: unknown --gpu {args.gpu!r}: no peak FLOP/s on record; give --flops instead")
        C = args.gpu_hours * 3600 * peak * args.mfu
        budget_note = (f"C = {args.gpu_hours:g} GPU-hours x {peak:.3g} peak FLOP/s ({args.gpu}) x MFU {args.mfu:g} "
                       f"= {C:.3g} FLOPs")
    shape = dict(aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                 vocab_size=args.vocab_size)
    ia = sc.inference_plan(law, C, args.inference_tokens)
    plans = {}
    for key in ("chinchilla", "inference_aware"):
        p = ia[key]
        plans[key] = realise(law, p["N"], p["D"], shape, peak, args.mfu, args.num_gpus,
                             keep_loss=ia["loss"] if key == "inference_aware" else None,
                             inference_tokens=args.inference_tokens)
        plans[key]["lifetime_flops"] = p["total_flops"]
    breakeven = sc.breakeven_inference_tokens(law, C, args.saving_pct / 100)
    return dict(budget_flops=C, budget=budget_note, law=law.to_dict(), law_note=law_note,
                inference_tokens=args.inference_tokens, gpu=args.gpu, mfu=args.mfu, num_gpus=args.num_gpus,
                peak_flops=peak, predicted_loss=ia["loss"], saving=ia["saving"],
                saving_pct=args.saving_pct, breakeven_inference_tokens=breakeven,
                breakeven_definition=(f"smallest D_inf at which the inference-aware plan's lifetime cost "
                                      f"(6ND + 2N D_inf) is {args.saving_pct:g}% below the Chinchilla plan's"),
                plans=plans)


def print_plan(out: dict) -> None:
    fmt = lambda x: f"{x:.3g}"  # noqa: E731
    unit = out["law"]["loss_unit"]
    print(f"budget: {out['budget']}")
    print(f"law:    {out['law_note']}")
    print(f"        E={out['law']['E']:.4g} A={out['law']['A']:.4g} B={out['law']['B']:.4g} "
          f"alpha={out['law']['alpha']:.4g} beta={out['law']['beta']:.4g}")
    print(f"serving D_inf = {fmt(out['inference_tokens'])} tokens; both plans reach predicted loss "
          f"{out['predicted_loss']:.4f} ({unit})")
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    count = out["law"]["param_count"]
    rows = [
        (f"N ({count} params)", fmt(ch["N"]), fmt(ia["N"])),
        ("D (training tokens)", fmt(ch["D"]), fmt(ia["D"])),
        ("tokens per param", f"{ch['tokens_per_param']:.1f}", f"{ia['tokens_per_param']:.1f}"),
        ("training FLOPs 6ND", fmt(ch["train_flops_6ND"]), fmt(ia["train_flops_6ND"])),
        ("lifetime FLOPs", fmt(ch["lifetime_flops"]), fmt(ia["lifetime_flops"])),
        ("nanochat depth", str(ch["depth"]) + (" (range edge)" if ch["clipped"] else ""),
         str(ia["depth"]) + (" (range edge)" if ia["clipped"] else "")),
        (f"  its {count} params", fmt(ch["depth_params"]), fmt(ia["depth_params"])),
        ("  its scaling / total", f"{fmt(ch['depth_scaling_params'])} / {fmt(ch['depth_total_params'])}",
         f"{fmt(ia['depth_scaling_params'])} / {fmt(ia['depth_total_params'])}"),
        ("  its training tokens", fmt(ch["depth_tokens"]), fmt(ia["depth_tokens"])),
        (f"  predicted loss ({unit})", f"{ch['depth_predicted_loss']:.4f}", f"{ia['depth_predicted_loss']:.4f}"),
        ("  --target-param-data-ratio", f"{ch['target_param_data_ratio']:.1f}", f"{ia['target_param_data_ratio']:.1f}"),
        ("  total batch (tokens)", str(ch["total_batch_size"]), str(ia["total_batch_size"])),
        ("  steps", str(ch["num_iterations"]), str(ia["num_iterations"])),
        ("  training FLOPs (sizing)", fmt(ch["train_flops"]), fmt(ia["train_flops"])),
    ]
    if "wall_hours" in ch:
        rows.append((f"  wall time on {out['num_gpus']}x {out['gpu']} @ MFU {out['mfu']:g}",
                     f"{ch['wall_hours']:.3g} h", f"{ia['wall_hours']:.3g} h"))
    w = max(len(r[0]) for r in rows) + 2
    print(f"{'':<{w}}{'chinchilla':>20}{'inference-aware':>20}")
    for name, a, b in rows:
        print(f"{name:<{w}}{a:>20}{b:>20}")
    print("(depth rows: Chinchilla takes the nearest depth at 6ND = C; inference-aware the cheapest depth near N "
          "trained to the same loss)")
    print(f"inference-aware saves {out['saving']:.1%} of lifetime FLOPs at D_inf = {fmt(out['inference_tokens'])}")
    be = out["breakeven_inference_tokens"]
    print(f"break-even: {out['breakeven_definition']}: "
          + (f"D_inf = {fmt(be)} tokens" if be else "never reached (the saving saturates below it)"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--flops", type=float, help="training compute budget C in FLOPs (C = 6ND)")
    g.add_argument("--gpu-hours", type=float, help="budget in GPU-hours, converted with --gpu and --mfu")
    p.add_argument("--gpu", default="h100", help="GPU name for peak FLOP/s (nanochat.common.get_peak_flops)")
    p.add_argument("--mfu", type=float, default=0.45, help="expected model FLOPs utilisation")
    p.add_argument("--num-gpus", type=int, default=8, help="GPUs running in parallel (wall time only)")
    p.add_argument("--inference-tokens", type=float, default=0.0, help="expected lifetime inference volume D_inf")
    p.add_argument("--saving-pct", type=float, default=10.0, help="saving that defines the break-even D_inf")
    p.add_argument("--fit", default=None, help="JSON from scripts/scaling_fit.py --json (default: Epoch AI constants)")
    p.add_argument("--param-count", choices=("scaling", "total"), default=None,
                   help="override which nanochat parameter count the law's N is matched against")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    budget = args.flops if args.flops is not None else args.gpu_hours
    if not (budget > 0 and math.isfinite(budget)):
        p.error("the budget (--flops or --gpu-hours) must be a positive number")
    if not 0 < args.mfu <= 1:
        p.error("--mfu is a fraction in (0, 1], e.g. 0.45")
    if args.inference_tokens < 0 or args.num_gpus < 1 or not 0 < args.saving_pct < 100:
        p.error("--inference-tokens >= 0, --num-gpus >= 1 and 0 < --saving-pct < 100")
    out = make_plan(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_plan(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
