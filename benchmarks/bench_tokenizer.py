"""Tokenizer benchmark: BPE training throughput and peak memory, compression, encoding throughput.

    python benchmarks/bench_tokenizer.py [--mb 50] [--vocab-size 32768] [--text-dir /work/shared/data/text]

The training corpus is built by shuffling and repeating the documents under --text-dir until it
holds --mb megabytes (there is only ~7.7 MB of real text offline). Repetition multiplies every pair
count by about the same factor for every trainer, so it is fair for a speed comparison, but the
unique-word set (which drives the merge phase) stays that of the 7.7 MB: real 50 MB of fresh text
would spend relatively more time merging. 10% of the documents are held out (never repeated into
the corpus) to measure compression.

Each trainer runs in its own subprocess so its peak RSS is its own:
- `rustbpe (library)`: rustbpe.Tokenizer().train_from_iterator called directly: the reference point.
- `ours rustbpe` / `ours hf`: nanochat's Tokenizer.train_from_iterator(trainer=...), capping included.
"""

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, iter_text_files  # noqa: E402

DEFAULT_TEXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def build_corpus(text_dir: Path, mb: float, doc_cap: int = 10_000, seed: int = 0):
    docs = [d[:doc_cap] for d in iter_text_files(text_dir)]
    rng = random.Random(seed)
    rng.shuffle(docs)
    n_held = len(docs) // 10
    held_out, train_docs = docs[:n_held], docs[n_held:]
    corpus, size = [], 0
    while size < mb * 1e6:
        epoch = train_docs[:]
        rng.shuffle(epoch)
        for d in epoch:
            corpus.append(d)
            size += len(d.encode("utf-8"))
            if size >= mb * 1e6:
                break
    return corpus, held_out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def worker(args) -> None:
    """Train once in this process and print a JSON line of figures; save the ranks to --out."""
    corpus, _ = build_corpus(Path(args.text_dir), args.mb)
    n_bytes = sum(len(d.encode("utf-8")) for d in corpus)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    if args.worker == "rustbpe-lib":
        import rustbpe

        lib = rustbpe.Tokenizer()
        lib.train_from_iterator(iter(corpus), args.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        tok = Tokenizer({bytes(b): r for b, r in lib.get_mergeable_ranks()})
    else:
        tok = Tokenizer.train_from_iterator(corpus, args.vocab_size, trainer=args.worker.removeprefix("ours-"),
                                            max_chars=None, doc_cap=None)
    seconds = time.perf_counter() - t0
    rss_peak = peak_rss_mb()  # before save(), which imports torch
    tok.save(args.out)
    print(json.dumps(dict(seconds=seconds, mb=n_bytes / 1e6, mb_per_s=n_bytes / 1e6 / seconds,
                          rss_corpus_mb=rss_before, rss_peak_mb=rss_peak, vocab=tok.get_vocab_size())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50.0, help="megabytes of training text (built by repetition)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--text-dir", default=str(DEFAULT_TEXT_DIR))
    p.add_argument("--trainers", nargs="*", default=["rustbpe-lib", "ours-rustbpe", "ours-hf"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not Path(args.text_dir).is_dir():
        sys.exit(f"error: text dir {args.text_dir} not found; pass --text-dir with .txt/.jsonl/.parquet files")

    corpus, held_out = build_corpus(Path(args.text_dir), args.mb)
    held_bytes = sum(len(d.encode("utf-8")) for d in held_out)
    print(f"corpus: {sum(len(d.encode()) for d in corpus) / 1e6:.1f} MB in {len(corpus):,} docs (repeated/shuffled "
          f"from {args.text_dir}); held out: {len(held_out)} docs, {held_bytes / 1e6:.2f} MB; vocab {args.vocab_size:,}")
    results, toks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.trainers:
            out = Path(tmp) / name
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out), "--mb", str(args.mb),
                   "--vocab-size", str(args.vocab_size), "--text-dir", args.text_dir]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"error: trainer {name} failed:\n{res.stderr[-2000:]}")
            results[name] = json.loads(res.stdout.strip().splitlines()[-1])
            toks[name] = Tokenizer.from_directory(out)
            print(f"  trained {name}: {results[name]['seconds']:.1f}s", flush=True)

    ref = "rustbpe-lib" if "rustbpe-lib" in toks else next(iter(toks))
    ref_tokens = sum(map(len, toks[ref].encode(held_out)))
    print("\n## Training (vocab %d)\n" % args.vocab_size)
    ref_vocab = set(toks[ref].mergeable_ranks)
    print(f"| trainer | seconds | MB/s | peak RSS MB (before training) | held-out bytes/token | vs {ref} "
          f"| tokens shared with {ref} |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        n_tokens = sum(map(len, toks[name].encode(held_out)))
        shared = len(ref_vocab & set(toks[name].mergeable_ranks))
        print(f"| {name} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | {r['rss_peak_mb']:.0f} ({r['rss_corpus_mb']:.0f}) "
              f"| {held_bytes / n_tokens:.3f} | {(ref_tokens - n_tokens) / ref_tokens * 100:+.2f}% | {shared:,} |")

    # encoding throughput with the default tokenizer (tiktoken under the hood)
    tok = toks.get("ours-rustbpe") or toks[ref]
    docs = corpus[: max(1, len(corpus) // 5)]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    print(f"\n## Encoding ({len(docs):,} docs, {n_bytes / 1e6:.1f} MB)\n")
    print("| mode | tokens/s | MB/s |")
    print("|---|---|---|")
    t0 = time.perf_counter()
    n_tokens = sum(len(tok.encode(d)) for d in docs)
    dt = time.perf_counter() - t0
    print(f"| single (one doc per call) | {n_tokens / dt:,.0f} | {n_bytes / 1e6 / dt:.2f} |")
    for threads in (1, 2):
        t0 = time.perf_counter()
        n_tokens = sum(map(len, tok.encode(docs, num_threads=threads)))
        dt = time.perf_counter() - t0
        print(f"| batched, {threads} thread{'s' if threads > 1 else ''} | {n_tokens / dt:,.0f} | {n_bytes / 1e6 / dt:.2f} |")


if __name__ == "__main__":
    main()
