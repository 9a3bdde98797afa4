"""Pretraining data from the command line (also `python -m nanochat.dataset ...`):

    python -m nanochat.dataset -n 170                  # ClimbMix train shards + the pinned validation shard
    python -m nanochat.dataset prepare --input PATH    # txt/jsonl/parquet file or folder, or a `datasets` name
    python -m nanochat.dataset embedded                # the offline corpus (no network needed)
    python -m nanochat.dataset info                    # what the data folder holds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/dataset.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.data_prep import download, prepare, prepare_embedded  # noqa: E402
from nanochat.dataset import ROWS_PER_GROUP, SOURCES, DataError, describe, get_data_dir  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("download", "prepare", "embedded", "info")
    command = argv.pop(0) if argv and argv[0] in commands else "download"
    p = argparse.ArgumentParser(
        prog=f"python -m nanochat.dataset {command}", description="Download or prepare pretraining data",
        epilog="commands: [download] -n N [--source climbmix|fineweb-edu] | prepare --input PATH "
               "[--val-fraction F] | embedded | info  (each takes --data-dir; see --help after the command)")
    p.add_argument("--data-dir", default=None, help="data folder (default <base>/base_data)")
    if command == "download":
        p.add_argument("-n", "--num-shards", type=int, required=True, help="number of train shards")
        p.add_argument("--source", default="climbmix", choices=sorted(SOURCES))
        p.add_argument("--workers", type=int, default=4)
        p.add_argument("--retries", type=int, default=5)
    if command in ("prepare", "embedded"):
        p.add_argument("--val-fraction", type=float, default=0.05)
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--force", action="store_true", help="replace existing shards in the data folder")
    if command == "prepare":
        p.add_argument("--input", required=True, help="txt/jsonl/parquet file or folder, or a `datasets` name")
        p.add_argument("--text-field", default="text")
        p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"])
        p.add_argument("--rows-per-group", type=int, default=ROWS_PER_GROUP)
        p.add_argument("--docs-per-shard", type=int, default=100_000)
        p.add_argument("--hf-config", default=None, help="`datasets` config name")
        p.add_argument("--hf-split", default="train", help="`datasets` split")
    args = p.parse_args(argv)
    data_dir = Path(args.data_dir) if args.data_dir else get_data_dir()
    try:
        if command == "download":
            download(args.num_shards, args.source, data_dir, args.workers, args.retries)
        elif command == "prepare":
            prepare(args.input, data_dir, args.val_fraction, args.seed, args.rows_per_group, args.docs_per_shard,
                    args.text_field, args.encoding_errors, args.force, hf_config=args.hf_config,
                    hf_split=args.hf_split)
        elif command == "embedded":
            prepare_embedded(data_dir, args.val_fraction, args.seed, args.force)
        print(describe(data_dir))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
