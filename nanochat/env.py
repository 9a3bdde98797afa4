"""Process environment without torch: the artifact directory and rank-aware printing.

nanochat.common re-exports these; modules that must start fast (the text readers in nanochat.dataset,
scripts/tok_train.py) import them from here, so that reading text never waits for `import torch`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# artifact directory


def get_base_dir() -> Path:
    """Where tokenizers, data shards, checkpoints and reports live.

    `NANOCHAT_BASE_DIR` overrides the default `~/.cache/nanochat`. Created on first use.
    """
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    base.mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------------------------------------
# rank-aware printing and logging (reads torchrun's environment, so it works before init)


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only."""
    if env_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def get_logger(name: str = "nanochat") -> logging.Logger:
    """A logger that emits on rank 0 and stays silent elsewhere (warnings still pass on all ranks)."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if env_rank() == 0 else logging.WARNING)
    return logger
