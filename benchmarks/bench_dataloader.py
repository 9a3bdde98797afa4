"""Data-loader throughput: tokens/s produced (tokenise + best-fit pack + tensor), memory held, resume cost.

Trains a real BPE tokenizer (nanochat.tokenizer, rustbpe) on the shared real text, prepares that text
as shards, then times the loader. The corpus (~7 MB) is shorter than the run, so the loader loops
epochs and keeps tokenising: the figure includes tokenisation, as in training.

    python benchmarks/bench_dataloader.py --batch-size 32 --seq-len 2048 --batches 60
    python benchmarks/bench_dataloader.py ranks      # per-rank work with logical streams, W = 1, 2, 8, 64
    python benchmarks/bench_dataloader.py memory     # buffers, state size and resume time, streams vs before
    python benchmarks/bench_dataloader.py crop       # crop fraction over time, 1,000- vs 256-document buffer
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
from nanochat.common import cpu_name  # noqa: E402
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


def old_loader_class():
    """The loader as it was before logical streams (git 63f1d27: one global stream every rank packs), for
    the single-process comparison; None outside a git checkout."""
    import importlib.util
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "show", "63f1d27:nanochat/dataloader.py"], cwd=root, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "dataloader_before_streams.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("dataloader_before_streams", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DataLoader


def run_loader(make, steps: int, micro: int, warmup: int = 1) -> dict:
    """Hand out `steps` optimizer steps of `micro` micro-batches after `warmup` steps (buffers filled and
    settled); CPU seconds of the whole process (all threads) and the loader's counters over that window."""
    with make() as dl:
        for _ in range(warmup * micro):
            next(dl)
        s0, cpu0, t0 = dl.stats(), time.process_time(), time.time()
        for _ in range(steps * micro):
            next(dl)
        cpu, wall, s1 = time.process_time() - cpu0, time.time() - t0, dl.stats()
    read = s1.get("tokens_read")
    return {"cpu": cpu, "wall": wall, "tokens_read": None if read is None else read - s0["tokens_read"],
            "crop": s1["crop_fraction"], "docs_read": s1["docs_read"] - s0["docs_read"]}


def ranks_main(argv=None) -> None:
    """Per-rank work with logical streams: one rank's loader as rank r of W (no process group needed), for
    W in --world-sizes, interleaved repeats; and the single-process loader against the one before streams."""
    p = argparse.ArgumentParser(description=ranks_main.__doc__)
    p.add_argument("--text", default=",".join(str(SHARED_TEXT / d) for d in ("c4", "dclm_web", "dolma_cc")),
                   help="comma-separated files or folders (default: the web pages of the shared text)")
    p.add_argument("--copies", type=int, default=24, help="the text repeated, for enough row groups and documents")
    p.add_argument("--warmup-steps", type=int, default=8, help="steps before the window (the buffers settle)")
    p.add_argument("--rows-per-group", type=int, default=32)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--rows-per-step", type=int, default=256, help="global rows per optimizer step (2^19 / 2048)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--world-sizes", default="1,2,8,64")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--tokenizer-threads", type=int, default=2)
    args = p.parse_args(argv)
    import statistics

    from nanochat.tokenizer import Tokenizer

    L, R, T = args.streams, args.rows_per_step, args.seq_len
    with tempfile.TemporaryDirectory() as tmp:
        docs = [d for path in args.text.split(",") for d in data_prep.load_documents(path)]
        data_dir = data_prep.prepare(docs * args.copies, Path(tmp) / "data", val_fraction=0.001,
                                     rows_per_group=args.rows_per_group, verbose=False)
        units = len(dataset.list_units("train", data_dir)[0])
        tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=args.vocab_size)
        print(f"data: {len(docs) * args.copies:,} documents ({args.copies} copies of {args.text}), {units} row groups; "
              f"L={L} streams, {R} rows of {T} per step; CPU: {cpu_name()}, load {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        worlds = [int(w) for w in args.world_sizes.split(",")]
        results: dict = {w: [] for w in worlds}
        for rep in range(args.repeats):
            for W in worlds:
                rank = W // 2  # a middle rank
                results[W].append(run_loader(lambda: DataLoader(
                    tok, R // W, T, data_dir=data_dir, rank=rank, world_size=W, streams=L, grad_accum=1,
                    tokenizer_threads=args.tokenizer_threads), args.steps, 1, args.warmup_steps))
                r = results[W][-1]
                print(f"  repeat {rep} W={W}: {r['cpu']:.2f} CPU-s, {r['tokens_read']:,} tokens tokenised", flush=True)
        trained = args.steps * R * T  # global tokens trained in the window
        base = statistics.median(r["cpu"] for r in results[worlds[0]]) * worlds[0]
        base_read = statistics.median(r["tokens_read"] for r in results[worlds[0]]) * worlds[0]
        print(f"\nper rank, {args.steps} steps ({trained:,} tokens trained by all ranks); medians of {args.repeats}")
        print("| W | rank | tokens tokenised by the rank | x W / one process's | CPU-s of the rank | CPU-s per trained "
              "token (all ranks') | x W / one process's |")
        print("|---|---|---|---|---|---|---|")
        for W in worlds:
            cpu = statistics.median(r["cpu"] for r in results[W])
            read = statistics.median(r["tokens_read"] for r in results[W])
            print(f"| {W} | {W // 2} | {read:,.0f} | {read * W / base_read:.2f} | {cpu:.2f} | {cpu / trained:.3e} | "
                  f"{cpu * W / base:.2f} |")

        # single process: the loader before streams (global stream, 1,000-document buffer) vs L streams
        old = old_loader_class()
        B = 32
        A = R // B
        rows = {"before streams (one global stream)": [], f"L={L} streams": []}
        for rep in range(args.repeats):
            if old is not None:
                rows["before streams (one global stream)"].append(run_loader(
                    lambda: old(tok, B, T, data_dir=data_dir, tokenizer_threads=args.tokenizer_threads),
                    args.steps, A, args.warmup_steps))
            rows[f"L={L} streams"].append(run_loader(
                lambda: DataLoader(tok, B, T, data_dir=data_dir, streams=L, grad_accum=A,
                                   tokenizer_threads=args.tokenizer_threads), args.steps, A, args.warmup_steps))
        print(f"\nsingle process, B={B} x {A} accumulation, {args.steps} steps; medians of {args.repeats}")
        print("| loader | tok/s wall | trained tok per CPU-s | crop fraction |")
        print("|---|---|---|---|")
        for name, rs in rows.items():
            if rs:
                print(f"| {name} | {statistics.median(trained / r['wall'] for r in rs):,.0f} | "
                      f"{statistics.median(trained / r['cpu'] for r in rs):,.0f} | "
                      f"{statistics.median(r['crop'] for r in rs):.4f} |")


def memory_main(argv=None) -> None:
    """Memory and resume of one rank's loader with logical streams (W = 1, 8) against the loader before
    streams: buffered tokens, JSON state size, restore + first batch."""
    p = argparse.ArgumentParser(description=memory_main.__doc__)
    p.add_argument("--text", default=",".join(str(SHARED_TEXT / d) for d in ("c4", "dclm_web", "dolma_cc")))
    p.add_argument("--copies", type=int, default=24)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args(argv)
    import json

    from nanochat.tokenizer import Tokenizer

    R, T = 256, 2048
    with tempfile.TemporaryDirectory() as tmp:
        docs = [d for path in args.text.split(",") for d in data_prep.load_documents(path)]
        data_dir = data_prep.prepare(docs * args.copies, Path(tmp) / "data", val_fraction=0.001, rows_per_group=32,
                                     verbose=False)
        tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=32768)
        old = old_loader_class()
        cases = [("before streams, 1 process", lambda st=None: old(tok, 32, T, data_dir=data_dir, state=st), 8)]
        for W in (1, 8):
            cases.append((f"L={args.streams}, rank 0 of {W}", lambda st=None, W=W: DataLoader(
                tok, 32, T, data_dir=data_dir, world_size=W, streams=args.streams, grad_accum=R // 32 // W, state=st),
                R // 32 // W))
        print(f"CPU: {cpu_name()}, load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.steps} steps of "
              f"{R} rows")
        print("| loader | buffered documents | buffered tokens (MB) | state JSON (KB) | restore + first batch (s) |")
        print("|---|---|---|---|---|")
        for name, make, micro in cases:
            if old is None and name.startswith("before"):
                continue
            with make() as dl:
                for _ in range(args.steps * micro):
                    next(dl)
                state = json.loads(json.dumps(dl.state_dict()))
                packers = [dl.packer] if getattr(dl, "packer", None) is not None else dl.source.packers
                n_docs = sum(len(pk.docs) for pk in packers)
                mb = sum(a.nbytes for pk in packers for a in pk.docs.values()) / 2**20
            t0 = time.time()
            with make(state) as dl:
                next(dl)
            print(f"| {name} | {n_docs:,} | {mb:.1f} | {len(json.dumps(state)) / 1024:.0f} | {time.time() - t0:.2f} |",
                  flush=True)


def crop_main(argv=None) -> None:
    """Crop fraction of one stream over time, per window of 16 batches of 256 rows of 2048, for a best-fit
    buffer of 1,000 documents (the single stream of before) and of 256 (each logical stream's): the
    buffer sets how long long documents take to accumulate, the data sets the steady state."""
    p = argparse.ArgumentParser(description=crop_main.__doc__)
    p.add_argument("--text", default=",".join(str(SHARED_TEXT / d) for d in ("c4", "dclm_web", "dolma_cc")))
    p.add_argument("--copies", type=int, default=24)
    p.add_argument("--batches", type=int, default=96)
    args = p.parse_args(argv)
    from nanochat.dataloader import Packer
    from nanochat.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        docs = [d for path in args.text.split(",") for d in data_prep.load_documents(path)]
        data_dir = data_prep.prepare(docs * args.copies, Path(tmp) / "data", val_fraction=0.001, rows_per_group=32,
                                     verbose=False)
        tok = Tokenizer.train_from_iterator(iter(docs), vocab_size=32768)
        units = dataset.list_units("train", data_dir)[0]
        for buffer in (1000, 256):
            packer, last, windows = Packer(tok, units, 256, 2048, buffer, tokenizer_threads=2), (0, 0), []
            for i in range(1, args.batches + 1):
                packer.next_batch()
                if i % 16 == 0:
                    cropped, placed = packer.stats["cropped_tokens"], packer.stats["placed_tokens"]
                    c, pl = cropped - last[0], placed - last[1]
                    last = (cropped, placed)
                    windows.append(f"{c / (c + pl):.3f}")
            packer.close()
            print(f"buffer {buffer}: crop fraction per window of 16 batches: {' '.join(windows)}", flush=True)



if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "ranks":
        ranks_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "memory":
        memory_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "crop":
        crop_main(sys.argv[2:])
    else:
        main()
