"""Byte-level BPE tokenizer: trained with rustbpe (or Hugging Face `tokenizers`), run with tiktoken.

Training learns merge ranks over raw bytes after the GPT-4-style pre-split regex below (numbers in
groups of 1-2 digits, REFERENCE section 7). At run time an offline `tiktoken.Encoding` is built from
those ranks, so encoding is fast, multi-threaded for batches and needs no download.

Ids: 0..255 are the single bytes (id == byte value), 256..N-1 the merges in the order they were
learned, then the 9 special tokens (`<|bos|>` first). `encode` never parses special-token text in
documents (tiktoken's `encode_ordinary`): "<|bos|>" typed in a web page stays ordinary text.

Saved format, `<base dir>/tokenizer/` (see `Tokenizer.save`):
- `ranks.tiktoken`: one line per non-special token, `base64(token bytes) rank` (tiktoken's own
  format, readable by `tiktoken.load.load_tiktoken_bpe`).
- `meta.json`: `format`, `pattern`, `special_tokens` (in id order, starting right after the ranks),
  `vocab_size`, and how it was trained (`trainer`, `chars`, `docs`, `doc_cap`, ...).
- `token_bytes.pt`: int64 tensor (vocab_size,), each token's raw byte length, 0 for specials.
  Used by bits-per-byte; computed from the bytes, never via str (REFERENCE section 5).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

# GPT-4's pre-split with numbers in groups of 1-2 digits instead of 1-3: 0.965 vs 0.972 val bpb at
# 32K vocab (REFERENCE section 7). BPE never merges across the chunks this regex cuts.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",  # document delimiter: every document (and every conversation) starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, pasted back in (not trained on)
]
DEFAULT_VOCAB_SIZE = 32768  # including the specials
DEFAULT_DOC_CAP = 10_000  # characters kept per training document
DEFAULT_MAX_CHARS = 2_000_000_000  # characters of training text
FORMAT = "nanochat-bpe/1"
TRAINERS = ("rustbpe", "hf")


class TokenizerError(ValueError):
    """Bad input to training/loading, with a message that names the problem and the fix."""


# ---------------------------------------------------------------------------------------------
# training text: capping, and reading files


class TextStats:
    """Counts what the capped iterator let through (filled in while training consumes it)."""

    def __init__(self) -> None:
        self.docs = 0
        self.chars = 0
        self.truncated_docs = 0
        self.replaced_bytes = 0  # undecodable input bytes turned into U+FFFD while reading files

    def as_dict(self) -> dict:
        return dict(docs=self.docs, chars=self.chars, truncated_docs=self.truncated_docs,
                    replaced_bytes=self.replaced_bytes)


def cap_documents(texts: Iterable[str], max_chars: int | None = DEFAULT_MAX_CHARS,
                  doc_cap: int | None = DEFAULT_DOC_CAP, stats: TextStats | None = None,
                  progress: Callable[[TextStats], None] | None = None,
                  progress_every: int = 100_000_000) -> Iterator[str]:
    """Yield documents cut to `doc_cap` characters, stopping once `max_chars` have been yielded.

    The document that crosses `max_chars` is cut so the total is exactly `max_chars`.
    """
    stats = stats if stats is not None else TextStats()
    next_report = progress_every
    for text in texts:
        if not isinstance(text, str):
            raise TokenizerError(f"training texts must be str, got {type(text).__name__}")
        if max_chars is not None and stats.chars >= max_chars:
            break
        if doc_cap is not None and len(text) > doc_cap:
            text = text[:doc_cap]
            stats.truncated_docs += 1
        if max_chars is not None and stats.chars + len(text) > max_chars:
            text = text[: max_chars - stats.chars]
        if not text:
            continue
        stats.docs += 1
        stats.chars += len(text)
        if progress is not None and stats.chars >= next_report:
            progress(stats)
            next_report += progress_every
        yield text


def list_text_files(path: str | Path) -> list[Path]:
    """The readable files at `path` (a file, or a folder searched recursively), sorted: the data
    preparation's own rule (`nanochat.dataset.list_text_files`)."""
    from nanochat import dataset  # pyarrow: only when files are read

    try:
        return dataset.list_text_files(path)
    except dataset.DataError as e:
        raise TokenizerError(str(e)) from None


def iter_text_files(path: str | Path, stats: TextStats | None = None) -> Iterator[str]:
    """Documents from a text / jsonl (`text`) / parquet (`text`) file or a folder of them, split exactly
    as data preparation splits them (`nanochat.dataset.read_documents`: `<|endoftext|>` lines or
    ~4k-character paragraph groups in plain text, one record per jsonl line, one row per parquet row).

    Undecodable bytes become U+FFFD and are counted in `stats.replaced_bytes`.
    """
    from nanochat import dataset

    stats = stats if stats is not None else TextStats()
    for f in list_text_files(path):
        counts: dict = {}
        try:
            docs = dataset.read_documents(f, errors="replace", counts=counts)
        except dataset.DataError as e:
            raise TokenizerError(str(e)) from None
        stats.replaced_bytes += counts.get("replaced_bytes", 0)
        yield from (d for d in docs if d)


# ---------------------------------------------------------------------------------------------
# trainers: both return mergeable ranks {token bytes: id} with single bytes at ids 0..255


def _train_rustbpe(texts: Iterator[str], num_merges: int, pattern: str) -> dict[bytes, int]:
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(texts, 256 + num_merges, pattern=pattern)
    return {bytes(b): int(r) for b, r in tok.get_mergeable_ranks()}


def gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what HF's ByteLevel emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _train_hf(texts: Iterator[str], num_merges: int, pattern: str) -> dict[bytes, int]:
    from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=256 + num_merges, min_frequency=0, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    hf.train_from_iterator(texts, trainer)
    merges = json.loads(hf.to_str())["model"]["merges"]
    unicode_to_byte = {c: b for b, c in gpt2_byte_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for left, right in merges:  # merges are listed in the order learned: that order is the rank
        token = bytes(unicode_to_byte[c] for c in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


# ---------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """A trained byte-level BPE: tiktoken for encode/decode, plus chat rendering."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN,
                 special_tokens: list[str] | None = None, meta: dict | None = None) -> None:
        import tiktoken

        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise TokenizerError("mergeable ranks must be exactly the ids 0..N-1")
        if any(mergeable_ranks.get(bytes([b])) != b for b in range(256)):
            raise TokenizerError("mergeable ranks must map every single byte b to id b")
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens = {name: n + i for i, name in enumerate(special_tokens)}
        self.meta = dict(meta or {})
        self.path: Path | None = None  # the folder it was loaded from (from_directory)
        self._identity: str | None = None
        self.enc = tiktoken.Encoding(f"nanochat{n + len(special_tokens)}", pat_str=pattern,
                                     mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                            trainer: str = "rustbpe", max_chars: int | None = DEFAULT_MAX_CHARS,
                            doc_cap: int | None = DEFAULT_DOC_CAP, pattern: str = SPLIT_PATTERN,
                            special_tokens: list[str] | None = None, stats: TextStats | None = None,
                            progress: Callable[[TextStats], None] | None = None) -> "Tokenizer":
        """Learn `vocab_size - len(specials) - 256` merges from `texts` (capped as in `cap_documents`).

        Raises `TokenizerError` when the vocabulary cannot hold the bytes and specials, when no text
        arrives, or when the text is too small to learn that many distinct merges.
        """
        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        floor = 256 + len(special_tokens)
        if vocab_size < floor:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: it must hold 256 byte tokens + "
                                 f"{len(special_tokens)} special tokens = {floor}; use --vocab-size >= {floor}")
        if trainer not in TRAINERS:
            raise TokenizerError(f"unknown trainer {trainer!r}: use one of {TRAINERS}")
        num_merges = vocab_size - floor
        stats = stats if stats is not None else TextStats()
        capped = cap_documents(texts, max_chars=max_chars, doc_cap=doc_cap, stats=stats, progress=progress)
        if num_merges == 0:
            for _ in capped:  # nothing to learn, but still validate and count the input
                pass
            ranks = {bytes([b]): b for b in range(256)}
        else:
            ranks = (_train_rustbpe if trainer == "rustbpe" else _train_hf)(capped, num_merges, pattern)
        if stats.chars == 0:
            raise TokenizerError("the training corpus is empty (no characters of text): pass --input with some text")
        if len(ranks) < 256 + num_merges:
            raise TokenizerError(
                f"the training text ({stats.chars:,} characters in {stats.docs:,} documents) is too small: only "
                f"{len(ranks) - 256:,} of the {num_merges:,} merges needed for vocab_size {vocab_size:,} could be "
                f"learned; give more text or a smaller --vocab-size")
        meta = dict(trainer=trainer, max_chars=max_chars, doc_cap=doc_cap, **stats.as_dict())
        return cls(ranks, pattern=pattern, special_tokens=special_tokens, meta=meta)

    @classmethod
    def from_directory(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        meta_path, ranks_path = path / "meta.json", path / "ranks.tiktoken"
        if not meta_path.is_file() or not ranks_path.is_file():
            raise FileNotFoundError(f"no trained tokenizer in {path} (expected meta.json and ranks.tiktoken): "
                                    f"run `python scripts/tok_train.py` first (it writes <base dir>/tokenizer/)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise TokenizerError(f"{meta_path}: unknown tokenizer format {meta.get('format')!r} "
                                 f"(expected {FORMAT!r}); retrain with `python scripts/tok_train.py`")
        ranks = {}
        for line in ranks_path.read_text().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        tok = cls(ranks, pattern=meta["pattern"], special_tokens=meta["special_tokens"], meta=meta.get("training"))
        if tok.get_vocab_size() != meta["vocab_size"]:
            raise TokenizerError(f"{path}: meta.json says vocab_size {meta['vocab_size']} but the files hold "
                                 f"{tok.get_vocab_size()} tokens; retrain with `python scripts/tok_train.py`")
        tok.path = path
        return tok

    def save(self, path: str | Path) -> Path:
        """Write ranks.tiktoken, meta.json and token_bytes.pt into the folder `path` (created)."""
        import torch

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        (path / "ranks.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))
        meta = dict(format=FORMAT, vocab_size=self.get_vocab_size(), pattern=self.pattern,
                    special_tokens=list(self.special_tokens), training=self.meta)
        (path / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(self.token_bytes(), path / "token_bytes.pt")
        return path

    @property
    def identity(self) -> str:
        """What the token ids mean, as a short hash: sha256 over the split pattern, every (token bytes, rank)
        in rank order and the specials with their ids (16 hex digits). Two tokenizers trained at the same
        vocab size on different text differ here; checkpoints store it (nanochat/checkpoint_manager.py)."""
        if self._identity is None:
            h = hashlib.sha256()
            h.update(self.pattern.encode() + b"\0")
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
                h.update(len(token).to_bytes(2, "little") + token + rank.to_bytes(4, "little"))
            for name, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
                h.update(b"\1" + name.encode() + i.to_bytes(4, "little"))
            self._identity = h.hexdigest()[:16]
        return self._identity

    # --- encode / decode ----------------------------------------------------------------------

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def encode_special(self, name: str) -> int:
        if name not in self.special_tokens:
            raise KeyError(f"{name!r} is not a special token; known: {list(self.special_tokens)}")
        return self.special_tokens[name]

    def get_bos_token_id(self) -> int:
        return self.encode_special("<|bos|>")

    def _as_id(self, token: int | str) -> int:
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None,
               num_threads: int = 8) -> list[int] | list[list[int]]:
        """Ids of `text` (or of each text in a list, encoded on `num_threads` threads).

        Special-token text inside `text` is encoded as ordinary text. `prepend`/`append` add one
        token (an id, or a special token's name such as "<|bos|>") to each sequence.
        """
        head = [self._as_id(prepend)] if prepend is not None else []
        tail = [self._as_id(append)] if append is not None else []
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text) + tail
        if isinstance(text, (list, tuple)):
            ids = self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            return [head + row + tail for row in ids] if head or tail else ids
        raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")

    __call__ = encode

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.get_vocab_size()]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.get_vocab_size()}): {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; byte sequences that are not valid UTF-8 become U+FFFD (never raises on them)."""
        return self.enc.decode(self._check_ids(ids), errors="replace")

    def id_to_token(self, token_id: int) -> bytes:
        return self.enc.decode_single_token_bytes(int(token_id))

    def token_bytes(self):
        """int64 tensor (vocab_size,): raw byte length of each token, 0 for the special tokens."""
        import torch

        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.int64)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)  # from the bytes themselves: partial UTF-8 keeps its true length
        return lengths

    # --- chat ---------------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """Token ids of a chat and a same-length 0/1 mask of the tokens the assistant is trained on.

        Layout: <|bos|>, then per turn `<|user_start|> text <|user_end|>` (mask 0) or
        `<|assistant_start|>` (0) + content (1) + `<|assistant_end|>` (1). Assistant content is a
        str or a list of parts: "text" (1), "python" wrapped in <|python_start|>/<|python_end|> (1),
        "python_output" wrapped in <|output_start|>/<|output_end|> (0: it comes from the tool).
        A leading system message is merged into the first user message. Truncated to `max_tokens`.
        """
        messages = _validated_messages(conversation)
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_tokens
        add(sp["<|bos|>"], 0)
        for msg in messages:
            if msg["role"] == "user":
                add(sp["<|user_start|>"], 0)
                add(self.encode(msg["content"]), 0)
                add(sp["<|user_end|>"], 0)
                continue
            add(sp["<|assistant_start|>"], 0)
            content = msg["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                tokens = self.encode(part["text"])
                if part["type"] == "text":
                    add(tokens, 1)
                elif part["type"] == "python":
                    add(sp["<|python_start|>"], 1)
                    add(tokens, 1)
                    add(sp["<|python_end|>"], 1)
                else:  # python_output
                    add(sp["<|output_start|>"], 0)
                    add(tokens, 0)
                    add(sp["<|output_end|>"], 0)
            add(sp["<|assistant_end|>"], 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Ids that prompt the assistant's reply: the chat minus its last (assistant) message,
        ending with <|assistant_start|>."""
        conversation = copy.deepcopy(conversation)
        messages = conversation.get("messages") if isinstance(conversation, dict) else None
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("render_for_completion needs a conversation whose last message is the assistant's")
        messages.pop()
        ids, _ = self.render_conversation(conversation, max_tokens=10**12)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_mask(self, ids: list[int], mask: list[int]) -> str:
        """Debug view: trained tokens in green, others in grey (ANSI colours)."""
        out = []
        for i, m in zip(ids, mask):
            piece = self.decode([i])
            out.append(f"\033[92m{piece}\033[0m" if m else f"\033[90m{piece}\033[0m")
        return "".join(out)


PART_TYPES = ("text", "python", "python_output")


def _validated_messages(conversation: dict) -> list[dict]:
    """Messages with the system prompt merged into the first user message; raises on bad structure."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = [dict(m) for m in conversation["messages"]]
    if messages and messages[0].get("role") == "system":
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("a system message must be followed by a user message")
        if not isinstance(messages[0].get("content"), str):
            raise ValueError("system message content must be a str")
        messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = messages[1:]
    if not messages:
        raise ValueError("the conversation has no user/assistant messages")
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg.get("role") != expected:
            raise ValueError(f"message {i} has role {msg.get('role')!r}; messages must alternate "
                             f"user/assistant starting with user (after an optional system message)")
        content = msg.get("content")
        if expected == "user" and not isinstance(content, str):
            raise ValueError(f"message {i}: user content must be a str")
        if expected == "assistant" and not isinstance(content, str):
            if not isinstance(content, list) or not all(
                    isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str)
                    for p in content):
                raise ValueError(f"message {i}: assistant content must be a str or a list of "
                                 f'{{"type": one of {PART_TYPES}, "text": str}} parts')
    return messages


# ---------------------------------------------------------------------------------------------
# the artifact directory


def get_tokenizer_dir(base_dir: str | Path | None = None) -> Path:
    if base_dir is None:
        from nanochat.env import get_base_dir

        base_dir = get_base_dir()
    return Path(base_dir) / "tokenizer"


def get_tokenizer(base_dir: str | Path | None = None) -> Tokenizer:
    """The trained tokenizer of `<base dir>/tokenizer/` (base dir: NANOCHAT_BASE_DIR by default)."""
    return Tokenizer.from_directory(get_tokenizer_dir(base_dir))


def get_token_bytes(device="cpu", base_dir: str | Path | None = None):
    """int64 tensor (vocab_size,) of token byte lengths (0 for specials), on `device`."""
    import torch

    path = get_tokenizer_dir(base_dir) / "token_bytes.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python scripts/tok_train.py` first")
    return torch.load(path, map_location="cpu", weights_only=True).to(device)


def check_vocab_matches(tokenizer: Tokenizer, vocab_size: int, what: str = "the model checkpoint") -> None:
    """Raise if a tokenizer and a model (or data) disagree on the vocabulary size."""
    if tokenizer.get_vocab_size() != vocab_size:
        raise TokenizerError(
            f"tokenizer vocab_size {tokenizer.get_vocab_size():,} does not match {what} ({vocab_size:,}): "
            f"they were made with different tokenizers; point NANOCHAT_BASE_DIR at the base dir whose "
            f"tokenizer/ was used, or retrain with `python scripts/tok_train.py --vocab-size {vocab_size}`")


def describe(tok: Tokenizer) -> str:
    m = tok.meta
    return (f"vocab {tok.get_vocab_size():,} ({len(tok.special_tokens)} specials), trained by {m.get('trainer', '?')} "
            f"on {m.get('chars', 0):,} chars / {m.get('docs', 0):,} docs")

