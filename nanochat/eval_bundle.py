"""The CORE eval bundle (DCLM's 22 tasks as core.yaml, eval_meta_data.csv and eval_data/): find it, download
it once, parse its task list and each task's rows with a clear error for a corrupt line.

Where it is: `--eval-bundle PATH`, else `NANOCHAT_EVAL_BUNDLE`, else `<base dir>/eval_bundle`, downloaded
there on first use (file-locked, so concurrent ranks download it once; a killed download leaves only a
temporary folder, removed by the next one). Scoring the tasks is nanochat/core_eval.py.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from nanochat.env import get_base_dir

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
EVAL_BUNDLE_ENV = "NANOCHAT_EVAL_BUNDLE"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337


class EvalBundleError(RuntimeError):
    """The CORE eval bundle is missing, malformed or could not be downloaded."""


class TaskDataError(EvalBundleError):
    """One task's data file is corrupt (the message names the file and line); the other tasks still run."""


# the fields every row of a task type needs (a row without them fails mid-scoring otherwise)
REQUIRED_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
                   "language_modeling": ("context", "continuation")}


# ---------------------------------------------------------------------------------------------
# the eval bundle: find it, or download it once


def _is_bundle(path: Path) -> bool:
    return (path / "core.yaml").is_file() and (path / "eval_meta_data.csv").is_file() and (path / "eval_data").is_dir()


def _how_to_provide(base_dir: Path) -> str:
    return (f"Provide the bundle yourself: pass --eval-bundle PATH (or set {EVAL_BUNDLE_ENV}=PATH) pointing at a "
            f"folder holding core.yaml, eval_meta_data.csv and eval_data/, or copy such a folder to "
            f"{base_dir / 'eval_bundle'} (on a networked machine it is downloaded there on first use from "
            f"{EVAL_BUNDLE_URL}).")


def resolve_eval_bundle(bundle_dir: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None,
                        download: bool = True, url: str = EVAL_BUNDLE_URL, timeout: float = 10.0) -> Path:
    """The eval bundle folder: `bundle_dir`, else env NANOCHAT_EVAL_BUNDLE, else `<base>/eval_bundle`,
    downloaded there on first use (file-locked, so concurrent ranks download it once)."""
    if base_dir is None:
        base_dir = get_base_dir()
    base_dir = Path(base_dir)
    for source, given in (("--eval-bundle", bundle_dir), (EVAL_BUNDLE_ENV, os.environ.get(EVAL_BUNDLE_ENV))):
        if given:
            path = Path(given).expanduser()
            if not _is_bundle(path):
                raise EvalBundleError(f"{source}={path} is not a CORE eval bundle (it needs core.yaml, "
                                      f"eval_meta_data.csv and eval_data/). " + _how_to_provide(base_dir))
            return path
    target = base_dir / "eval_bundle"
    if _is_bundle(target):
        return target
    if not download:
        raise EvalBundleError(f"No CORE eval bundle at {target}. " + _how_to_provide(base_dir))
    from filelock import FileLock

    base_dir.mkdir(parents=True, exist_ok=True)
    # the lock is an flock (filelock on POSIX): a killed holder releases it, so a leftover eval_bundle.lock
    # file never blocks; what a killed download leaves is its temporary folder, removed here under the lock
    with FileLock(str(base_dir / "eval_bundle.lock")):
        for leftover in base_dir.glob(".eval_bundle_tmp_*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if not _is_bundle(target):  # another process may have finished while we waited
            _download_bundle(url, target, timeout)
    return target


def _download_bundle(url: str, target: Path, timeout: float) -> None:
    """Download the zip to a temp file, unpack into a temp dir beside `target`, rename into place."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=".eval_bundle_tmp_", dir=target.parent))
    try:
        zip_path = tmp_dir / "eval_bundle.zip"
        try:
            # short timeout: connect and each read; offline this fails in well under a second
            with urllib.request.urlopen(url, timeout=timeout) as response, open(zip_path, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise EvalBundleError(f"Could not download the CORE eval bundle from {url} ({e}). "
                                  + _how_to_provide(target.parent)) from e
        unpack = tmp_dir / "unpacked"
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(unpack)
        except zipfile.BadZipFile as e:
            raise EvalBundleError(f"The download from {url} is not a valid zip file ({e}). "
                                  + _how_to_provide(target.parent)) from e
        found = [p.parent for p in unpack.rglob("core.yaml") if _is_bundle(p.parent)]
        if not found:
            raise EvalBundleError(f"The zip from {url} holds no core.yaml/eval_meta_data.csv/eval_data/. "
                                  + _how_to_provide(target.parent))
        os.replace(found[0], target)  # atomic on one filesystem: readers see all of it or nothing
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# tasks and their data


@dataclass(frozen=True)
class TaskSpec:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str = " "
    random_baseline: float = 0.0  # in percent, as in eval_meta_data.csv


def load_task_specs(bundle_dir: str | os.PathLike) -> list[TaskSpec]:
    """Tasks of core.yaml with their random baselines from eval_meta_data.csv."""
    bundle_dir = Path(bundle_dir)
    with open(bundle_dir / "core.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    baselines = {}
    with open(bundle_dir / "eval_meta_data.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            baselines[row["Eval Task"]] = float(row["Random baseline"])
    specs = []
    for task in config["icl_tasks"]:
        label = task["label"]
        if task["icl_task_type"] not in TASK_TYPES:
            raise EvalBundleError(f"task {label}: unknown icl_task_type {task['icl_task_type']!r} "
                                  f"(expected one of {TASK_TYPES})")
        if label not in baselines:
            raise EvalBundleError(f"task {label}: no 'Random baseline' row in {bundle_dir / 'eval_meta_data.csv'}")
        specs.append(TaskSpec(label=label, task_type=task["icl_task_type"], dataset_uri=task["dataset_uri"],
                              num_fewshot=int(task["num_fewshot"][0]),
                              continuation_delimiter=task.get("continuation_delimiter", " "),
                              random_baseline=baselines[label]))
    return specs


def load_task_data(bundle_dir: str | os.PathLike, spec: TaskSpec, max_per_task: int = -1) -> list[dict] | None:
    """The task's rows after the seed-1337 shuffle (and truncation to `max_per_task` if > 0);
    None when the data file is missing. A line that is not a JSON object with the task type's fields
    raises `TaskDataError` naming the file and the line number."""
    path = Path(bundle_dir) / "eval_data" / spec.dataset_uri
    if not path.is_file():
        return None
    need = REQUIRED_FIELDS.get(spec.task_type, ())
    data = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise TaskDataError(f"task {spec.label}: {path} line {lineno} is not valid JSON ({e.msg} at "
                                        f"column {e.colno}); restore the file from the eval bundle") from None
                missing = [k for k in need if not isinstance(row, dict) or k not in row]
                if missing:
                    raise TaskDataError(f"task {spec.label}: {path} line {lineno} lacks {', '.join(missing)} (a "
                                        f"{spec.task_type} row needs {', '.join(need)}); restore the file")
                data.append(row)
    except UnicodeDecodeError as e:
        raise TaskDataError(f"task {spec.label}: {path} is not UTF-8 text ({e.reason} at byte {e.start}); restore "
                            f"the file from the eval bundle") from None
    random.Random(SHUFFLE_SEED).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    return data


def check_bundle(bundle_dir=None, max_per_task: int = -1, base_dir=None, download: bool = True) -> dict:
    """Start-up check for a run that will compute CORE later: find the bundle, parse every task file.

    Returns {"bundle", "tasks": labels that will run, "skipped": {label: reason}}. Raises EvalBundleError when
    the bundle itself is unusable, ValueError when `max_per_task` cannot work (0, < -1, or not above the
    largest few-shot count: few-shot examples are drawn from the task's other rows)."""
    if max_per_task == 0 or max_per_task < -1:
        raise ValueError(f"max_per_task={max_per_task}: use -1 (all examples) or a positive number")
    bundle = resolve_eval_bundle(bundle_dir, base_dir=base_dir, download=download)
    specs = load_task_specs(bundle)
    most_shots = max((sp.num_fewshot for sp in specs), default=0)
    if 0 < max_per_task <= most_shots:
        raise ValueError(f"max_per_task={max_per_task} is too small: {most_shots}-shot tasks draw their examples "
                         f"from the other rows of the task, so use max_per_task > {most_shots} (or -1 for all)")
    tasks, skipped = [], {}
    for spec in specs:
        try:
            data = load_task_data(bundle, spec, max_per_task)
        except TaskDataError as e:
            skipped[spec.label] = str(e)
            continue
        if data is None:
            skipped[spec.label] = f"no data file {bundle / 'eval_data' / spec.dataset_uri}"
        else:
            tasks.append(spec.label)
    return {"bundle": bundle, "tasks": tasks, "skipped": skipped}
