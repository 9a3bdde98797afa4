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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `<path>.tmp<pid>`, fsync and rename over `path`: readers (and concurrent writers) see
    the old file or the new one, never half of one. The one text writer of the package; a kill leaves the
    temporary file, which `run_dir.clean_run_dir` removes from run folders."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class NotWritable(RuntimeError):
    """A folder nanochat must write (the base dir, a data folder) cannot be created or written."""


def get_base_dir() -> Path:
    """Where tokenizers, data shards, checkpoints and reports live.

    `NANOCHAT_BASE_DIR` overrides the default `~/.cache/nanochat`. Created on first use (`NotWritable` when
    it cannot be).
    """
    env = os.environ.get("NANOCHAT_BASE_DIR")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NotWritable(_not_writable(base, e)) from None
    return base


def require_writable(folder: str | os.PathLike, what: str = "the base dir") -> Path:
    """Create `folder` if needed and write (then remove) a probe file in it, so that a command which will
    write there fails at its start with one line (`NotWritable`: the folder, why, what to do) instead of
    a traceback from deep inside the first write."""
    folder = Path(folder)
    probe = folder / f".write_probe{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise NotWritable(_not_writable(folder, e, what)) from None
    return folder


def _not_writable(folder: Path, error: OSError, what: str = "the base dir") -> str:
    fix = "or pass --data-dir " if what == "the data folder" else ""
    return (f"cannot write {what} {folder}: {error.strerror or type(error).__name__}. Set NANOCHAT_BASE_DIR "
            f"{fix}to a folder you can write (default ~/.cache/nanochat)")


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
