"""Checkpoints: atomic save, load, resume bookkeeping, keep-last-N, and `load_model` for the later phases.

A run folder (`<base dir>/base_checkpoints/<model tag>/` for pretraining) holds, per saved step S:

    model_<S:06d>.pt            model state dict (rank 0; `_orig_mod.` prefixes of torch.compile stripped)
    optim_<S:06d>_rank<r>.pt    optimizer state of rank r (the optimizer state is sharded across ranks)
    meta_<S:06d>.json           step, model config, flags, val bpb, loop / data-loader / RNG state

Every file is written to a temporary name, fsync'ed and renamed over its final name (`os.replace` is
atomic on POSIX), and the meta JSON is written last, after all ranks have written theirs: a
checkpoint exists if and only if its meta file exists, so a kill at any point of a save leaves the
previous checkpoint whole and the half-written one invisible.

Failures that are not kills. A full disk while saving raises `DiskFullError` with one line naming the
file, the space the checkpoint needs and the checkpoint that is kept. Every data file's CRC-32 and size
are computed from the bytes as they are written and recorded in the meta (`meta["checksums"]`); loading
checks them first, so a file damaged after the save (a disk error, an interrupted copy, garbage written
over part of it) is refused with its name (`CorruptCheckpoint`) instead of loading wrong weights, as a
truncated or unparsable file is (`UnreadableCheckpoint`). `newest_readable_step` skips such steps so a
requeued job resumes from the newest checkpoint that loads. Checkpoints written before the checksums
load unchecked. Cost at depth 20 (4.2 GB): ~2.0 s more per save, ~2.3 s of checking before a load
(CRC-32 at ~2 GB/s on one core; benchmarks/results/checkpoint_checksum.md).

Tokenizer identity. A checkpoint saved with `tokenizer=` records the tokenizer's hash in its meta
(`meta["tokenizer"]`) and keeps a copy of the tokenizer files in `<run folder>/tokenizer/`;
`load_model` (and `check_tokenizer` for other callers) refuses a tokenizer with another hash.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path

import torch

from nanochat.common import matmul_probe_shapes, resolve_dtype
from nanochat.gpt import GPT, GPTConfig
from nanochat.run_dir import PHASE_DIRS as _PHASE_DIRS
from nanochat.run_dir import phase_dir

PHASE_NAMES = tuple(_PHASE_DIRS)
from nanochat.tokenizer import Tokenizer, get_tokenizer

_META_RE = re.compile(r"^meta_(\d+)\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model / run asking for it."""


class UnreadableCheckpoint(CheckpointError):
    """A file of a committed checkpoint cannot be read (truncated, corrupt)."""

    def __init__(self, path: Path, error: BaseException | str):
        self.path = Path(path)
        super().__init__(f"{self.path} cannot be read (truncated or corrupt: {_short(error)})")


class CorruptCheckpoint(UnreadableCheckpoint):
    """A file of a committed checkpoint differs from what was written (its recorded CRC-32 or size)."""

    def __init__(self, path: Path, why: str):
        self.path = Path(path)
        CheckpointError.__init__(self, f"{self.path} is corrupt: {why}, so it was changed after the save (a disk "
                                       f"error, an interrupted copy): restore it, or load another step")


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint was written; the previous checkpoint is intact."""


class TokenizerMismatch(CheckpointError):
    """The tokenizer at hand is not the one the checkpoint was trained with."""


TOKENIZER_COPY = "tokenizer"  # sub-folder of a run folder holding the tokenizer its checkpoints used


def _short(error: BaseException | str) -> str:
    """The first sentence of an error's first line (torch's run on for several sentences), whole: never cut
    mid-word or mid-sentence."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else type(error).__name__
    first = re.match(r"(.+?[.!?])(?:\s|$)", text)
    return (first.group(1).rstrip(".") if first else text).strip()


def model_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir: Path, step: int, rank: int) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank}.pt"


def strip_compile_prefix(state_dict: dict) -> dict:
    """Remove torch.compile's `_orig_mod.` from parameter names (so checkpoints load into a plain GPT)."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# atomic writes


def _open_for_write(path: Path):
    return open(path, "wb")


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC, also when torch's zip writer re-raised it as a RuntimeError (its message then says so, or its
    cause / context is the OSError)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


class _RecordingFile:
    """A file wrapper that keeps the CRC-32 and size of what is written (torch.save writes its zip
    sequentially, so they are the file's) and remembers an OSError of write() (torch.save's C++ writer
    turns it into an 'enforce fail ... unexpected pos' RuntimeError that no longer says what happened)."""

    def __init__(self, f):
        self._f, self.error, self.crc, self.size = f, None, 0, 0

    def write(self, data):
        try:
            n = self._f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data) if n is None else n
        return n

    @property
    def checksum(self) -> dict:
        return {"crc32": f"{self.crc:08x}", "bytes": self.size}

    def __getattr__(self, name):
        return getattr(self._f, name)


def _atomic_write(path: Path, write_fn) -> dict:
    """Write via `write_fn(file)` to `<path>.tmp<pid>`, fsync, then rename over `path`; returns the
    checksum of the bytes written ({"crc32", "bytes"}). A full disk raises `DiskFullError` (the temporary
    file is removed, `path` is untouched)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    f = None
    try:
        with _open_for_write(tmp) as raw:
            f = _RecordingFile(raw)
            write_fn(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        return f.checksum
    except (OSError, RuntimeError) as e:
        if _is_disk_full(e) or (f is not None and f.error is not None and _is_disk_full(f.error)):
            raise DiskFullError(f"No space left on device while writing {path}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path: Path) -> dict:
    """torch.save through `_atomic_write`; returns the file's checksum."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path: Path) -> None:
    data = json.dumps(obj, indent=1).encode()
    _atomic_write(path, lambda f: f.write(data))


def file_checksum(path: Path, chunk: int = 16 << 20) -> dict:
    """{"crc32", "bytes"} of a file, read in chunks (as `_RecordingFile` computes it while writing)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            crc, size = zlib.crc32(block, crc), size + len(block)
    return {"crc32": f"{crc:08x}", "bytes": size}


_verified: dict[str, tuple] = {}  # path -> (size, mtime_ns, crc32) of files already checked in this process


def check_file(path: Path, expected: dict | None) -> None:
    """Raise `CorruptCheckpoint` unless `path` has the size and CRC-32 recorded when it was written; no-op for
    checkpoints older than the record (`expected` None). A file checked once is not read again while its
    size and modification time stay the same (resume checks the newest step, then loads it)."""
    if not expected:
        return
    path = Path(path)
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns, expected.get("crc32"))
    if _verified.get(str(path)) == key:
        return
    if st.st_size != expected.get("bytes"):
        cut = " (cut short)" if st.st_size < expected.get("bytes", 0) else ""
        raise CorruptCheckpoint(path, f"it holds {st.st_size:,} bytes where {expected.get('bytes'):,} were "
                                      f"written{cut}")
    got = file_checksum(path)["crc32"]
    if got != expected.get("crc32"):
        raise CorruptCheckpoint(path, f"its CRC-32 is {got} where {expected.get('crc32')} was recorded when it was "
                                      f"written")
    _verified[str(path)] = key


# ---------------------------------------------------------------------------------------------
# save / find / load


def save_checkpoint(checkpoint_dir, step: int, model_state: dict | None, optim_state: dict | None, meta: dict,
                    rank: int = 0, barrier=None, tokenizer=None, gather=None) -> None:
    """Save one checkpoint. Call on every rank (each passes its own `optim_state`).

    `model_state` and `meta` are written by rank 0 only (others may pass None). Between the data files and
    the meta file (the commit mark) the ranks meet, so that the meta is written only once every rank's
    optimizer file is in place: pass `gather=ctx.all_gather_object` when distributed (it also brings each
    rank's file checksums to rank 0; `barrier` alone records rank 0's only). `tokenizer` (rank 0): record
    its identity in the meta and keep a copy of its files in the run folder.

    A full disk raises `DiskFullError` (one line: the file, the space the checkpoint needs and what is free,
    the checkpoint kept, what to do); the step being written stays invisible (no meta) and its partial files
    are removed. Distributed, the error is raised where the write failed; the other ranks then fail in the
    barrier.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checksums = {}
    try:
        if rank == 0:
            if model_state is None:
                raise ValueError("rank 0 must pass the model state")
            if tokenizer is not None:
                meta = dict(meta, tokenizer=keep_tokenizer_copy(checkpoint_dir, tokenizer))
            path = model_path(checkpoint_dir, step)
            checksums[path.name] = atomic_torch_save(strip_compile_prefix(model_state), path)
        if optim_state is not None:
            path = optim_path(checkpoint_dir, step, rank)
            checksums[path.name] = atomic_torch_save(optim_state, path)
        if gather is not None:
            checksums = {k: v for part in gather(checksums) for k, v in part.items()}
        elif barrier is not None:
            barrier()
        if rank == 0:
            atomic_json_save(dict(meta, step=step, checksums=checksums), meta_path(checkpoint_dir, step))
    except DiskFullError as e:
        if not meta_path(checkpoint_dir, step).exists():
            model_path(checkpoint_dir, step).unlink(missing_ok=True)
            optim_path(checkpoint_dir, step, rank).unlink(missing_ok=True)
        kept = [s for s in list_steps(checkpoint_dir) if s != step]
        need = checkpoint_bytes(checkpoint_dir, kept[-1]) if kept else (
            _tensor_bytes(model_state) + _tensor_bytes(optim_state))
        free = shutil.disk_usage(checkpoint_dir).free
        tail = (f"previous checkpoint step {kept[-1]} kept. A save needs room for one more checkpoint beside the "
                f"kept one ({_gb(need)} each, {_gb(free)} free), whatever --keep-last says"
                if kept else f"no earlier checkpoint to keep. A checkpoint needs about {_gb(need)} ({_gb(free)} free)")
        raise DiskFullError(f"{e}, {tail}: free space there, or set NANOCHAT_BASE_DIR to a disk with "
                            f"{_gb(2 * need if kept else need)} free") from None
    if barrier is not None:
        barrier()


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def checkpoint_bytes(checkpoint_dir, step: int) -> int:
    """Bytes on disk of one checkpoint (model, every rank's optimizer, meta)."""
    checkpoint_dir = Path(checkpoint_dir)
    paths = [model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step),
             *checkpoint_dir.glob(f"optim_{step:06d}_rank*.pt")]
    return sum(p.stat().st_size for p in paths if p.exists())


def list_steps(checkpoint_dir) -> list[int]:
    """Steps with a complete checkpoint (its meta and model files both present), ascending."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for p in checkpoint_dir.iterdir():
        m = _META_RE.match(p.name)
        if m and model_path(checkpoint_dir, int(m.group(1))).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir) -> int:
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_*.json + model_*.pt) in {checkpoint_dir}")
    return steps[-1]


def find_last_tag(phase_dir) -> str:
    """The model tag (sub-folder) whose checkpoints were written most recently."""
    phase_dir = Path(phase_dir)
    tags = [d for d in phase_dir.iterdir() if d.is_dir() and list_steps(d)] if phase_dir.is_dir() else []
    if not tags:
        raise CheckpointError(f"no checkpoints found under {phase_dir}: train a model first "
                              f"(e.g. `python -m scripts.base_train`)")
    def newest(d: Path) -> float:
        return meta_path(d, list_steps(d)[-1]).stat().st_mtime
    return max(tags, key=newest).name


def load_meta(checkpoint_dir, step: int) -> dict:
    path = meta_path(checkpoint_dir, step)
    if not path.exists():
        raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir} (missing {path.name}); "
                              f"complete steps there: {list_steps(checkpoint_dir)}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UnreadableCheckpoint(path, e) from None
    if not isinstance(meta, dict):
        raise UnreadableCheckpoint(path, ValueError("not a JSON object"))
    return meta


def _torch_load(path: Path, device="cpu", mmap: bool = False, meta: dict | None = None):
    """torch.load of a checkpoint file, its recorded checksum (in `meta`) checked first."""
    if not path.exists():
        raise CheckpointError(f"{path} is missing (the checkpoint is incomplete)")
    check_file(path, (meta or {}).get("checksums", {}).get(path.name))
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:  # torch's message is about weights_only; the real cause is damaged data
        raise UnreadableCheckpoint(path, "its pickled data is damaged") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch reports a truncated zip as RuntimeError
        if isinstance(e, PermissionError):
            raise
        raise UnreadableCheckpoint(path, e) from None


def saved_world_size(checkpoint_dir, step: int, meta: dict | None = None) -> int:
    """How many ranks wrote this checkpoint (from its meta, else from its optimizer files)."""
    meta = meta if meta is not None else load_meta(checkpoint_dir, step)
    if isinstance(meta.get("world_size"), int):
        return meta["world_size"]
    return max(1, len(list(Path(checkpoint_dir).glob(f"optim_{step:06d}_rank*.pt"))))


def load_optimizer_state(checkpoint_dir, step: int, rank: int = 0, world_size: int = 1, device="cpu",
                         meta: dict | None = None, merge: bool = False) -> dict:
    """This rank's optimizer state of a checkpoint. Written by the same number of ranks: that rank's file.
    Written by another number: every rank's file, merged into the unsharded state (`MuonAdamW.load_state_dict`
    cuts its own shard from it), so a run resumes on more or fewer processes. `merge`: merged also at the
    same world size (a state cut into other buckets, see nanochat.optim.LayoutChanged)."""
    from nanochat.optim import merge_rank_states

    checkpoint_dir = Path(checkpoint_dir)
    meta = meta if meta is not None else load_meta(checkpoint_dir, step)
    saved = saved_world_size(checkpoint_dir, step, meta)
    if saved == world_size and not merge:
        return _torch_load(optim_path(checkpoint_dir, step, rank), device, meta=meta)
    states = [_torch_load(optim_path(checkpoint_dir, step, r), "cpu", meta=meta) for r in range(saved)]
    return merge_rank_states(states)


def load_checkpoint(checkpoint_dir, step: int, device="cpu", load_optimizer: bool = False,
                    rank: int = 0, world_size: int | None = None) -> tuple[dict, dict | None, dict]:
    """(model_state, optim_state or None, meta) of one step; tensors mapped to `device`.

    `world_size` (with `load_optimizer`): the number of ranks of the run loading it; when it differs from the
    saved one, the optimizer state comes merged (see `load_optimizer_state`). Unreadable files raise
    `UnreadableCheckpoint` naming the file."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = load_meta(checkpoint_dir, step)
    model_state = _torch_load(model_path(checkpoint_dir, step), device, meta=meta)
    optim_state = None
    if load_optimizer:
        if world_size is None:
            path = optim_path(checkpoint_dir, step, rank)
            if not path.exists():
                raise CheckpointError(f"{path} is missing: this checkpoint was written by "
                                      f"{meta.get('world_size', '?')} rank(s); pass world_size to re-shard")
            optim_state = _torch_load(path, device, meta=meta)
        else:
            optim_state = load_optimizer_state(checkpoint_dir, step, rank, world_size, device, meta)
    return model_state, optim_state, meta


def verify_checkpoint(checkpoint_dir, step: int, optimizer: bool = True) -> None:
    """Raise `UnreadableCheckpoint` (naming the file) unless every file of the step opens: the meta parses,
    each .pt file has the checksum recorded when it was written (checkpoints older than the record: not
    checked; the files are read once, then loading them does not check again) and its zip index is whole."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = load_meta(checkpoint_dir, step)
    paths = [model_path(checkpoint_dir, step)]
    if optimizer:
        paths += [optim_path(checkpoint_dir, step, r) for r in range(saved_world_size(checkpoint_dir, step, meta))]
    for path in paths:
        _torch_load(path, "cpu", mmap=True, meta=meta)


def newest_readable_step(checkpoint_dir, optimizer: bool = True, log=print) -> int:
    """The newest step whose files all open (`verify_checkpoint`); each skipped newer step is reported through
    `log` with the file at fault. CheckpointError when there is none."""
    steps = list_steps(checkpoint_dir)
    problems = []
    for step in reversed(steps):
        try:
            verify_checkpoint(checkpoint_dir, step, optimizer)
        except CheckpointError as e:
            problems.append(f"step {step}: {e}")
            continue
        if problems and log is not None:
            log(f"WARNING: checkpoint {'; '.join(problems)}; falling back to step {step}, the newest complete "
                f"readable checkpoint")
        return step
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_*.json + model_*.pt) in {checkpoint_dir}")
    raise CheckpointError(f"no readable checkpoint in {checkpoint_dir}: {'; '.join(problems)}")


def delete_checkpoint(checkpoint_dir, step: int) -> None:
    """Remove one step, meta first (so it stops counting as a checkpoint before its data goes)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta_path(checkpoint_dir, step).unlink(missing_ok=True)
    model_path(checkpoint_dir, step).unlink(missing_ok=True)
    for p in checkpoint_dir.glob(f"optim_{step:06d}_rank*.pt"):
        p.unlink(missing_ok=True)


def prune_checkpoints(checkpoint_dir, keep_last: int) -> list[int]:
    """Keep the newest `keep_last` checkpoints (<= 0 keeps all); returns the deleted steps."""
    if keep_last <= 0:
        return []
    old = list_steps(checkpoint_dir)[:-keep_last]
    for step in old:
        delete_checkpoint(checkpoint_dir, step)
    return old


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two model-config dicts (empty when they agree)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------------------------
# load a trained model for evaluation, chat, fine-tuning


DECODE_PROBE_ROWS = 8  # rows per matmul that stand for decoding (a few samples, one token each)


def build_model(model_config: dict, device, compute_dtype: torch.dtype | None = None):
    """An uninitialised GPT of `model_config` on `device` (weights to be loaded).

    Without `compute_dtype` the model is for inference, so `auto` is decided at decode shapes (a few rows
    per matmul): there bf16 loses to fp32 on CPU even with AMX (depth 4: 193 vs 373 tok/s at batch 1,
    benchmarks/bench_decode_dtype.py), while training-sized products gain 1.7x."""
    device = torch.device(device)
    config = GPTConfig(**model_config)
    dtype = compute_dtype if compute_dtype is not None else resolve_dtype(
        device.type, probe_shapes=matmul_probe_shapes(config.n_embd, DECODE_PROBE_ROWS, config.vocab_size))
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the rotary buffers; the weights are overwritten next
    return model


def load_state_into(model, state_dict: dict, where: str = "checkpoint") -> None:
    state_dict = strip_compile_prefix(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"the {where} does not fit this model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state_dict, strict=True)


def keep_tokenizer_copy(run_folder, tokenizer) -> dict:
    """Copy the tokenizer's files into `<run folder>/tokenizer/` (once per run folder; a copy of another
    tokenizer there is an error: one run, one tokenizer) and return the record stored in checkpoint metas:
    {"hash", "vocab_size", "source", "copy"}."""
    run_folder = Path(run_folder)
    copy = run_folder / TOKENIZER_COPY
    record = {"hash": tokenizer.identity, "vocab_size": tokenizer.get_vocab_size(),
              "source": str(getattr(tokenizer, "path", "") or ""), "copy": str(copy)}
    if (copy / "ranks.tiktoken").is_file():
        mark = copy / "IDENTITY"  # written with the copy, so later saves need not re-read the ranks
        kept = mark.read_text().strip() if mark.is_file() else None
        if kept != tokenizer.identity:
            try:
                kept = Tokenizer.from_directory(copy).identity
            except Exception as e:  # noqa: BLE001  (a damaged copy: rewrite it)
                kept = f"unreadable ({_short(e)})"
        if kept == tokenizer.identity:
            return record
        if list_steps(run_folder):
            raise TokenizerMismatch(f"{run_folder} was trained with tokenizer {kept} (copy in {copy}), but this "
                                    f"run uses tokenizer {tokenizer.identity}: use another --model-tag for a run "
                                    f"with another tokenizer")
    tmp = run_folder / f"{TOKENIZER_COPY}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    (tmp / "IDENTITY").write_text(tokenizer.identity + "\n")
    shutil.rmtree(copy, ignore_errors=True)
    os.replace(tmp, copy)
    return record


def check_tokenizer(meta: dict, tokenizer, where: str) -> None:
    """Refuse a tokenizer other than the one the checkpoint `meta` records (checkpoints older than the record
    are checked by vocabulary size only, by the callers)."""
    saved = meta.get("tokenizer")
    if not isinstance(saved, dict) or not saved.get("hash") or not hasattr(tokenizer, "identity"):
        return
    if saved["hash"] != tokenizer.identity:
        here = getattr(tokenizer, "path", None) or "the tokenizer in use"
        copy = saved.get("copy")
        hint = (f"the right one is kept in {copy}: copy it to {here} or point NANOCHAT_BASE_DIR at a base dir "
                f"holding it" if copy and Path(copy).is_dir() else
                f"it was {saved.get('source') or 'not recorded'}; restore that tokenizer")
        raise TokenizerMismatch(f"{where} was trained with tokenizer {saved['hash']} but {here} is tokenizer "
                                f"{tokenizer.identity} (same vocab size {tokenizer.get_vocab_size():,} or not, "
                                f"the token ids mean other strings): {hint}")


def runs_trained_with(tokenizer, base_dir=None) -> list[Path]:
    """Run folders (every phase) whose newest checkpoint was trained with `tokenizer`: its hash is recorded, or
    (checkpoints older than the record) its vocabulary size matches."""
    found = []
    for phase in PHASE_NAMES:
        root = phase_dir(phase, base_dir)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            steps = list_steps(folder)
            if not steps:
                continue
            try:
                meta = load_meta(folder, steps[-1])
            except CheckpointError:
                continue
            rec = meta.get("tokenizer")
            if isinstance(rec, dict) and rec.get("hash"):
                same = rec["hash"] == tokenizer.identity
            else:
                same = meta.get("model_config", {}).get("vocab_size") == tokenizer.get_vocab_size()
            if same:
                found.append(folder)
    return found


def load_model(phase: str, device, model_tag: str | None = None, step: int | None = None,
               base_dir=None, compute_dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, meta) of a saved checkpoint.

    Defaults: the most recently written model tag of the phase, and its last step. Refuses a tokenizer other
    than the one the checkpoint was trained with (`TokenizerMismatch`).
    """
    folder = phase_dir(phase, base_dir)
    if model_tag is None:
        model_tag = find_last_tag(folder)
    checkpoint_dir = folder / model_tag
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device=device)
    model = build_model(meta["model_config"], device, compute_dtype)
    load_state_into(model, model_state, where=f"checkpoint {checkpoint_dir}/model_{step:06d}.pt")
    model.eval()
    tokenizer = get_tokenizer(base_dir)
    check_tokenizer(meta, tokenizer, f"checkpoint {checkpoint_dir} step {step}")
    vocab = meta["model_config"]["vocab_size"]
    if tokenizer.get_vocab_size() != vocab:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.get_vocab_size():,} does not match the model's "
                              f"{vocab:,} (checkpoint {checkpoint_dir}, step {step}): use the tokenizer the model "
                              f"was trained with (same NANOCHAT_BASE_DIR)")
    return model, tokenizer, meta
