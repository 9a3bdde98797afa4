"""Pretraining batches: tokenise on the fly, pack documents into rows with best-fit, resume exactly.

Stream. The loader reads the units (parquet row groups) of the split's shard list in order
(`nanochat.dataset.list_units`), looping over epochs. Units are numbered by a monotonic counter
`c` (epoch = c // number of units), documents by their row `k` inside the unit, so `(c, k)` names
every document the run will ever read.

Ranks (elastic). The packed rows form one global sequence that does not depend on the number of
processes: every rank packs the same global rows, and micro-batch n of rank r of W is global
micro-batch n*W + r (rows [(n*W + r)*B, (n*W + r + 1)*B)). An optimizer step of A accumulation steps
therefore trains on global rows [s*A*W*B, (s+1)*A*W*B) whatever the split between ranks and
accumulation: 1 process with accumulation 2 sees what 2 processes with accumulation 1 see, and a
single-process run reads exactly what it always read. The state (the packer after a whole number of
rounds of W*B rows) is the same on every rank and names no rank or batch size, so a checkpoint resumes
on another number of processes or with another micro-batch (same total batch) and continues exactly.
The price: each rank reads and tokenises every document (W times the tokeniser work of rank-strided
reading); the lookahead thread overlaps it with training.

Packing (REFERENCE section 4). Every document is tokenised with BOS prepended. A buffer holds
`buffer_size` documents; each row of T+1 tokens is filled by repeatedly taking the largest buffered
document that fits whole (ties: the earliest read); when none fits, the shortest buffered document is
cropped to fill the row and its remainder is discarded (counted in `stats()["cropped_tokens"]`).
Rows are therefore 100% full, every document starts with BOS, and no padding or cross-document mask
is needed. A document longer than a row is never skipped: it waits in the buffer until it is the
shortest one and is then cropped (counted in `long_docs`). Empty documents are skipped and counted.

Keeping remainders (`keep_remainder=N`, off by default as in the reference recipe). When the rows are
short against the documents (seq 256 on web pages or book chapters), cropping discards most of the
text: the CPU demo (KJV chapters of ~1,000 tokens, 257-token rows) discarded 62% of the tokens it read
and trained on little but chapter openings, epoch after epoch. With N > 0 the cut-off tail of a cropped document, if at least N
tokens long, goes back into the buffer (without a BOS: it continues the document) and is packed like
any other; shorter tails are discarded as before. Rows may then start mid-document.

Exact resume. The packer is deterministic given the stream, so its state is: the next document to
read `(c, k)`, the ids of the documents in the buffer (stored as ranges `[c, k0, k1)`), the offsets of
the buffered tails (`[c, k, offset]`, with keep_remainder), and the counters. `load_state_dict` re-reads and re-tokenises those documents. The background thread works
ahead, but every batch travels with the state *after* it, and `state_dict()` returns the state of
the last batch the consumer received, so read-ahead never leaks into a checkpoint. The state is a
small JSON-able dict (a few KB).

Threads. One producer thread packs batches into a bounded queue; a lookahead thread reads and
tokenises the next unit while the current one is packed; the tokenizer's batch encode uses
`tokenizer_threads` threads of its own (tiktoken releases the GIL). On CUDA the batch is pinned in
the producer and copied with `non_blocking=True`.

The tokenizer is duck-typed: `encode(list[str], prepend=bos_id, num_threads=N) -> list[list[int]]`
and `get_bos_token_id()`.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from nanochat.dataset import DataError, ShardReader, Unit, list_units

STATE_VERSION = 2  # 2: the global (rank-free) stream; version-1 states of single-process runs are the same


class Packer:
    """Synchronous, deterministic best-fit packer over one rank's unit stream. `next_batch()` returns
    an int64 array (B, T+1); `state_dict()` describes the position after the last batch returned."""

    def __init__(self, tokenizer, units: list[Unit], batch_size: int, seq_len: int, buffer_size: int = 1000,
                 reader: ShardReader | None = None, tokenizer_threads: int = 4, skip_corrupt: bool = False,
                 keep_remainder: int = 0):
        if not units:
            raise DataError("no units to read")
        if keep_remainder < 0:
            raise ValueError(f"keep_remainder must be >= 0 (0: discard cropped tails), got {keep_remainder}")
        self.keep_remainder = keep_remainder
        self.tokenizer, self.units = tokenizer, units
        self.B, self.T, self.buffer_size = batch_size, seq_len, buffer_size
        self.reader = reader or ShardReader()
        self.tokenizer_threads, self.skip_corrupt = tokenizer_threads, skip_corrupt
        self.bos = tokenizer.get_bos_token_id()
        self._lookahead = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-tokenize")
        self._futures: dict[int, cf.Future] = {}
        self._reset(0, 0, {})

    def _reset(self, c: int, k: int, stats: dict) -> None:
        self.next_c, self.next_k = c, k  # next document to pull into the buffer
        self.keys: list[tuple[int, int, int]] = []  # sorted (length, c, k) of buffered docs
        self.docs: dict[tuple[int, int], np.ndarray] = {}
        self.offsets: dict[tuple[int, int], int] = {}  # buffered tails: tokens of doc (c, k) from this offset
        self.pending: list[np.ndarray | None] = []  # tokens of unit next_c (None = empty doc)
        self.pending_c = None
        self.stats = dict(batches=0, rows=0, docs_read=0, docs_packed=0, placed_tokens=0, cropped_tokens=0,
                          long_docs=0, empty_docs=0, corrupt_units=0, kept_remainders=0)
        self.stats.update(stats)
        self._futures.clear()

    # -- reading ------------------------------------------------------------------------------

    def _tokenize_unit(self, c: int) -> list[np.ndarray | None] | DataError:
        """Tokens of every document of unit c (None for empty ones), or the read error."""
        try:
            texts = self.reader.read(self.units[c % len(self.units)])
        except DataError as e:
            return e
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            unit = self.units[c % len(self.units)]
            return DataError(f"{unit.path} row group {unit.index}: the text column holds {type(bad).__name__} values, "
                             f"not strings; re-prepare the data (`python -m nanochat.dataset prepare --input ...`)")
        keep = [i for i, t in enumerate(texts) if t.strip()]
        ids = self.tokenizer.encode([texts[i] for i in keep], prepend=self.bos, num_threads=self.tokenizer_threads)
        out: list[np.ndarray | None] = [None] * len(texts)
        for i, toks in zip(keep, ids):
            out[i] = np.asarray(toks, dtype=np.int32)
        return out

    def _unit_tokens(self, c: int):
        fut = self._futures.pop(c, None)
        result = fut.result() if fut is not None else self._tokenize_unit(c)
        if c + 1 not in self._futures:  # read and tokenise the next unit while this one is packed
            self._futures[c + 1] = self._lookahead.submit(self._tokenize_unit, c + 1)
        for stale in [x for x in self._futures if x < c]:
            self._futures.pop(stale).cancel()
        return result

    def _pull(self) -> None:
        """Move the next non-empty document of the stream into the buffer."""
        units_without_docs = 0
        while True:
            if self.pending_c != self.next_c:
                units_without_docs += 1
                if units_without_docs > len(self.units) + 1:
                    raise DataError(f"a whole epoch ({len(self.units)} row groups, from {self.units[0].path}) gave "
                                    f"no document: every one is empty or unreadable")
                result = self._unit_tokens(self.next_c)
                if isinstance(result, DataError):
                    if not self.skip_corrupt:
                        raise result
                    self.stats["corrupt_units"] += 1
                    self.next_c, self.next_k = self.next_c + 1, 0
                    continue
                self.pending, self.pending_c = result, self.next_c
            if self.next_k >= len(self.pending):
                self.next_c, self.next_k = self.next_c + 1, 0
                continue
            c, k = self.next_c, self.next_k
            toks = self.pending[k]
            self.next_k += 1
            self.stats["docs_read"] += 1
            if toks is None:
                self.stats["empty_docs"] += 1
                continue
            if len(toks) > self.T + 1:
                self.stats["long_docs"] += 1
            self._insert(c, k, toks)
            return

    def _insert(self, c: int, k: int, toks: np.ndarray) -> None:
        bisect.insort(self.keys, (len(toks), c, k))
        self.docs[(c, k)] = toks

    def _take(self, index: int) -> tuple[int, int, np.ndarray]:
        _, c, k = self.keys.pop(index)
        return c, k, self.docs.pop((c, k))

    # -- packing ------------------------------------------------------------------------------

    def next_batch(self) -> np.ndarray:
        row_len = self.T + 1
        batch = np.empty((self.B, row_len), dtype=np.int64)
        for row in batch:
            pos = 0
            while pos < row_len:
                while len(self.keys) < self.buffer_size:
                    self._pull()
                remaining = row_len - pos
                i = bisect.bisect_right(self.keys, (remaining, float("inf"), 0)) - 1
                if i >= 0:  # largest doc that fits whole; the earliest read among equals
                    i = bisect.bisect_left(self.keys, (self.keys[i][0], -1, -1))
                    c, k, doc = self._take(i)
                    self.offsets.pop((c, k), None)
                    row[pos:pos + len(doc)] = doc
                    pos += len(doc)
                else:  # none fits: crop the shortest (least waste) to fill the row
                    c, k, doc = self._take(0)
                    row[pos:] = doc[:remaining]
                    tail = len(doc) - remaining
                    offset = self.offsets.pop((c, k), 0)
                    if self.keep_remainder and tail >= self.keep_remainder:
                        self.offsets[(c, k)] = offset + remaining
                        self._insert(c, k, doc[remaining:])
                        self.stats["kept_remainders"] += 1
                    else:
                        self.stats["cropped_tokens"] += tail
                    pos = row_len
                self.stats["docs_packed"] += 1
            self.stats["rows"] += 1
        self.stats["placed_tokens"] += batch.size
        self.stats["batches"] += 1
        return batch

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        ranges: list[list[int]] = []
        for c, k in sorted(self.docs):
            if ranges and ranges[-1][0] == c and ranges[-1][2] == k:
                ranges[-1][2] = k + 1
            else:
                ranges.append([c, k, k + 1])
        return {"version": STATE_VERSION, "num_units": len(self.units), "seq_len": self.T,
                "buffer_size": self.buffer_size, "keep_remainder": self.keep_remainder,
                "next_doc": [self.next_c, self.next_k], "buffer": ranges,
                "offsets": [[c, k, o] for (c, k), o in sorted(self.offsets.items())], "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        saved = dict(state)
        saved.setdefault("keep_remainder", 0)  # states written before the option existed
        if saved.get("version") == 1:
            if saved.get("world_size", 1) != 1:
                raise ValueError(f"this data-loader state was written by {saved.get('world_size')} ranks before the "
                                 f"loader became rank-free: resume it with the code that wrote it")
            saved["version"] = STATE_VERSION  # a single-process stream is the global stream
        expect = {"version": STATE_VERSION, "num_units": len(self.units), "seq_len": self.T,
                  "buffer_size": self.buffer_size, "keep_remainder": self.keep_remainder}
        wrong = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
        if wrong:
            raise ValueError(f"data-loader state does not match this loader (saved, now): {wrong}; resume with the "
                             f"same data, sequence length, buffer size and --keep-remainder")
        c, k = state["next_doc"]
        self._reset(c, k, state["stats"])
        offsets = {(uc, uk): o for uc, uk, o in state.get("offsets", [])}
        # re-read and re-tokenise only the buffered documents, one read per distinct unit
        by_unit: dict[int, list[tuple[int, int]]] = {}
        for uc, k0, k1 in state["buffer"]:
            by_unit.setdefault(uc % len(self.units), []).extend((uc, k) for k in range(k0, k1))
        for u, ids in by_unit.items():
            texts = self.reader.read(self.units[u])
            toks = self.tokenizer.encode([texts[k] for _, k in ids], prepend=self.bos,
                                         num_threads=self.tokenizer_threads)
            for (uc, k), t in zip(ids, toks):
                o = offsets.get((uc, k), 0)
                if o:
                    self.offsets[(uc, k)] = o
                self._insert(uc, k, np.asarray(t, dtype=np.int32)[o:])

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        self._lookahead.shutdown(wait=False, cancel_futures=True)

    def derived_stats(self) -> dict:
        s = dict(self.stats)
        s["epoch"] = self.next_c // len(self.units)
        s["docs_seen"] = s["docs_packed"]  # documents that went into rows (whole or cropped)
        s["utilisation"] = s["placed_tokens"] / max(1, s["rows"] * (self.T + 1))
        s["crop_fraction"] = s["cropped_tokens"] / max(1, s["placed_tokens"] + s["cropped_tokens"])
        return s


def _produce(packer: Packer, out: queue.Queue, stop: threading.Event, pin: bool, rows: slice) -> None:
    """Producer thread: pack rounds of W*B rows, keep this rank's B (`rows`), split into (inputs, targets),
    attach the state after each round."""
    try:
        while not stop.is_set():
            batch = packer.next_batch()[rows]  # (W*B, T+1) -> (B, T+1)
            xy = np.stack([batch[:, :-1], batch[:, 1:]])  # (2, B, T), each half contiguous
            tensor = torch.from_numpy(xy)
            if pin:
                tensor = tensor.pin_memory()
            item = (tensor, packer.state_dict(), packer.derived_stats())
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises it)
        out.put(e)


def _check_text_column(units: list[Unit]) -> None:
    """A parquet `text` column that is not strings (ints, lists: someone else's parquet files) is a one-line
    DataError at construction, not an AttributeError from the tokenizer thread later."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in dict.fromkeys(u.path for u in units if u.path.suffix == ".parquet"):
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowException, OSError):
            continue  # unreadable files are reported (or skipped) by the reader
        if "text" not in schema.names:
            raise DataError(f"{path} has no 'text' column (columns: {', '.join(schema.names)}); prepare the data with "
                            f"`python -m nanochat.dataset prepare --input ...`")
        kind = schema.field("text").type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: the 'text' column is {kind}, not strings; prepare the data with "
                            f"`python -m nanochat.dataset prepare --input ...`")


class DataLoader:
    """Iterator of `(inputs, targets)` (B, T) int64 on `device`; see the module docstring.

    `split="val"` reads the pinned validation shard from its beginning every time a loader is built;
    `max_batches` ends the iteration after that many batches (the stream itself loops over epochs).
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train", device="cpu", rank: int = 0,
                 world_size: int = 1, data_dir: str | Path | None = None, buffer_size: int = 1000,
                 tokenizer_threads: int = 4, prefetch: int = 4, skip_corrupt: bool = False,
                 max_batches: int | None = None, state: dict | None = None, text_field: str = "text",
                 encoding_errors: str = "strict", keep_remainder: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        reader = ShardReader(text_field, encoding_errors)  # the last two matter for raw jsonl/txt folders only
        units, self.skipped_files = list_units(split, data_dir, reader, skip_corrupt)
        _check_text_column(units)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.prefetch, self.max_batches = prefetch, max_batches
        self.batch_size = batch_size
        # every rank packs the same rounds of W*B global rows and keeps its own B (module docstring)
        self.packer = Packer(tokenizer, units, batch_size * world_size, seq_len, buffer_size, reader,
                             tokenizer_threads, skip_corrupt, keep_remainder)
        self._state = self.packer.state_dict()
        self._stats = self.packer.derived_stats()
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._yielded = 0
        self._error: BaseException | None = None
        self._closed = False
        if state is not None:
            self.load_state_dict(state)

    # -- iteration --------------------------------------------------------------------------------

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        pin = self.device.type == "cuda"
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        self._thread = threading.Thread(target=_produce, args=(self.packer, self._queue, self._stop, pin, rows),
                                        name=f"nanochat-dataloader-{self.split}-r{self.rank}", daemon=True)
        self._thread.start()

    def _halt(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread, self._queue = None, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_batches is not None and self._yielded >= self.max_batches:
            raise StopIteration
        if self._error is not None:  # the packer stopped mid-batch: only load_state_dict can restart it
            raise self._error
        if self._closed:
            raise RuntimeError("this DataLoader is closed; build a new one (pass state=... to resume)")
        if self._thread is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._thread.join()
            self._thread, self._error = None, item
            raise item
        tensor, self._state, self._stats = item
        self._yielded += 1
        if self.device.type != "cpu":
            tensor = tensor.to(self.device, non_blocking=True)
        return tensor[0], tensor[1]

    # -- state --------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """State after the last batch handed out (not after what the producer has read ahead). The same on
        every rank; `rank`, `world_size` and `batch_size` are recorded for information only."""
        return {**self._state, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (any rank's: they are equal), also with another world size or micro-batch.
        The stream resumes at the global row where the state stopped; with the same total batch per step
        (W*B*accumulation) a checkpoint taken at a step boundary continues the run exactly."""
        if state.get("split") != self.split:
            raise ValueError(f"data-loader state is for the {state.get('split')!r} split, this loader reads "
                             f"{self.split!r}")
        self._halt()
        self._error = None
        self.packer.load_state_dict(state)
        self._state = self.packer.state_dict()
        self._stats = self.packer.derived_stats()

    def stats(self) -> dict:
        """Packing statistics as of the last batch handed out: epoch, batches, docs_read, docs_seen (packed),
        utilisation (non-padding fraction of row tokens), crop_fraction (tokens discarded by crops over
        tokens consumed), cropped_tokens, kept_remainders (tails put back, with keep_remainder > 0), long_docs,
        empty_docs, corrupt_units, skipped_files."""
        return {**self._stats, "skipped_files": len(self.skipped_files)}

    def close(self) -> None:
        """Stop the threads. Final: batches read ahead are dropped, so the loader cannot go on."""
        self._closed = True
        self._halt()
        self.packer.close()

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (half-built object or interpreter shutdown)
            pass
