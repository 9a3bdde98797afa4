"""The run folder: `<base dir>/<phase>_checkpoints/<model tag>/` and the files tools read from it.

One module owns the layout so that training (every phase), the speedrun, the report card, the doctor
and the sweep all find the same files:

    run.json        written at the start of a run, the same record in every phase (`write_run_record`):
                    phase, args (the flags), model_config, sizing (the run plan), env, source
                    (the checkpoint a fine-tuning phase starts from)
    metrics.jsonl   one JSON object per optimizer step (see MetricsWriter)
    model_/meta_/optim_<step>...   checkpoints (nanochat/checkpoint_manager.py)

Phases: "base" (pretraining), "sft" (chat fine-tuning), "rl" (reinforcement learning), "mid" (kept for
checkpoints of the reference's mid-training layout).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
from pathlib import Path

from nanochat.common import get_base_dir
from nanochat.env import atomic_write_text  # noqa: F401  (re-exported: run folders' files are written with it)

PHASE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
              "rl": "chatrl_checkpoints"}
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"


def phase_dir(phase: str, base_dir: str | os.PathLike | None = None) -> Path:
    """`<base dir>/<phase>_checkpoints` (not created)."""
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown phase {phase!r}: use one of {', '.join(sorted(PHASE_DIRS))}")
    return Path(base_dir or get_base_dir()) / PHASE_DIRS[phase]


def run_dir(phase: str, tag: str, base_dir: str | os.PathLike | None = None) -> Path:
    """The run folder of one model tag of one phase (not created)."""
    if not tag or "/" in tag or tag in (".", ".."):
        raise ValueError(f"invalid model tag {tag!r}: use a plain folder name such as d12")
    return phase_dir(phase, base_dir) / tag


def write_run_json(folder: str | os.PathLike, info: dict) -> Path:
    path = Path(folder) / RUN_JSON
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")
    return path


def write_run_record(folder: str | os.PathLike, *, phase: str, args: dict, model_config: dict, sizing: dict,
                     env: dict, source: dict | None = None) -> Path:
    """run.json, one schema for every phase, so that every reader (the doctor, the report card, the Hugging
    Face model card, the speedrun) finds the same keys: `phase`; `args`, the run's flags (its config);
    `model_config`; `sizing`, the run plan (sizing.RunPlan for pretraining, sizing.FinetunePlan for SFT and
    RL); `env` (device, dtype, torch, git commit, argv, resumed_from, ...); `source`, the checkpoint a
    fine-tuning phase starts from ({"phase", "tag", "step"}), None for pretraining."""
    if phase not in PHASE_DIRS:
        raise ValueError(f"unknown phase {phase!r}: use one of {', '.join(sorted(PHASE_DIRS))}")
    return write_run_json(folder, {"phase": phase, "args": args, "model_config": model_config, "sizing": sizing,
                                   "env": env, "source": source})


def read_run_json(folder: str | os.PathLike) -> dict | None:
    """run.json as a dict in the schema of `write_run_record`; None when absent. ValueError (with the path)
    when it is not a JSON object. Records of older versions read the same: SFT and RL kept the flags under
    "config" and `resumed_from` at the top level."""
    path = Path(folder) / RUN_JSON
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a JSON object")
    if "args" not in info and isinstance(info.get("config"), dict):
        info = {**info, "args": info["config"]}
    if "resumed_from" in info and "resumed_from" not in (info.get("env") or {}):
        info = {**info, "env": {**(info.get("env") or {}), "resumed_from": info["resumed_from"]}}
    return info


def read_metrics(folder_or_file: str | os.PathLike, problems: list[str] | None = None) -> list[dict]:
    """The records of metrics.jsonl in file order ([] when absent). Lines that are not JSON objects (a run
    killed mid-write) are skipped; each skip is described in `problems` when a list is given."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / METRICS
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        elif problems is not None:
            problems.append(f"{path.name} line {i} is not a JSON object (a run killed mid-write?); skipped")
    return records


class MetricsWriter:
    """Appends one JSON record per optimizer step to metrics.jsonl (rank 0 only: `enabled`).

    On a resume from step S it first drops the records of steps > S (written after the checkpoint the run
    continues from), so the file always holds one record per step.

    Fields of base training: step (optimizer steps done), loss (EMA 0.9, bias-corrected), raw_loss,
    lr (multiplier), dt (s), tok_per_sec, mfu (fraction of peak, 0-1; null when the peak is unknown),
    tokens, flops (cumulative), peak_mem_mb; plus val_bpb, val_loss (nats/token over all targets, as loss)
    and core on evaluation steps. Other phases add their own keys.
    """

    def __init__(self, folder: str | os.PathLike, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = Path(folder) / METRICS, enabled
        if not enabled:
            return
        keep = []
        if resume_step is not None and self.path.exists():
            keep = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# one writer per run folder, and what failed runs leave behind

LOCK_FILE = "run.lock"
_TMP_RE = re.compile(r"\.tmp(\d+)$")
_STEP_FILE_RE = re.compile(r"^(?:model|optim)_(\d+)(?:_rank\d+)?\.pt$")


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive `flock` on `<folder>/run.lock`, held for the life of the process that writes the folder.

    The kernel drops a flock when its holder exits, however it exits (kill -9 included), so a lock is
    never stale: a leftover run.lock of a dead process is simply taken over. The file records the
    holder's pid and command line so that a refused second writer can name it. Take it on rank 0 only:
    the other ranks of the same job write through rank 0's barriers.
    """

    def __init__(self, folder: str | os.PathLike, what: str = "a run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            info = _parse_holder(holder)
            raise RunLockedError(
                f"{self.folder} is in use by process {info.get('pid', '?')} ({info.get('what', 'unknown')}: "
                f"{info.get('cmd', '?')}): one process writes a run folder at a time; wait for it to finish, "
                f"stop it, or pass another --model-tag") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": self.what,
                                  "cmd": " ".join(sys.argv)[:300]}).encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _parse_holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except json.JSONDecodeError:
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def clean_run_dir(folder: str | os.PathLike, has_meta=None) -> list[Path]:
    """Remove what interrupted writes leave in a run folder; returns the removed paths.

    - `<name>.tmp<pid>` files of atomic writes whose process is gone (a kill mid-save; gigabytes at depth 20);
    - `model_<S>.pt` / `optim_<S>_rank<r>.pt` whose `meta_<S>.json` (the commit mark) was never written.

    Call it while holding the folder's RunLock (no other writer can be mid-save then). `has_meta(step)`
    decides whether step S is committed (default: `meta_<S:06d>.json` exists).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if has_meta is None:
        def has_meta(step: int) -> bool:
            return (folder / f"meta_{step:06d}.json").exists()
    removed = []
    for p in sorted(folder.iterdir()):
        m = _TMP_RE.search(p.name)
        if m:  # a file, or a folder (the tokenizer copy), of an atomic write
            pid = int(m.group(1))
            if pid != os.getpid() and not _pid_alive(pid):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
            continue
        if not p.is_file():
            continue
        m = _STEP_FILE_RE.match(p.name)
        if m and not has_meta(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def remove_if_unused(folder: str | os.PathLike) -> bool:
    """Delete a run folder that a failed command created and left without any result (nothing in it but
    the lock file and an empty metrics.jsonl / a run.json): True when it was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    leftovers = {LOCK_FILE, RUN_JSON}
    for p in folder.iterdir():
        if p.name in leftovers or (p.name == METRICS and p.is_file() and p.stat().st_size == 0):
            continue
        return False
    for p in folder.iterdir():
        p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    return True
