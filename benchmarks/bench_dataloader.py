"""Data-loader throughput: tokens/s produced (tokenise + best-fit pack + tensor), memory held, resume cost.

Trains a real BPE tokenizer (nanochat.tokenizer, rustbpe) on the shared real text, prepares that text
as shards, then times the loader. The corpus (~7 MB) is shorter than the run, so the loader loops
epochs and keeps tokenising: the figure includes tokenisation, as in training.

    python benchmarks/bench_dataloader.py --batch-size 32 --seq-len 2048 --batches 60
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import data_prep, dataset  # noqa: E402
from nanochat.dataloader import DataLoader  # noqa: E402

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default=os.environ.get("NANOCHAT_SHARED_DATA", "") and
                   str(Path(os.environ["NANOCHAT_SHARED_DATA"]) / "text") or str(SHARED_TEXT))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--buffer-size", type=int, default=1000)
    p.add_argument("--tokenizer-threads", type=int, default=2)
    args = p.parse_args()

    from nanochat.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = data_prep.prepare(args.text, Path(tmp) / "data", val_fraction=0.02, verbose=True)
        docs = list(dataset.iter_documents("train", data_dir))
        n_chars = sum(map(len, docs))
        t0 = time.time()
        tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=args.vocab_size)
        print(f"tokenizer: vocab {tok.get_vocab_size():,} trained in {time.time() - t0:.1f}s on {n_chars / 1e6:.1f}M chars")

        t0, cpu0 = time.time(), time.process_time()
        ids = tok.encode(docs, prepend=tok.get_bos_token_id(), num_threads=args.tokenizer_threads)
        dt, cpu = time.time() - t0, time.process_time() - cpu0
        n_tok = sum(map(len, ids))
        print(f"tokenizer alone: {n_tok / dt:,.0f} tok/s wall, {n_tok / cpu:,.0f} tok/CPU-s ({n_chars / dt / 1e6:.1f} MB/s), "
              f"{n_chars / n_tok:.2f} chars/token, {n_tok:,} tokens per epoch")
        del ids

        rss0 = rss_mb()
        B, T = args.batch_size, args.seq_len
        with DataLoader(tok, B, T, data_dir=data_dir, buffer_size=args.buffer_size,
                        tokenizer_threads=args.tokenizer_threads) as dl:
            next(dl)  # warm-up: fills the buffer
            load0 = os.getloadavg()[0]
            t0, cpu0 = time.time(), time.process_time()
            for i, (x, y) in enumerate(dl, 1):
                if i == args.batches:
                    break
            dt, cpu = time.time() - t0, time.process_time() - cpu0
            stats = dl.stats()
            state = dl.state_dict()
            buffered = sum(a.nbytes for a in dl.packer.docs.values()) / 2**20
        rss1 = rss_mb()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tokens = args.batches * B * T
        print(f"loader B={B} T={T}: {tokens / dt:,.0f} tok/s wall ({args.batches / dt:.2f} batches/s, {args.batches} "
              f"batches); {tokens / cpu:,.0f} tok per CPU-second of this process (all threads); "
              f"machine load average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"memory: RSS +{rss1 - rss0:.0f} MB over the loader's lifetime (peak RSS {peak:.0f} MB incl. "
              f"tokenizer training), packing buffer {buffered:.1f} MB of int32 tokens")
        print(f"packing: utilisation {stats['utilisation']:.3f}, crop fraction {stats['crop_fraction']:.3f}, "
              f"docs packed {stats['docs_packed']:,}, long docs {stats['long_docs']:,}, epoch {stats['epoch']}")
        t0 = time.time()
        with DataLoader(tok, B, T, data_dir=data_dir, buffer_size=args.buffer_size,
                        tokenizer_threads=args.tokenizer_threads, state=state) as resumed:
            next(resumed)
        import json

        print(f"resume: state {len(json.dumps(state)):,} bytes of JSON, restore + first batch {time.time() - t0:.2f}s")
        pack_only(data_dir, B, T, args.buffer_size)


class LengthTokenizer:
    """Stands in for BPE at ~zero cost (one token per 4 characters) to time packing alone."""

    def get_bos_token_id(self):
        return 0

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + [1] * (len(t) // 4) for t in texts]


def pack_only(data_dir: Path, B: int, T: int, buffer_size: int, n: int = 30) -> None:
    from nanochat.dataloader import Packer

    packer = Packer(LengthTokenizer(), dataset.list_units("train", data_dir)[0], B, T, buffer_size)
    for _ in range(n):  # reach a steady buffer
        packer.next_batch()
    t0 = time.process_time()
    for _ in range(n):
        packer.next_batch()
    t1 = time.process_time()
    for _ in range(n):
        packer.state_dict()
        packer.derived_stats()
    t2 = time.process_time()
    packer.close()
    print(f"packing alone (no-op tokenizer): {(t1 - t0) / n * 1e3:.1f} ms CPU per batch (incl. making the "
          f"token lists), state snapshot {(t2 - t1) / n * 1e3:.1f} ms per batch")


if __name__ == "__main__":
    main()
