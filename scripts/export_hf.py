"""Export a checkpoint to a Hugging Face transformers folder (native `nanochat` type or remote code).

    python -m scripts.export_hf --source sft --out hf/d20-chat                 # latest sft checkpoint, auto format
    python -m scripts.export_hf --source base --model-tag d12 --step 5000 --out hf/d12 --format remote --dtype bf16
    python -m scripts.export_hf --source base --out hf/d12 --format native      # fails, listing what does not fit

Then `AutoModelForCausalLM.from_pretrained(DIR)` (native) or `..., trust_remote_code=True` (remote),
and `AutoTokenizer.from_pretrained(DIR)`; see docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # `python scripts/export_hf.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.hf_export import DEFAULT_MAX_SHARD_BYTES, DTYPES, FORMATS, ExportError, export  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a nanochat checkpoint as a Hugging Face model folder")
    p.add_argument("--source", default="base", choices=["base", "mid", "sft", "rl"], help="training phase")
    p.add_argument("--model-tag", default=None, help="model tag (default: the phase's most recent)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--out", required=True, help="output folder (created; its model files are replaced)")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="native = transformers' built-in nanochat type (plain configs only), remote = custom "
                        "code in the folder (any config), auto = native when it fits")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weight dtype in the files")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
                   help="split model.safetensors into shards above this size")
    p.add_argument("--name", default=None, help="model name for the card (default: nanochat d<depth> (<source>))")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanochat.checkpoint_manager import CheckpointError, find_last_tag, load_model
    from nanochat.run_dir import phase_dir, run_dir

    try:
        tag = args.model_tag or find_last_tag(phase_dir(args.source))
        model, tokenizer, meta = load_model(args.source, "cpu", model_tag=tag, step=args.step,
                                            compute_dtype=torch.float32)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    try:
        result = export(model.config, model.state_dict(), tokenizer, args.out, fmt=args.format, dtype=args.dtype,
                        meta=meta, run_folder=run_dir(args.source, tag), source=args.source, name=args.name,
                        max_shard_bytes=int(args.max_shard_gb * 1e9))
    except ExportError as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.source}/{tag} step {meta.get('step')} as {result.format} ({args.dtype}) to {result.out_dir}")
    if args.format == "auto" and result.mismatches:
        print("not native because:\n  - " + "\n  - ".join(result.mismatches))
    print("files: " + ", ".join(result.files))
    code = ", trust_remote_code=True" if result.format == "remote" else ""
    print(f"load: AutoModelForCausalLM.from_pretrained({str(result.out_dir)!r}{code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
