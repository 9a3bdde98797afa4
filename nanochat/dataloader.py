"""Pretraining batches: tokenise on the fly, pack documents into rows with best-fit, resume exactly, and
let each rank read and tokenise only its share of the data.

Stream. A stream reads units (parquet row groups) of the split's shard list (`nanochat.dataset.list_units`),
looping over epochs. Units are numbered by a monotonic counter `c` (epoch = c // number of units),
documents by their row `k` inside the unit, so `(c, k)` names every document the run will ever read.

Logical streams (training; MosaicML's canonical nodes and fms-fsdp's logical shards are the same idea,
REFERENCE section 14). The training data is cut into L logical streams, L fixed for a run (`--data-streams`,
recorded in run.json and in every checkpoint's loader state). The looped sequence of units is dealt
round-robin: stream s reads units s, s + L, s + 2L, ... (when the split has fewer units than streams, each
unit is cut into P = ceil(L / units) pieces, rows k = j mod P, and the pieces are dealt instead). Each
stream packs its own rows (best-fit, below) and has its own resumable state. An optimizer step takes
A*B*W/L rows from every stream (A accumulation steps of B rows on W ranks; L must divide the step's rows),
so the rows of a step do not depend on W, B or A. Rank r of W serves streams [r*L/W, (r+1)*L/W) and
reads and tokenises only their units: 1/W of the data. Its rows of a step are interleaved (row j of each
of its streams, then row j + 1) and cut into its A micro-batches. W must divide L: another world size is
refused with a one-line error naming the valid ones. A checkpoint holds each rank's stream states;
`merge_states` gathers them and every rank of the resumed run takes its own streams (re-dealt, like the
ZeRO-2 optimizer state), so a run continues exactly on any W dividing L, with any micro-batch giving the
same rows per step. A rank keeps L/W best-fit buffers of `stream_buffer(buffer_size, L)` documents each
(at least 256: smaller buffers crop far more, benchmarks/results/dataloader.md), so one process holds
more documents than the single stream's 1,000; tokens are held as uint16 where the vocabulary fits.

The single global stream (`streams=None`): validation, and runs resumed from a checkpoint written before
logical streams. Every rank packs the same rounds of W*B global rows and keeps its own B (micro-batch n of
rank r is global micro-batch n*W + r), so any world size continues it, at the price of every rank reading
and tokenising all of it. A checkpoint of that kind is never read as stream states: its run continues on
the global stream.

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
read (piece, row), the ids of the documents in the buffer (stored as ranges `[c, k0, k1)`), the offsets of
the buffered tails (`[c, k, offset]`, with keep_remainder), and the counters; with logical streams, one
such state per stream. `load_state_dict` re-reads and re-tokenises the buffered documents. The background
thread works
ahead, but every batch travels with the state *after* it, and `state_dict()` returns the state of
the last batch the consumer received, so read-ahead never leaks into a checkpoint (inside an optimizer
step: the state before the step and how many of its micro-batches were handed out, which resumes only on
the same geometry). The state is a small JSON-able dict (a few KB per stream).

Threads. One producer thread packs batches into a bounded queue, which overlaps tokenising with
training. Where a rank has at most 2 streams, a lookahead thread per stream also reads and tokenises the
next unit while the current one is packed (with more streams, a second unit per stream costs memory for
little). The tokenizer's batch encode uses `tokenizer_threads` threads of its own (tiktoken releases the
GIL). On CUDA the batch is pinned in the producer and copied with `non_blocking=True`.

The tokenizer is duck-typed: `encode(list[str], prepend=bos_id, num_threads=N) -> list[list[int]]`
and `get_bos_token_id()`.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import math
import queue
import threading
from pathlib import Path

import numpy as np
import torch

from nanochat.dataset import DataError, ShardReader, Unit, list_units

STATE_VERSION = 2  # 2: the global (rank-free) stream; version-1 states of single-process runs are the same
STREAMS_VERSION = 3  # 3: logical streams, each with its own packer state
DEFAULT_STREAMS = 64  # --data-streams 0 picks the largest power of two up to this dividing a step's rows
STREAM_BUFFER_MIN = 256  # documents per stream's best-fit buffer, at least


class Packer:
    """Synchronous, deterministic best-fit packer over one rank's unit stream. `next_batch()` returns
    an int64 array (B, T+1); `state_dict()` describes the position after the last batch returned."""

    def __init__(self, tokenizer, units: list[Unit], batch_size: int, seq_len: int, buffer_size: int = 1000,
                 reader: ShardReader | None = None, tokenizer_threads: int = 4, skip_corrupt: bool = False,
                 keep_remainder: int = 0, stream: int = 0, streams: int = 1, lookahead: bool = True):
        if not units:
            raise DataError("no units to read")
        # logical stream `stream` of `streams` reads pieces stream, stream + streams, ... of the looped piece
        # sequence; a unit is one piece, or P = ceil(streams / units) pieces (documents k = j mod P) when the
        # split has fewer units than streams
        self.stream, self.streams = stream, streams
        self.P = max(1, -(-streams // len(units))) if streams > 1 else 1
        # a logical stream of small data (the CPU demo: ~140 chapters a stream) comes round to its first
        # documents before its buffer is full; a second copy of a buffered document is not pulled in (the
        # buffer packs what it has first), else rows and batches repeat documents and val bpb suffers
        # (1.556 vs 1.505 on the demo). The single global stream keeps its behaviour (validation, old runs).
        self.distinct = streams > 1
        # tokens are held as uint16 where the vocabulary allows (half the memory of the buffers)
        vocab = getattr(tokenizer, "get_vocab_size", None)
        self.dtype = np.uint16 if vocab is not None and vocab() <= 2 ** 16 else np.int32
        if keep_remainder < 0:
            raise ValueError(f"keep_remainder must be >= 0 (0: discard cropped tails), got {keep_remainder}")
        self.keep_remainder = keep_remainder
        self.tokenizer, self.units = tokenizer, units
        self.B, self.T, self.buffer_size = batch_size, seq_len, buffer_size
        self.reader = reader or ShardReader()
        self.tokenizer_threads, self.skip_corrupt = tokenizer_threads, skip_corrupt
        self.bos = tokenizer.get_bos_token_id()
        self._lookahead = (cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-tokenize")
                           if lookahead else None)
        self._futures: dict[int, cf.Future] = {}
        self._reset(stream, stream % self.P, {})

    def _reset(self, g: int, k: int, stats: dict) -> None:
        self.next_g, self.next_k = g, k  # next document to pull into the buffer: piece g, row k of its unit
        self.keys: list[tuple[int, int, int]] = []  # sorted (length, c, k) of buffered docs
        self.docs: dict[tuple[int, int], np.ndarray] = {}
        self.buffered: dict[tuple[int, int], int] = {}  # (unit, row) of the buffered docs, whatever the epoch
        self.offsets: dict[tuple[int, int], int] = {}  # buffered tails: tokens of doc (c, k) from this offset
        self.pending: list[np.ndarray | None] = []  # tokens of piece next_g by row (None = empty or not ours)
        self.pending_g = None
        self.stats = dict(batches=0, rows=0, docs_read=0, tokens_read=0, docs_packed=0, placed_tokens=0,
                          cropped_tokens=0, long_docs=0, empty_docs=0, corrupt_units=0, kept_remainders=0)
        self.stats.update(stats)
        self._futures.clear()

    # -- reading ------------------------------------------------------------------------------

    def _tokenize_piece(self, g: int) -> list[np.ndarray | None] | DataError:
        """Tokens of the documents of piece g by row of its unit (None for empty ones and for rows of the
        unit's other pieces), or the read error."""
        unit = self.units[(g // self.P) % len(self.units)]
        try:
            texts = self.reader.read(unit)
        except DataError as e:
            return e
        mine = range(g % self.P, len(texts), self.P)
        bad = next((texts[i] for i in mine if not isinstance(texts[i], str)), None)
        if bad is not None:
            return DataError(f"{unit.path} row group {unit.index}: the text column holds {type(bad).__name__} values, "
                             f"not strings; re-prepare the data (`python -m nanochat.dataset prepare --input ...`)")
        keep = [i for i in mine if texts[i].strip()]
        ids = self.tokenizer.encode([texts[i] for i in keep], prepend=self.bos, num_threads=self.tokenizer_threads)
        out: list[np.ndarray | None] = [None] * len(texts)
        for i, toks in zip(keep, ids):
            out[i] = np.asarray(toks, dtype=self.dtype)
        return out

    def _piece_tokens(self, g: int):
        fut = self._futures.pop(g, None)
        result = fut.result() if fut is not None else self._tokenize_piece(g)
        nxt = g + self.streams
        if self._lookahead is not None and nxt not in self._futures:  # the next piece while this one is packed
            self._futures[nxt] = self._lookahead.submit(self._tokenize_piece, nxt)
        for stale in [x for x in self._futures if x < g]:
            self._futures.pop(stale).cancel()
        return result

    def _next_piece(self) -> None:
        self.next_g += self.streams
        self.next_k = self.next_g % self.P

    def _pull(self) -> bool:
        """Move the next non-empty document of the stream into the buffer (True), or leave it where it is when
        a logical stream has come round to a document it still buffers (False)."""
        pieces_without_docs = 0
        while True:
            if self.pending_g != self.next_g:
                pieces_without_docs += 1
                if pieces_without_docs > len(self.units) * self.P + 1:
                    whose = f"logical stream {self.stream} of {self.streams}: its share of " if self.streams > 1 else ""
                    raise DataError(f"{whose}a whole epoch ({len(self.units)} row groups, from {self.units[0].path}) "
                                    f"gave no document: every one is empty or unreadable")
                result = self._piece_tokens(self.next_g)
                if isinstance(result, DataError):
                    if not self.skip_corrupt:
                        raise result
                    self.stats["corrupt_units"] += 1
                    self._next_piece()
                    continue
                self.pending, self.pending_g = result, self.next_g
            if self.next_k >= len(self.pending):
                self._next_piece()
                continue
            c, k = self.next_g // self.P, self.next_k
            toks = self.pending[k]
            if self.distinct and toks is not None and (c % len(self.units), k) in self.buffered:
                return False  # come round to a document still in the buffer: not pulled (yet)
            self.next_k += self.P
            self.stats["docs_read"] += 1
            if toks is None:
                self.stats["empty_docs"] += 1
                continue
            if len(toks) > self.T + 1:
                self.stats["long_docs"] += 1
            self.stats["tokens_read"] += len(toks)
            self._insert(c, k, toks)
            return True

    def _insert(self, c: int, k: int, toks: np.ndarray) -> None:
        bisect.insort(self.keys, (len(toks), c, k))
        self.docs[(c, k)] = toks
        ident = (c % len(self.units), k)
        self.buffered[ident] = self.buffered.get(ident, 0) + 1

    def _take(self, index: int) -> tuple[int, int, np.ndarray]:
        _, c, k = self.keys.pop(index)
        ident = (c % len(self.units), k)
        self.buffered[ident] -= 1
        if not self.buffered[ident]:
            del self.buffered[ident]
        return c, k, self.docs.pop((c, k))

    # -- packing ------------------------------------------------------------------------------

    def next_batch(self) -> np.ndarray:
        row_len = self.T + 1
        batch = np.empty((self.B, row_len), dtype=np.int64)
        for row in batch:
            pos = 0
            while pos < row_len:
                while len(self.keys) < self.buffer_size and self._pull():
                    pass
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

    def core_state(self) -> dict:
        """Where the stream stands: the next document (piece, row), the buffered documents as ranges
        [unit counter, k0, k1) (rows k0, k0 + P, ... < k1), the buffered tails' offsets, the counters."""
        ranges: list[list[int]] = []
        for c, k in sorted(self.docs):
            if ranges and ranges[-1][0] == c and ranges[-1][2] == k - self.P + 1:
                ranges[-1][2] = k + 1
            else:
                ranges.append([c, k, k + 1])
        return {"next_doc": [self.next_g, self.next_k], "buffer": ranges,
                "offsets": [[c, k, o] for (c, k), o in sorted(self.offsets.items())], "stats": dict(self.stats)}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "num_units": len(self.units), "seq_len": self.T,
                "buffer_size": self.buffer_size, "keep_remainder": self.keep_remainder, **self.core_state()}

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
        self.load_core(state)

    def load_core(self, state: dict) -> None:
        g, k = state["next_doc"]
        self._reset(g, k, state["stats"])
        offsets = {(uc, uk): o for uc, uk, o in state.get("offsets", [])}
        # re-read and re-tokenise only the buffered documents, one read per distinct unit
        by_unit: dict[int, list[tuple[int, int]]] = {}
        for uc, k0, k1 in state["buffer"]:
            by_unit.setdefault(uc % len(self.units), []).extend((uc, k) for k in range(k0, k1, self.P))
        for u, ids in by_unit.items():
            texts = self.reader.read(self.units[u])
            toks = self.tokenizer.encode([texts[k] for _, k in ids], prepend=self.bos,
                                         num_threads=self.tokenizer_threads)
            for (uc, k), t in zip(ids, toks):
                o = offsets.get((uc, k), 0)
                if o:
                    self.offsets[(uc, k)] = o
                self._insert(uc, k, np.asarray(t, dtype=self.dtype)[o:])

    def close(self) -> None:
        for fut in self._futures.values():
            fut.cancel()
        if self._lookahead is not None:
            self._lookahead.shutdown(wait=False, cancel_futures=True)

    def derived_stats(self) -> dict:
        s = dict(self.stats)
        s["epoch"] = self.next_g // self.P // len(self.units)
        s["docs_seen"] = s["docs_packed"]  # documents that went into rows (whole or cropped)
        s["utilisation"] = s["placed_tokens"] / max(1, s["rows"] * (self.T + 1))
        s["crop_fraction"] = s["cropped_tokens"] / max(1, s["placed_tokens"] + s["cropped_tokens"])
        return s


class _GlobalRounds:
    """The single global stream (validation, and runs resumed from a checkpoint written before logical
    streams): every rank packs rounds of W*B rows and keeps its own B, so any world size continues it."""

    def __init__(self, packer: Packer, rank: int, batch_size: int):
        self.packer, self.rows = packer, slice(rank * batch_size, (rank + 1) * batch_size)

    def next_round(self) -> list[tuple[np.ndarray, dict, dict]]:
        batch = self.packer.next_batch()[self.rows]  # (W*B, T+1) -> (B, T+1)
        return [(batch, self.packer.state_dict(), self.packer.derived_stats())]

    def close(self) -> None:
        self.packer.close()


class _StreamRounds:
    """This rank's logical streams: a round is one optimizer step, `per_stream` rows from each stream,
    interleaved (row j of every stream, then row j + 1) and cut into `grad_accum` micro-batches of B rows.
    A micro-batch travels with the state after its round, or (inside a round) the state before the round
    and how many of its micro-batches were handed out."""

    def __init__(self, loader: "DataLoader", packers: list[Packer], per_stream: int, grad_accum: int, batch_size: int):
        self.loader, self.packers = loader, packers
        self.per_stream, self.A, self.B = per_stream, grad_accum, batch_size
        self.skip = 0  # micro-batches of the first round already handed out before a resume
        self.last: dict | None = None  # the state after the last round packed (= before the next one)

    def states(self) -> list[dict]:
        return [dict(p.core_state(), stream=p.stream) for p in self.packers]

    def stats(self) -> dict:
        return _sum_stats([p.derived_stats() for p in self.packers], self.packers[0].T + 1)

    def next_round(self) -> list[tuple[np.ndarray, dict, dict]]:
        if self.last is None:
            self.last = self.loader._stream_state(self.states(), 0)
        before = self.last
        rows = np.stack([p.next_batch() for p in self.packers], axis=1)  # (per_stream, n_streams, T+1)
        rows = rows.reshape(-1, rows.shape[-1])
        after, stats = self.loader._stream_state(self.states(), 0), self.stats()
        self.last = after
        out = []
        for i in range(self.A):
            state = after if i == self.A - 1 else dict(before, micro=i + 1)
            out.append((rows[i * self.B:(i + 1) * self.B], state, stats))
        out, self.skip = out[self.skip:], 0
        return out

    def close(self) -> None:
        for p in self.packers:
            p.close()


def _sum_stats(parts: list[dict], row_len: int) -> dict:
    """Packing statistics of several streams as one: counters summed, epoch the slowest stream's, batches
    the rounds (optimizer steps) packed."""
    total = {k: sum(p[k] for p in parts) for k in parts[0] if k not in ("epoch", "utilisation", "crop_fraction")}
    total["epoch"] = min(p["epoch"] for p in parts)
    total["batches"] = parts[0]["batches"]
    total["utilisation"] = total["placed_tokens"] / max(1, total["rows"] * row_len)
    total["crop_fraction"] = total["cropped_tokens"] / max(1, total["placed_tokens"] + total["cropped_tokens"])
    return total


def _produce(source, out: queue.Queue, stop: threading.Event, pin: bool) -> None:
    """Producer thread: rounds of batches from `source`, split into (inputs, targets), each with the state
    after it."""
    try:
        while not stop.is_set():
            for batch, state, stats in source.next_round():
                xy = np.stack([batch[:, :-1], batch[:, 1:]])  # (2, B, T), each half contiguous
                tensor = torch.from_numpy(xy)
                if pin:
                    tensor = tensor.pin_memory()
                item = (tensor, state, stats)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
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


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_streams(rows_per_step: int, world_size: int) -> int:
    """`--data-streams` left at 0: the largest power of two up to 64 that divides the rows of a step (every
    usual GPU count then resumes), or, when the world size does not divide that, the largest divisor of
    the step's rows up to max(64, W) that it divides."""
    base = math.gcd(DEFAULT_STREAMS, rows_per_step)
    if base % world_size == 0:
        return base
    return max(d for d in divisors(rows_per_step) if d % world_size == 0 and d <= max(DEFAULT_STREAMS, world_size))


def stream_buffer(buffer_size: int, streams: int) -> int:
    """Documents in each stream's packing buffer: the whole `buffer_size` for one stream (the single global
    stream of before), else its share but at least STREAM_BUFFER_MIN (best-fit wastes far more with fewer
    candidates: benchmarks/results/dataloader.md)."""
    return buffer_size if streams == 1 else max(STREAM_BUFFER_MIN, -(-buffer_size // streams))


class DataLoader:
    """Iterator of `(inputs, targets)` (B, T) int64 on `device`; see the module docstring.

    `streams=L` (training): L logical streams, rank r of W packs streams [r*L/W, (r+1)*L/W) and reads only
    their data; `grad_accum` (A) sets the round: each optimizer step takes A*B*W/L rows from every stream.
    `streams=None`: the single global stream every rank packs (validation; checkpoints of before).
    `adopt_saved_streams`: a state with another L is taken on (the flag was left automatic) instead of refused.
    `stream_buffer_size`: documents in each stream's buffer (default `stream_buffer(buffer_size, L)`).
    `split="val"` reads the pinned validation shard from its beginning every time a loader is built;
    `max_batches` ends the iteration after that many batches (the stream itself loops over epochs).
    """

    def __init__(self, tokenizer, batch_size: int, seq_len: int, split: str = "train", device="cpu", rank: int = 0,
                 world_size: int = 1, data_dir: str | Path | None = None, buffer_size: int = 1000,
                 tokenizer_threads: int = 4, prefetch: int = 4, skip_corrupt: bool = False,
                 max_batches: int | None = None, state: dict | None = None, text_field: str = "text",
                 encoding_errors: str = "strict", keep_remainder: int = 0, streams: int | None = None,
                 grad_accum: int = 1, adopt_saved_streams: bool = False, stream_buffer_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if keep_remainder < 0:
            raise ValueError(f"keep_remainder must be >= 0 (0: discard cropped tails), got {keep_remainder}")
        self.reader = ShardReader(text_field, encoding_errors)  # the last two matter for raw jsonl/txt folders only
        self.units, self.skipped_files = list_units(split, data_dir, self.reader, skip_corrupt)
        _check_text_column(self.units)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.prefetch, self.max_batches = prefetch, max_batches
        self.batch_size, self.grad_accum, self.seq_len = batch_size, grad_accum, seq_len
        self.tokenizer, self.tokenizer_threads, self.skip_corrupt = tokenizer, tokenizer_threads, skip_corrupt
        self.buffer_size, self.keep_remainder = buffer_size, keep_remainder
        self.stream_buffer_size = stream_buffer_size
        self.adopt_saved_streams = adopt_saved_streams
        self.notice: str | None = None  # what a resume changed, for the log
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._yielded = 0
        self._error: BaseException | None = None
        self._closed = False
        self._build(streams)
        if state is not None:
            self.load_state_dict(state)

    def _build(self, streams: int | None) -> None:
        """(Re)build the packers: the single global stream (None) or this rank's share of `streams`."""
        if getattr(self, "source", None) is not None:
            self.source.close()
        self.streams = streams
        if streams is None:
            packer = Packer(self.tokenizer, self.units, self.batch_size * self.world_size, self.seq_len,
                            self.buffer_size, self.reader, self.tokenizer_threads, self.skip_corrupt,
                            self.keep_remainder)
            self.source = _GlobalRounds(packer, self.rank, self.batch_size)
            self.packer = packer
            self._state, self._stats = packer.state_dict(), packer.derived_stats()
            return
        self._check_streams(streams)
        rows = self.grad_accum * self.batch_size * self.world_size
        per_rank = streams // self.world_size
        local = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        buffer = self._stream_buffer()
        # one lookahead thread per stream is worth it only where a rank has few streams (memory: a unit each)
        packers = [Packer(self.tokenizer, self.units, rows // streams, self.seq_len, buffer, self.reader,
                          self.tokenizer_threads, self.skip_corrupt, self.keep_remainder, stream=s, streams=streams,
                          lookahead=per_rank <= 2) for s in local]
        self.source = _StreamRounds(self, packers, rows // streams, self.grad_accum, self.batch_size)
        self.packer = None
        self._state, self._stats = self._stream_state(self.source.states(), 0), self.source.stats()

    def _stream_buffer(self) -> int:
        return self.stream_buffer_size or stream_buffer(self.buffer_size, self.streams)

    def _check_streams(self, streams: int) -> None:
        rows = self.grad_accum * self.batch_size * self.world_size
        if streams < 1:
            raise DataError(f"the number of logical data streams must be >= 1, got {streams}")
        if streams % self.world_size:
            valid = ", ".join(map(str, divisors(streams)))
            raise DataError(f"the training data is cut into {streams} logical streams, which {self.world_size} ranks "
                            f"cannot share: run on {valid} ranks (a divisor of {streams}; --data-streams is fixed "
                            f"for a run)")
        if rows % streams:
            valid = ", ".join(str(d) for d in divisors(rows) if d % self.world_size == 0)
            raise DataError(f"--data-streams {streams} does not divide the {rows} rows of an optimizer step "
                            f"(total batch / sequence length): use one of {valid}")

    def _stream_state(self, stream_states: list[dict], micro: int) -> dict:
        return {"version": STREAMS_VERSION, "streams": self.streams, "num_units": len(self.units),
                "seq_len": self.seq_len, "buffer_size": self._stream_buffer(),
                "keep_remainder": self.keep_remainder, "micro": micro, "stream_states": stream_states}

    # -- iteration --------------------------------------------------------------------------------

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        pin = self.device.type == "cuda"
        self._thread = threading.Thread(target=_produce, args=(self.source, self._queue, self._stop, pin),
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
        """State after the last batch handed out (not after what the producer has read ahead). The global
        stream's is the same on every rank; with logical streams each rank's holds its own streams, and
        `merge_states` of all ranks' states loads on any world size that divides L. `rank`, `world_size`,
        `batch_size` and `grad_accum` are recorded for information (and for a state saved inside a step)."""
        return {**self._state, "split": self.split, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "grad_accum": self.grad_accum}

    @staticmethod
    def merge_states(states: list[dict]) -> dict:
        """One state from every rank's `state_dict()` (a checkpoint's list): the logical streams' states
        gathered (each saved by the rank that served it), or the global stream's state (equal on all ranks)."""
        if not states:
            raise ValueError("no data-loader states to merge")
        if any("stream_states" not in st for st in states):
            return states[0]
        by_stream: dict[int, dict] = {}
        for st in states:
            for ss in st["stream_states"]:
                by_stream.setdefault(ss["stream"], ss)
        L = states[0]["streams"]
        missing = sorted(set(range(L)) - set(by_stream))
        if missing:
            raise DataError(f"the saved data-loader states lack logical streams {missing[:8]} of {L}: the "
                            f"checkpoint is incomplete (written by {len(states)} of its ranks?)")
        if len({st.get("micro", 0) for st in states}) > 1:
            raise DataError("the saved data-loader states of the ranks stop at different micro-batches")
        return dict(states[0], stream_states=[by_stream[s] for s in range(L)])

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Logical streams: a merged state (`merge_states`), or any state holding this
        rank's streams, on any world size dividing L, with any micro-batch and accumulation giving the same
        rows per step; a state of the single global stream (a checkpoint written before logical streams)
        turns this loader into that stream, which any world size continues. Refused with a one-line error:
        another split, data, sequence length, buffer or keep_remainder, a world size not dividing L."""
        if state.get("split") != self.split:
            raise ValueError(f"data-loader state is for the {state.get('split')!r} split, this loader reads "
                             f"{self.split!r}")
        self._halt()
        self._error = None
        if "stream_states" not in state:
            if self.streams is not None:
                self.notice = ("data: the checkpoint's loader state is the single global stream (written before "
                               "logical streams); the run continues on that stream, every rank tokenising all of it")
                self._build(None)
            self.packer.load_state_dict(state)
            self._state, self._stats = self.packer.state_dict(), self.packer.derived_stats()
            return
        if self.streams is None:
            raise ValueError(f"data-loader state of {state['streams']} logical streams, but this loader packs the "
                             f"single global stream")
        if state["streams"] != self.streams:
            if not self.adopt_saved_streams:
                raise DataError(f"the checkpoint's training data is cut into {state['streams']} logical streams but "
                                f"--data-streams is {self.streams}: pass {state['streams']}, or 0 (automatic: the "
                                f"checkpoint's)")
            self.notice = f"data: {state['streams']} logical streams, as in the checkpoint"
            self._build(state["streams"])
        expect = {"num_units": len(self.units), "seq_len": self.seq_len,
                  "buffer_size": self._stream_buffer(), "keep_remainder": self.keep_remainder}
        wrong = {k: (state.get(k), v) for k, v in expect.items() if state.get(k) != v}
        if wrong:
            raise ValueError(f"data-loader state does not match this loader (saved, now): {wrong}; resume with the "
                             f"same data, sequence length, buffer size and --keep-remainder")
        micro = state.get("micro", 0)
        geometry = ("world_size", "batch_size", "grad_accum")
        if micro and any(state.get(k) != getattr(self, k) for k in geometry):
            raise DataError(f"this data-loader state was saved inside an optimizer step (after {micro} micro-batches) "
                            f"by {[state.get(k) for k in geometry]} (ranks, micro-batch, accumulation): it resumes "
                            f"only on the same; checkpoints at step boundaries resume anywhere")
        by_stream = {ss["stream"]: ss for ss in state["stream_states"]}
        for packer in self.source.packers:
            if packer.stream not in by_stream:
                raise ValueError(f"the data-loader state lacks logical stream {packer.stream} (it holds "
                                 f"{len(by_stream)}): load all ranks' states merged by DataLoader.merge_states")
            packer.load_core(by_stream[packer.stream])
        self.source.skip, self.source.last = micro, None
        self._state, self._stats = self._stream_state(self.source.states(), micro), self.source.stats()

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
        self.source.close()

    def __enter__(self) -> "DataLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (half-built object or interpreter shutdown)
            pass
