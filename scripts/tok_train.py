"""Train the BPE tokenizer and save it under <base dir>/tokenizer/.

    python scripts/tok_train.py                                  # pretraining shards (nanochat.dataset)
    python scripts/tok_train.py --input data/ --vocab-size 32768  # .txt / .jsonl / .parquet file or folder
"""

import argparse
import importlib
import sys
import threading
import time
from pathlib import Path

if not __package__:  # `python scripts/tok_train.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# nothing here imports torch up front (nanochat.env, not nanochat.common): torch, which saving needs, is
# imported beside the reading and merging (see preload)
from nanochat.env import env_rank, print0  # noqa: E402
from nanochat.tokenizer import (DEFAULT_DOC_CAP, DEFAULT_MAX_CHARS, DEFAULT_VOCAB_SIZE, TRAINERS,  # noqa: E402
                                TextStats, Tokenizer, TokenizerError, describe, get_tokenizer_dir,
                                iter_text_files)


def pretraining_documents():
    """Documents of the prepared pretraining shards (train split), or a clear error when there are none."""
    hint = "run `python -m nanochat.dataset embedded` or pass --input PATH"
    try:
        from nanochat import dataset

        data_dir = dataset.get_data_dir()
    except (ImportError, AttributeError) as e:
        raise TokenizerError(f"no pretraining shards found (nanochat.dataset is unavailable: {e}); {hint}") from None
    try:
        shards = dataset.list_shards("train")
    except (OSError, RuntimeError, ValueError):
        shards = []
    if not shards:
        raise TokenizerError(f"no pretraining shards found in {data_dir}; {hint}")
    return dataset.iter_documents(split="train")


def preload(module: str) -> threading.Thread:
    """Import `module` in a background thread: torch takes 1-3 s to import, and the trainer releases the
    GIL for much of its work, so the import overlaps it instead of delaying the save at the end."""
    thread = threading.Thread(target=importlib.import_module, args=(module,), name=f"import-{module}", daemon=True)
    thread.start()
    return thread


def train(vocab_size: int, max_chars: int, doc_cap: int, input_path: str | None = None, trainer: str = "rustbpe",
          base_dir: str | None = None, out_dir: str | None = None) -> Path:
    torch_import = preload("torch")  # for token_bytes.pt in tok.save()
    stats = TextStats()
    if input_path:
        texts = iter_text_files(input_path, stats)
        source = input_path
    else:
        texts = pretraining_documents()
        source = "pretraining shards (train split)"
    print0(f"training a {vocab_size:,}-token BPE with {trainer} on {source} "
           f"(up to {max_chars:,} chars, documents capped at {doc_cap:,} chars)")
    t0 = time.time()

    def progress(s: TextStats) -> None:
        print0(f"  read {s.chars / 1e6:,.0f}M chars, {s.docs:,} docs ({s.chars / 1e6 / (time.time() - t0):.1f} MB/s)")

    tok = Tokenizer.train_from_iterator(texts, vocab_size, trainer=trainer, max_chars=max_chars, doc_cap=doc_cap,
                                        stats=stats, progress=progress)
    seconds = time.time() - t0
    tok.meta.update(seconds=round(seconds, 2), source=str(source))
    out = Path(out_dir) if out_dir else get_tokenizer_dir(base_dir)
    torch_import.join()
    tok.save(out)
    print0(f"trained in {seconds:.1f}s ({stats.chars / 1e6 / max(seconds, 1e-9):.2f} MB/s): {describe(tok)}; "
           f"{stats.truncated_docs:,} documents truncated to {doc_cap:,} chars")
    if stats.replaced_bytes:
        print0(f"warning: {stats.replaced_bytes:,} undecodable input bytes were read as U+FFFD (input is not clean UTF-8)")
    sample = "Hello world! The 2025 results: 3.14159 <|bos|> naïve café 🙂"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample, "round trip failed"
    print0(f"round trip ok: {len(sample.encode())} bytes -> {len(ids)} tokens")
    print0(f"saved to {out}")
    return out


def overwrite_guard(out: Path, force: bool) -> None:
    """Refuse to replace a tokenizer that checkpoints were trained with: their token ids would silently mean
    other strings (a retrained 32K tokenizer took a model's val bpb from 3.85 to 4.20, with rc 0)."""
    try:
        old = Tokenizer.from_directory(out)
    except (FileNotFoundError, TokenizerError, ValueError, KeyError):
        return  # nothing (readable) to protect
    from nanochat.checkpoint_manager import TOKENIZER_COPY, runs_trained_with  # torch: only when there is one
    runs = runs_trained_with(old)
    if not runs:
        return
    names = ", ".join(str(r) for r in runs[:3]) + (f" and {len(runs) - 3} more" if len(runs) > 3 else "")
    if force:
        kept = [r for r in runs if (r / TOKENIZER_COPY).is_dir()]
        print0(f"--force: replacing tokenizer {old.identity} in {out}, used by {names}"
               + (f"; {len(kept)} of those keep a copy in <run>/{TOKENIZER_COPY}/" if kept else ""))
        return
    print(f"error: {out} holds tokenizer {old.identity}, which the checkpoints in {names} were trained with; "
          f"retraining it would silently change what their token ids mean: pass --out-dir DIR for a new "
          f"tokenizer (and NANOCHAT_BASE_DIR for its runs), or --force to overwrite", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary size including the 9 special tokens")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="characters of training text to use at most")
    p.add_argument("--doc-cap", type=int, default=DEFAULT_DOC_CAP, help="characters kept per document")
    p.add_argument("--input", default=None, help="a .txt/.jsonl/.parquet file or folder; default: the pretraining shards")
    p.add_argument("--trainer", choices=TRAINERS, default="rustbpe",
                   help="BPE trainer (rustbpe: faster here, see benchmarks/results/tokenizer.md)")
    p.add_argument("--out-dir", default=None, help="where to save (default <base dir>/tokenizer)")
    p.add_argument("--force", action="store_true",
                   help="overwrite a tokenizer even when existing checkpoints were trained with it")
    args = p.parse_args(argv)
    if env_rank() != 0:  # under torchrun, one process does the (single-machine) work
        return
    if args.max_chars <= 0 or args.doc_cap <= 0:
        p.error("--max-chars and --doc-cap must be positive")
    overwrite_guard(Path(args.out_dir) if args.out_dir else get_tokenizer_dir(), args.force)
    try:
        train(args.vocab_size, args.max_chars, args.doc_cap, args.input, args.trainer, out_dir=args.out_dir)
    except TokenizerError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
