"""Rows of a task's table: a local override, or the Hugging Face hub through `datasets`.

Local override (`--task-data DIR` or `NANOCHAT_TASK_DATA=DIR`): `DIR/<task>/<split>.jsonl` or
`DIR/<task>/<split>.parquet`, one row per example with the hub's columns, in the hub's row order.
`<task>` is the key in `HUB_TABLES` (e.g. `gsm8k`, `mmlu`, `arc-easy`, `humaneval`).

Hub: `datasets.load_dataset(repo, config, split)` with its usual cache (`HF_HOME`). Before any
download the hub endpoint (`HF_ENDPOINT`, default https://huggingface.co) is probed with a 3 s
timeout, so an offline machine gets one line naming the override within seconds instead of the
library's retry loop. With `HF_HUB_OFFLINE=1` the probe is skipped and only the cache is used.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

# task key -> (hub repo, config, {our split: hub split})
HUB_TABLES = {
    "smoltalk": ("HuggingFaceTB/smol-smoltalk", None, {"train": "train", "test": "test"}),
    "mmlu": ("cais/mmlu", "all", {"test": "test", "validation": "validation", "dev": "dev"}),
    "mmlu-aux": ("cais/mmlu", "auxiliary_train", {"train": "train"}),
    "gsm8k": ("openai/gsm8k", "main", {"train": "train", "test": "test"}),
    "arc-easy": ("allenai/ai2_arc", "ARC-Easy", {"train": "train", "validation": "validation", "test": "test"}),
    "arc-challenge": ("allenai/ai2_arc", "ARC-Challenge", {"train": "train", "validation": "validation",
                                                          "test": "test"}),
    "humaneval": ("openai/openai_humaneval", None, {"test": "test"}),
}
PROBE_TIMEOUT = 3.0


class TaskDataError(RuntimeError):
    """A task's rows cannot be had: one line saying why and where to put a local copy."""


def task_data_dir(task_data: str | os.PathLike | None = None) -> Path | None:
    value = task_data if task_data is not None else os.environ.get("NANOCHAT_TASK_DATA")
    return Path(value).expanduser() if value else None


def _override_hint(key: str, split: str) -> str:
    return (f"pass --task-data DIR (or set NANOCHAT_TASK_DATA=DIR) with DIR/{key}/{split}.jsonl or .parquet "
            f"holding the hub's columns")


def read_table(path: Path) -> list[dict]:
    """Rows of a local .jsonl or .parquet file, in file order."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"{path} line {lineno} is not JSON ({e.msg}): fix or remove it") from e
    return rows


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")


def probe_endpoint(timeout: float = PROBE_TIMEOUT) -> None:
    """Raise OSError when the hub endpoint does not answer within `timeout` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    req = urllib.request.Request(endpoint + "/api/status", method="HEAD")
    try:
        urllib.request.urlopen(req, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # the server answered (any status): it is reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot reach {endpoint} ({reason})") from e


def cached_copy_exists(repo: str) -> bool:
    """Whether `datasets` or the hub cache holds anything of `repo` (checked without importing `datasets`,
    whose import alone takes seconds): `<HF_DATASETS_CACHE>/<org>___<name>` or `<HF_HUB_CACHE>/datasets--org--name`."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    ds_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or home / "hub").expanduser()
    return ((ds_cache / repo.replace("/", "___")).exists()
            or (hub_cache / ("datasets--" + repo.replace("/", "--"))).exists())


def load_rows(key: str, split: str, task_data: str | os.PathLike | None = None) -> list[dict]:
    """All rows of one task table (list of dicts with the hub's columns)."""
    if key not in HUB_TABLES:
        raise TaskDataError(f"unknown task table {key!r}; known: {', '.join(HUB_TABLES)}")
    repo, config, splits = HUB_TABLES[key]
    if split not in splits:
        raise TaskDataError(f"{key} has no split {split!r}; use one of {', '.join(splits)}")
    local = task_data_dir(task_data)
    if local is not None:
        for ext in ("jsonl", "parquet"):
            path = local / key / f"{split}.{ext}"
            if path.is_file():
                rows = read_table(path)
                if not rows:
                    raise TaskDataError(f"{path} holds no rows: a task is never silently empty")
                return rows
        raise TaskDataError(f"no local table for {key}/{split} under {local}: expected "
                            f"{local / key / split}.jsonl or .parquet with the columns of {repo}")
    if _hub_offline():
        if not cached_copy_exists(repo):
            raise TaskDataError(f"{key}: HF_HUB_OFFLINE is set and no cached copy of {repo} exists; "
                                f"{_override_hint(key, split)}")
    else:
        try:
            probe_endpoint()
        except OSError as e:
            raise TaskDataError(f"{key}: {e}; {_override_hint(key, split)}, or set HF_HUB_OFFLINE=1 to use "
                                f"a cached copy") from None
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=splits[split])
    except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError...)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TaskDataError(f"{key}: could not load {repo} ({first}); {_override_hint(key, split)}") from None
    return ds.to_list()
