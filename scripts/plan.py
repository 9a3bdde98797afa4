"""What model to train with this budget, given how much it will serve.

    python scripts/plan.py --flops 1e20
    python scripts/plan.py --gpu-hours 24 --gpu h100 --mfu 0.45 --inference-tokens 1e12
    python scripts/plan.py --flops 1e22 --inference-tokens 2e13 --memo            # markdown memo to stdout
    python scripts/plan.py --flops 1e22 --inference-tokens 2e13 --memo plan.md    # + plan.png beside it
    python scripts/plan.py --flops 1e22 --inference-tokens 2e13 --html plan.html  # interactive page (no network)
    python scripts/plan.py --flops 3e17 --fit fit.json --json     # fit.json from scaling_fit.py --json

One question, in every view (table, memo, plot, page): which model reaches the predicted loss of the
compute-optimal model for this training budget at the lowest lifetime cost? Two plans side by side,
from a loss law L(N, D) = E + A/N^alpha + B/D^beta:
  chinchilla       the (N, D) with the lowest predicted loss for training compute C = 6ND;
  inference-aware  the (N, D) reaching that same predicted loss with the smallest lifetime cost
                   6ND + 2N D_inf (Sardana et al., arXiv 2401.00448): smaller, trained longer.
Break-even inference volume := the smallest D_inf at which the inference-aware plan's lifetime cost is
--saving-pct percent below the Chinchilla plan's (both serving D_inf tokens). The inference-aware model
trains longer than the budget buys when it is smaller: a warning says by how much. Logic: nanochat/planner.py.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

if not __package__:  # `python scripts/plan.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat import planner


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
    p.add_argument("--fit", default=None, help="JSON from scripts/scaling_fit.py --json (default: --law)")
    p.add_argument("--law", choices=sorted(planner.LAWS), default="epoch", help="published constants to use without --fit")
    p.add_argument("--param-count", choices=("scaling", "total"), default=None,
                   help="override which nanochat parameter count the law's N is matched against")
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--memo", nargs="?", const="-", default=None, metavar="FILE",
                   help="a markdown memo: to stdout, or to FILE with its plot as FILE's stem + .png")
    p.add_argument("--plot", default=None, help="write the loss-vs-N plot to this PNG (with --memo to stdout)")
    p.add_argument("--html", default=None, metavar="FILE", help="write the interactive planner page (self-contained)")
    args = p.parse_args(argv)
    budget = args.flops if args.flops is not None else args.gpu_hours
    if not (budget > 0 and math.isfinite(budget)):
        p.error("the budget (--flops or --gpu-hours) must be a positive number")
    if not 0 < args.mfu <= 1:
        p.error("--mfu is a fraction in (0, 1], e.g. 0.45")
    if args.inference_tokens < 0 or args.num_gpus < 1 or not 0 < args.saving_pct < 100:
        p.error("--inference-tokens >= 0, --num-gpus >= 1 and 0 < --saving-pct < 100")
    try:
        law, law_note = planner.load_law(args.fit, args.law, args.param_count)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from nanochat.common import get_peak_flops

    peak = get_peak_flops(args.gpu)
    if args.flops:
        C, budget_note = args.flops, f"C = {args.flops:.3g} FLOPs"
    else:
        if peak is None:
            print(f"error: unknown --gpu {args.gpu!r}: no peak FLOP/s on record; give --flops instead", file=sys.stderr)
            return 2
        C = args.gpu_hours * 3600 * peak * args.mfu
        budget_note = (f"C = {args.gpu_hours:g} GPU-hours x {peak:.3g} peak FLOP/s ({args.gpu}) x MFU {args.mfu:g} "
                       f"= {C:.3g} FLOPs")
    shape = dict(aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, max_seq_len=args.max_seq_len,
                 vocab_size=args.vocab_size)
    try:
        out = planner.make_plan(law, law_note, C, budget_note, args.inference_tokens, shape, gpu=args.gpu, peak=peak,
                                mfu=args.mfu, num_gpus=args.num_gpus, saving_pct=args.saving_pct)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    warning = planner.budget_warning(out)
    if warning and (args.html or args.memo is not None or args.json):  # the table prints it in place
        print(warning, file=sys.stderr)
    if args.html:
        Path(args.html).write_text(planner.html_page(out))
        print(f"wrote {args.html}", file=sys.stderr)
    if args.memo is not None:
        if args.memo == "-":
            plot_path = planner.plot(out, args.plot) if args.plot else None
            sys.stdout.write(planner.memo(out, str(plot_path) if plot_path else None))
        else:
            memo_path = Path(args.memo)
            plot_path = planner.plot(out, args.plot or memo_path.with_suffix(".png"))
            rel = os.path.relpath(plot_path, memo_path.parent)
            memo_path.write_text(planner.memo(out, rel))
            print(f"wrote {memo_path} and {plot_path}", file=sys.stderr)
    elif args.json:
        print(json.dumps(out))
    elif not args.html:
        print(planner.print_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
