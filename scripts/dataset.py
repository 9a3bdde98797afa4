"""Pretraining data from the command line (also `python -m nanochat.dataset ...`):

    python -m nanochat.dataset -n 170                  # ClimbMix train shards + the pinned validation shard
    python -m nanochat.dataset prepare --input PATH    # txt/jsonl/parquet file or folder, or a `datasets` name
    python -m nanochat.dataset embedded                # the offline corpus (no network needed)
    python -m nanochat.dataset info                    # what the data folder holds
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/dataset.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.data_prep import main  # noqa: E402  (the command line lives beside what it runs)

if __name__ == "__main__":
    main()
