"""The run folder: `<base dir>/<phase>_checkpoints/<model tag>/` and the files tools read from it.

One module owns the layout so that training (every phase), the speedrun, the report card, the doctor
and the sweep all find the same files:

    run.json        written once at the start of a run: flags, model config, the run plan, environment
    metrics.jsonl   one JSON object per optimizer step (see MetricsWriter)
    model_/meta_/optim_<step>...   checkpoints (nanochat/checkpoint_manager.py)

Phases: "base" (pretraining), "sft" (chat fine-tuning), "rl" (reinforcement learning), "mid" (kept for
checkpoints of the reference's mid-training layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nanochat.common import get_base_dir

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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `<path>.tmp<pid>`, fsync and rename over `path` (readers never see half a file)."""
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


def write_run_json(folder: str | os.PathLike, info: dict) -> Path:
    path = Path(folder) / RUN_JSON
    atomic_write_text(path, json.dumps(info, indent=2, default=str) + "\n")
    return path


def read_run_json(folder: str | os.PathLike) -> dict | None:
    """run.json as a dict; None when absent. ValueError (with the path) when it is not a JSON object."""
    path = Path(folder) / RUN_JSON
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path} is not a JSON object")
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
