"""Run doctor: what is off in a training run, with numbers, and what to change.

    python scripts/diagnose.py ~/.cache/nanochat/base_checkpoints/d12 [--json]
    python scripts/diagnose.py d12          # a model tag under <base>/base_checkpoints/
    python scripts/diagnose.py d12 --fit fit.json   # compute-optimal ratio from your own scaling fit

Reads the run folder's metrics.jsonl and run.json (see docs/interfaces.md); logic in nanochat/diagnose.py.
Exit status 0 whatever it finds (2 for a bad path); --strict makes warnings exit 1.
"""

import argparse
import json
import os
import sys

if not __package__:  # `python scripts/diagnose.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.diagnose import diagnose, load_run, report, to_json


def resolve_run_dir(arg: str) -> str:
    if os.path.isdir(arg):
        return arg
    from nanochat.common import get_base_dir

    candidate = os.path.join(get_base_dir(), "base_checkpoints", arg)
    return candidate if os.path.isdir(candidate) else arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="run folder (or a model tag under <base>/base_checkpoints/)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--fit", default=None, help="JSON from scripts/scaling_fit.py --json: its law sets the optimal ratio")
    p.add_argument("--strict", action="store_true", help="exit 1 when any check warns")
    args = p.parse_args(argv)
    try:
        run = load_run(resolve_run_dir(args.run_dir))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    law = None
    if args.fit:
        from nanochat.scaling import LossLaw

        try:
            with open(args.fit) as f:
                law = LossLaw.from_dict(json.load(f))
        except (OSError, ValueError) as e:
            print(f"error: --fit {args.fit}: {e} (expected scripts/scaling_fit.py --json output)", file=sys.stderr)
            return 2
    findings = diagnose(run, law=law)
    print(json.dumps(to_json(run, findings), indent=1, default=str) if args.json else report(run, findings))
    return 1 if args.strict and any(f.status == "warn" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
