"""Tokenizer: training, round trips, token byte lengths, chat rendering, saving, CLI, bad input."""

import gzip
import json
import random
import subprocess
import sys

import pytest
import regex
import torch

from nanochat.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, TextStats, Tokenizer, TokenizerError, cap_documents,
                                check_vocab_matches, get_token_bytes, get_tokenizer, iter_text_files)
from tests.conftest import REPO_ROOT

WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be has or had "
         "not first one their its new after who they have two she been other all when there time would into "
         "model token train data byte number value python function return import class print").split()


def build_corpus(n_docs=300, seed=0):
    """English-like prose, numbers, code, and CJK/emoji, so merges include partial UTF-8 sequences."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        prose = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80)))
        prose = prose.capitalize() + f". In {rng.randint(1900, 2030)} it cost ${rng.randint(1, 999)}.{rng.randint(0, 99)}!"
        code = f"def f{i}(x):\n    return x * {rng.randint(2, 9)} + {i}\n"
        # CJK characters U+4E00..U+4E3F all start with the bytes e4 b8: that pair gets merged into a
        # token that is an incomplete UTF-8 sequence
        cjk = "".join(chr(0x4E00 + rng.randrange(64)) for _ in range(rng.randint(10, 40)))
        docs.append(f"{prose}\n\n{code}\n{cjk} 🙂🚀 naïve café\n")
    return docs


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train_from_iterator(corpus, vocab_size=1024)


SAMPLES = [
    "",
    "hello world",
    "Hello, World! 12345 67 8\n\n\tindented   spaces  ",
    "naïve café, Zürich, Ελληνικά, русский, العربية, 日本語のテキスト, 한국어",
    "emoji 🙂🚀👩‍👩‍👧‍👦 flags 🇫🇷 and skin 👍🏽",
    "def f(x):\n    return x ** 2  # comment\r\n",
    "\u4e00\u4e01\u4e02 \u4e03" * 5,
    "<|bos|> and <|assistant_end|> typed in a document",
]


# ---------------------------------------------------------------------------------------------
# encode / decode


def test_vocab_layout(tok):
    assert tok.get_vocab_size() == 1024
    assert tok.get_bos_token_id() == 1024 - len(SPECIAL_TOKENS)
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(1015, 1024))
    assert all(tok.id_to_token(b) == bytes([b]) for b in range(256))
    with pytest.raises(KeyError, match="not a special token"):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")


def reference_bpe(tok, text):
    """Independent, slow BPE: split with the pattern, then repeatedly merge the lowest-ranked pair."""
    ranks = tok.mergeable_ranks
    ids = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            pairs = [(ranks.get(parts[i] + parts[i + 1], float("inf")), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


@pytest.mark.parametrize("text", SAMPLES[1:])
def test_encode_matches_reference_bpe(tok, text):
    assert tok.encode(text) == reference_bpe(tok, text)


def test_learned_merges_compress(tok, corpus):
    ids = tok.encode(corpus[0])
    assert len(ids) < 0.5 * len(corpus[0].encode())  # the training text compresses well
    assert any(len(tok.id_to_token(i)) >= 4 for i in ids)


def test_batch_encode_matches_single(tok):
    batch = tok.encode(SAMPLES, num_threads=2)
    assert batch == [tok.encode(s) for s in SAMPLES]
    bos = tok.get_bos_token_id()
    assert tok.encode(SAMPLES, prepend="<|bos|>") == [[bos] + tok.encode(s) for s in SAMPLES]
    assert tok.encode("hi", prepend=bos, append="<|assistant_end|>") == [bos] + tok.encode("hi") + [
        tok.encode_special("<|assistant_end|>")]


def test_special_token_text_stays_ordinary(tok):
    for name in SPECIAL_TOKENS:
        ids = tok.encode(f"x {name} y")
        assert not set(ids) & set(range(1015, 1024))
        assert tok.decode(ids) == f"x {name} y"


def test_invalid_utf8_input(tok, tmp_path):
    # a str cannot hold invalid UTF-8 except as lone surrogates: they encode as U+FFFD, never crash
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    # undecodable bytes in input files are replaced and counted
    raw = b"good line\n" + b"bad \xff\xfe bytes and a cut \xe2\x82\n" + "real \ufffd kept\n".encode()
    (tmp_path / "bad.txt").write_bytes(raw)
    stats = TextStats()
    docs = list(iter_text_files(tmp_path / "bad.txt", stats))
    assert docs == [raw.decode("utf-8", errors="replace").rstrip("\n")]  # one paragraph: one document
    assert stats.replaced_bytes == 3  # ff, fe, and the truncated e2 82 sequence


def test_decode_arbitrary_ids_never_crashes(tok):
    rng = random.Random(0)
    n = tok.get_vocab_size()
    partial = [i for i in range(256, n - 9) if not _is_utf8(tok.id_to_token(i))]
    for _ in range(200):
        ids = [rng.randrange(n) for _ in range(rng.randint(1, 12))] + rng.sample(partial, 1)
        text = tok.decode(ids)
        assert text == tok.decode_bytes(ids).decode("utf-8", errors="replace")
    assert tok.decode([0xE4]) == "\ufffd"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([n])


# ---------------------------------------------------------------------------------------------
# token_bytes


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_token_bytes_are_raw_byte_lengths(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int64 and tb.shape == (1024,)
    assert tb[-9:].tolist() == [0] * 9
    assert all(tb[i].item() == len(tok.id_to_token(i)) for i in range(1015))
    # a merged token that is an incomplete UTF-8 sequence (e.g. b"\xe4\xb8") keeps its true length;
    # decoding to str and re-encoding would give 3 (one U+FFFD) instead
    partial = [i for i in range(256, 1015) if not _is_utf8(tok.id_to_token(i))]
    assert tok.id_to_token(tok.encode("\u4e00")[0]).startswith(b"\xe4\xb8")
    assert partial, "the corpus should produce partial-UTF-8 merges"
    i = partial[0]
    assert tb[i].item() == len(tok.id_to_token(i)) != len(tok.decode([i]).encode("utf-8"))


@pytest.mark.parametrize("text", SAMPLES)
def test_token_bytes_sum_to_utf8_length(tok, text):
    ids = tok.encode(text, prepend="<|bos|>")
    assert tok.token_bytes()[ids].sum().item() == len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# chat rendering


def test_render_conversation_masks(tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": "It is 4."},
        ]},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
    ]}
    ids, mask = tok.render_conversation(conv)
    s, e = tok.encode_special, tok.encode
    expected = [  # (ids, trained?)
        ([s("<|bos|>"), s("<|user_start|>")] + e("Be brief.\n\nWhat is 2+2?") + [s("<|user_end|>")], 0),
        ([s("<|assistant_start|>")], 0),
        (e("Let me check.") + [s("<|python_start|>")] + e("2+2") + [s("<|python_end|>")], 1),
        ([s("<|output_start|>")] + e("4") + [s("<|output_end|>")], 0),
        (e("It is 4.") + [s("<|assistant_end|>")], 1),
        ([s("<|user_start|>")] + e("Thanks") + [s("<|user_end|>"), s("<|assistant_start|>")], 0),
        (e("You're welcome.") + [s("<|assistant_end|>")], 1),
    ]
    assert ids == [i for part, _ in expected for i in part]
    assert mask == [m for part, m in expected for _ in part]

    short_ids, short_mask = tok.render_conversation(conv, max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]

    prompt = tok.render_for_completion(conv)
    assert prompt == ids[:len(prompt)]
    assert prompt[-1] == s("<|assistant_start|>") and prompt.count(s("<|assistant_start|>")) == 2
    assert prompt == ids[:ids.index(s("<|assistant_start|>"), ids.index(s("<|user_start|>"), 5)) + 1]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "hi"}], "alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
    ([{"role": "user", "content": ["x"]}], "user content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "img", "text": "x"}]}], "parts"),
    ([], "no user/assistant"),
])
def test_render_conversation_rejects_bad_structure(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation({"messages": messages})


# ---------------------------------------------------------------------------------------------
# training, saving, determinism


def test_cap_documents():
    stats = TextStats()
    out = list(cap_documents(["a" * 50, "", "b" * 5, "c" * 30, "d"], max_chars=70, doc_cap=20, stats=stats))
    assert out == ["a" * 20, "b" * 5, "c" * 20, "d"] or out == ["a" * 20, "b" * 5, "c" * 20]
    assert sum(map(len, out)) == stats.chars <= 70
    assert list(cap_documents(["x" * 10] * 5, max_chars=25, doc_cap=None)) == ["x" * 10, "x" * 10, "x" * 5]


def test_training_is_deterministic(corpus, tok):
    again = Tokenizer.train_from_iterator(iter(corpus), vocab_size=1024)
    assert again.mergeable_ranks == tok.mergeable_ranks
    hf1 = Tokenizer.train_from_iterator(corpus[:100], vocab_size=600, trainer="hf")
    hf2 = Tokenizer.train_from_iterator(corpus[:100], vocab_size=600, trainer="hf")
    assert hf1.mergeable_ranks == hf2.mergeable_ranks


def test_hf_and_rustbpe_learn_equally_good_vocabularies(corpus):
    rust = Tokenizer.train_from_iterator(corpus[:100], vocab_size=600)
    hf = Tokenizer.train_from_iterator(corpus[:100], vocab_size=600, trainer="hf")
    assert hf.get_vocab_size() == rust.get_vocab_size() == 600
    held_out = build_corpus(20, seed=1)
    n_rust = sum(map(len, rust.encode(held_out)))
    n_hf = sum(map(len, hf.encode(held_out)))
    assert abs(n_hf - n_rust) / n_rust < 0.01
    for text in SAMPLES:
        assert hf.decode(hf.encode(text)) == text


def test_save_load_round_trip(tok, base_dir):
    tok.save(base_dir / "tokenizer")
    loaded = get_tokenizer()  # reads NANOCHAT_BASE_DIR, set by the fixture
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == SPLIT_PATTERN
    assert all(loaded.encode(t) == tok.encode(t) for t in SAMPLES)
    assert torch.equal(get_token_bytes("cpu"), tok.token_bytes())
    meta = json.loads((base_dir / "tokenizer" / "meta.json").read_text())
    assert meta["vocab_size"] == 1024 and meta["training"]["trainer"] == "rustbpe"
    # the ranks file is tiktoken's own format
    from tiktoken.load import load_tiktoken_bpe

    assert load_tiktoken_bpe(str(base_dir / "tokenizer" / "ranks.tiktoken")) == tok.mergeable_ranks


def test_train_on_real_text(shared_data):
    files = sorted((shared_data / "text" / "c4").glob("*.jsonl"))
    if not files:
        pytest.skip("no c4 jsonl in shared data")
    stats = TextStats()
    real = Tokenizer.train_from_iterator(iter_text_files(files[0], stats), vocab_size=2048, max_chars=1_000_000,
                                         stats=stats)
    assert stats.chars == 1_000_000
    wiki = (shared_data / "text" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:200_000]
    ids = real.encode(wiki)
    assert real.decode(ids) == wiki
    assert len(wiki.encode()) / len(ids) > 2.5  # wikitext's " , " spacing costs tokens
    held_out = list(iter_text_files(files[0]))[stats.docs + 1:]
    assert len(held_out) > 100
    n_bytes = sum(len(d.encode()) for d in held_out)
    assert n_bytes / sum(map(len, real.encode(held_out))) > 2.8  # measured 2.96 at 2K vocab (~1.0 = bytes only)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_training_input(corpus):
    with pytest.raises(TokenizerError, match="too small.*>= 265"):
        Tokenizer.train_from_iterator(corpus, vocab_size=264)
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train_from_iterator([], vocab_size=300)
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train_from_iterator(["", ""], vocab_size=265)
    with pytest.raises(TokenizerError, match="too small.*smaller --vocab-size"):
        Tokenizer.train_from_iterator(["ab ab"], vocab_size=400)
    with pytest.raises(TokenizerError, match="must be str"):
        Tokenizer.train_from_iterator([b"bytes"], vocab_size=300)
    bytes_only = Tokenizer.train_from_iterator(["tiny"], vocab_size=265)
    assert bytes_only.encode("tiny") == list(b"tiny")


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="scripts/tok_train.py"):
        get_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="scripts/tok_train.py"):
        get_token_bytes("cpu", tmp_path)


def test_check_vocab_matches(tok):
    check_vocab_matches(tok, 1024)
    with pytest.raises(TokenizerError, match="does not match.*--vocab-size 32768"):
        check_vocab_matches(tok, 32768)


def test_bad_input_paths(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        list(iter_text_files(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="no .txt/.jsonl/.parquet"):
        list(iter_text_files(tmp_path))
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(TokenizerError, match="field 'text'"):
        list(iter_text_files(tmp_path / "a.jsonl"))


def test_reads_text_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["three", "four"]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("para 1\nline\n\npara 2\n" * 3)
    (tmp_path / "d.txt.gz").write_bytes(gzip.compress(b"doc a\n<|endoftext|>\ndoc b\n"))
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(json.dumps({"text": "five"}).encode() + b"\n"))
    docs = list(iter_text_files(tmp_path))
    assert docs[:4] == ["one", "two", "three", "four"]
    # plain text as data preparation splits it: short paragraphs grouped into one document; end-of-text lines
    assert docs[4:] == ["para 1\nline\n\npara 2\npara 1\nline\n\npara 2\npara 1\nline\n\npara 2", "doc a", "doc b", "five"]


def test_tokenizer_reads_what_data_preparation_reads(shared_data):
    # one reader: the documents tokenizer training sees are those `dataset prepare` would shard
    from nanochat import data_prep

    folder = shared_data / "text"
    assert list(iter_text_files(folder)) == [d for d in data_prep.load_documents(folder, encoding_errors="replace") if d]


# ---------------------------------------------------------------------------------------------
# CLI end to end


@pytest.mark.slow
def test_cli_train_end_to_end(base_dir, tmp_path):
    data = tmp_path / "small.txt"
    data.write_text("\n\n".join(build_corpus(60)))
    cmd = [sys.executable, "scripts/tok_train.py", "--input", str(data), "--vocab-size", "500",
           "--max-chars", "200000", "--doc-cap", "5000"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "round trip ok" in res.stdout
    loaded = get_tokenizer(base_dir)
    assert loaded.get_vocab_size() == 500
    assert loaded.meta["doc_cap"] == 5000 and loaded.meta["chars"] <= 200_000
    assert get_token_bytes("cpu", base_dir).shape == (500,)


def test_cli_bad_input_exits_with_clear_message(tmp_path):
    from scripts.tok_train import main

    data = tmp_path / "small.txt"
    data.write_text("some text\n")
    with pytest.raises(SystemExit, match="--vocab-size >= 265"):
        main(["--input", str(data), "--vocab-size", "100"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["--input", str(tmp_path / "missing.txt")])
    with pytest.raises(SystemExit, match="too small"):
        main(["--input", str(data), "--vocab-size", "400", "--out-dir", str(tmp_path / "tok")])
    assert not (tmp_path / "tok").exists()


def test_cli_without_shards_says_how_to_get_them(base_dir, monkeypatch):
    from scripts.tok_train import main

    with pytest.raises(SystemExit, match=r"no pretraining shards found.*nanochat.dataset embedded.*--input"):
        main(["--vocab-size", "300"])
    monkeypatch.setitem(sys.modules, "nanochat.dataset", None)  # the module missing altogether
    with pytest.raises(SystemExit, match=r"no pretraining shards found.*--input PATH"):
        main(["--vocab-size", "300"])


# ---------------------------------------------------------------------------------------------
# evaluation script


def test_tok_eval_table(tok, base_dir, tmp_path, capsys):
    from scripts.tok_eval import SAMPLES as EVAL_SAMPLES, main

    tok.save(base_dir / "tokenizer")
    small = Tokenizer.train_from_iterator(build_corpus(100), vocab_size=512)
    small.save(tmp_path / "small")
    (tmp_path / "texts").mkdir()
    mine = "hello world, hello tokens\n"
    (tmp_path / "texts" / "mine.txt").write_text(mine)
    main(["--compare", str(tmp_path / "small"), "--text-dir", str(tmp_path / "texts"), "--no-baselines"])
    out = capsys.readouterr().out
    assert "| text | bytes | ours 1K B/tok | ours 512 B/tok |" in out
    # the file's documents as data preparation reads them (one paragraph, its final newline dropped)
    for name, text in [*EVAL_SAMPLES.items(), ("mine.txt", mine.rstrip("\n"))]:
        row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
        n = len(text.encode())
        assert row == f"| {name} | {n:,} | {n / len(tok.encode(text)):.2f} | {n / len(small.encode(text)):.2f} |"


def test_tiktoken_baseline_fails_fast(monkeypatch):
    import time

    import tiktoken

    from scripts.tok_eval import load_tiktoken_baseline

    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: time.sleep(30))  # a network that hangs
    t0 = time.time()
    enc, why = load_tiktoken_baseline("gpt2", timeout_s=0.3)
    assert enc is None and "timed out" in why and time.time() - t0 < 5

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert load_tiktoken_baseline("gpt2") == (None, "ConnectionError: no network")
