"""Run doctor: what is off in a training run -- ours or another program's -- ranked, with numbers and fixes.

    python scripts/diagnose.py ~/.cache/nanochat/base_checkpoints/d12 [--json]
    python scripts/diagnose.py d12                                   # a model tag under <base>/base_checkpoints/
    python scripts/diagnose.py train.log --config config/train_gpt2.py --gpu "RTX 4070"   # a nanoGPT console log
    python scripts/diagnose.py base_train.log                        # karpathy/nanochat or our own base_train output
    python scripts/diagnose.py out/checkpoint-500 --tokens-per-step 524288   # a Hugging Face Trainer folder
    python scripts/diagnose.py runs/ --gpu h100                      # TensorBoard event files
    python scripts/diagnose.py llmc.log                              # llm.c or modded-nanogpt output
    python scripts/diagnose.py history.csv --config my_config.py     # a wandb history export (CSV or JSONL)
    python scripts/diagnose.py d12 --fit fit.json                    # compute-optimal ratio from your own scaling fit

The format is detected from the file (nanochat/run_formats/); the checks are in nanochat/diagnose.py.
Exit status 0 whatever it finds (2 for a bad path or file); --strict makes warnings exit 1.
"""

import argparse
import json
import os
import sys

if not __package__:  # `python scripts/diagnose.py`: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.diagnose import diagnose, load_run, report, to_json
from nanochat.gpus import GPUS
from nanochat.run_formats import RunFormatError


def resolve_run_path(arg: str) -> str:
    """A path as given, else a model tag under <base>/base_checkpoints/."""
    if os.path.exists(arg):
        return arg
    from nanochat.run_dir import run_dir

    try:
        candidate = run_dir("base", arg)
    except ValueError:
        return arg
    return str(candidate) if candidate.is_dir() else arg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", nargs="?", help="run folder, model tag, training log, HF Trainer / TensorBoard folder, or wandb "
                   "history .csv/.jsonl")
    p.add_argument("--config", default=None, help="the run's config .py (nanoGPT style; read with ast, never executed)")
    p.add_argument("--gpu", default=None, help="the GPU that ran it (e.g. h100, 4090, \"NVIDIA GeForce RTX 4070\"): re-bases "
                   "MFU on its dense bf16 peak; --gpu list prints the table")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak in TFLOP/s, for a card "
                   "not in the table (overrides --gpu)")
    p.add_argument("--tokens-per-step", type=float, default=None, help="tokens per optimizer step, for formats that do "
                   "not record it (HF Trainer, TensorBoard, modded-nanogpt)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")
    p.add_argument("--fit", default=None, help="JSON from scripts/scaling_fit.py --json: its law sets the optimal ratio")
    p.add_argument("--strict", action="store_true", help="exit 1 when any check warns")
    args = p.parse_args(argv)
    if args.gpu == "list":
        print("dense bf16 peak TFLOP/s (GeForce cards at the FP32-accumulate rate; V100/T4: fp16, no bf16)")
        for gpu in GPUS:
            print(f"  {gpu.name:<18} {gpu.peak_flops / 1e12:8.1f}  {gpu.source}")
        return 0
    if args.path is None:
        p.error("give a run folder, model tag or log file")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak-tflops must be a positive number of TFLOP/s, got {args.peak_tflops}")
    try:
        run = load_run(resolve_run_path(args.path), config=args.config, tokens_per_step=args.tokens_per_step)
    except (FileNotFoundError, RunFormatError) as e:
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
    findings = diagnose(run, law=law, gpu=args.gpu, peak_tflops=args.peak_tflops)
    print(json.dumps(to_json(run, findings), indent=1, default=str) if args.json else report(run, findings))
    return 1 if args.strict and any(f.status == "warn" for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
