"""Whole-process time of `scripts/tok_train.py` against bare rustbpe on the same text.

    python benchmarks/bench_tok_startup.py                 # ~48 MB built from ../shared/data/text, 32K vocab, 3 rounds

Builds (once, in --work-dir) a plain-text corpus of about --mb MB: the real documents of --text
(read by nanochat.dataset, the reader tokenizer training uses) shuffled and repeated, joined by
`<|endoftext|>` lines so that both sides see the same documents. Then, in interleaved rounds, times
two fresh processes from start to exit:

- bare: `python -c` that imports rustbpe, reads the file, splits it at `<|endoftext|>`, caps each
  document at 10,000 characters and calls `rustbpe.Tokenizer().train_from_iterator` (nothing saved);
- ours: `python -m scripts.tok_train --input FILE --out-dir DIR` (reading, training, saving
  ranks.tiktoken / meta.json / token_bytes.pt, the round-trip check).

It also checks that the two learned the same merges (hence the same compression).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BARE = r"""
import sys, rustbpe
from nanochat_bench_pattern import PATTERN
text = open(sys.argv[1], encoding="utf-8", newline="").read()  # no newline translation: the bytes as they are
docs = [d.strip()[:10000] for d in text.split("<|endoftext|>") if d.strip()]
tok = rustbpe.Tokenizer()
tok.train_from_iterator(iter(docs), 256 + int(sys.argv[2]), pattern=PATTERN)
ranks = sorted(bytes(b) for b, r in tok.get_mergeable_ranks())
open(sys.argv[3], "wb").write(b"\n".join(x.hex().encode() for x in ranks))
"""


def build_corpus(text: Path, mb: float, out: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from nanochat.tokenizer import iter_text_files

    docs = [d for d in iter_text_files(text) if "<|endoftext|>" not in d]
    rng = random.Random(0)
    parts, size = [], 0
    while size < mb * 1e6:
        rng.shuffle(docs)
        for d in docs:
            parts.append(d)
            size += len(d.encode()) + 16
            if size >= mb * 1e6:
                break
    out.write_text("\n<|endoftext|>\n".join(parts) + "\n", encoding="utf-8")


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "text")
    p.add_argument("--mb", type=float, default=48.0)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/nanochat_tok_startup"))
    args = p.parse_args()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus_{args.mb:g}mb.txt"
    if not corpus.is_file():
        build_corpus(args.text, args.mb, corpus)
    sys.path.insert(0, str(ROOT))
    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    (work / "nanochat_bench_pattern.py").write_text(f"PATTERN = {SPLIT_PATTERN!r}\n")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{work}", NANOCHAT_BASE_DIR=str(work / "base"))
    merges = args.vocab_size - len(SPECIAL_TOKENS) - 256
    bare_cmd = [sys.executable, "-c", BARE, str(corpus), str(merges), str(work / "bare_ranks.txt")]
    ours_cmd = [sys.executable, "-m", "scripts.tok_train", "--input", str(corpus), "--vocab-size", str(args.vocab_size),
                "--out-dir", str(work / "ours_tok")]
    print(f"corpus {corpus} ({corpus.stat().st_size / 1e6:.1f} MB); load average {os.getloadavg()}", flush=True)
    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for r in range(args.rounds):
        order = [("bare", bare_cmd), ("ours", ours_cmd)][:: 1 if r % 2 == 0 else -1]
        for name, cmd in order:
            times[name].append(timed(cmd, env))
            print(f"round {r + 1} {name}: {times[name][-1]:.2f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    bare, ours = statistics.median(times["bare"]), statistics.median(times["ours"])
    ours_ranks = sorted(Tokenizer.from_directory(work / "ours_tok").mergeable_ranks)
    bare_ranks = [bytes.fromhex(x) for x in (work / "bare_ranks.txt").read_text().split("\n")]
    same = ours_ranks == bare_ranks
    print(f"median whole-process time: bare rustbpe {bare:.2f} s, tok_train {ours:.2f} s, ratio {ours / bare:.2f}x; "
          f"same merges: {same}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
