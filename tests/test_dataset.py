"""Data sources and layout: prepare round-trips, pinned validation, rank sharding, bad input, offline
download, the embedded corpus."""

import json
import time
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import data_prep, dataset
from nanochat import data_prep as dataset_cli
from nanochat.dataset import DataError


def make_docs(n, seed=0):
    import random

    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly boxes".split()
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 60))) for i in range(n)]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))


def all_texts(data_dir):
    return list(dataset.iter_documents("train", data_dir)) + list(dataset.iter_documents("val", data_dir))


# ---------------------------------------------------------------------------------------------
# prepare


@pytest.mark.parametrize("kind", ["jsonl", "txt", "parquet", "folder"])
def test_prepare_round_trips(tmp_path, kind):
    docs = make_docs(300)
    src = tmp_path / "src"
    src.mkdir()
    if kind == "jsonl":
        write_jsonl(src / "a.jsonl", docs)
        inp = src / "a.jsonl"
    elif kind == "txt":
        (src / "a.txt").write_text("\n<|endoftext|>\n".join(docs))
        inp = src / "a.txt"
    elif kind == "parquet":
        pq.write_table(pa.table({"text": docs}), src / "a.parquet")
        inp = src / "a.parquet"
    else:  # a folder mixing all three
        write_jsonl(src / "a.jsonl", docs[:100])
        (src / "b.txt").write_text("<|endoftext|>".join(docs[100:200]))
        pq.write_table(pa.table({"text": docs[200:]}), src / "c.parquet")
        inp = src
    out = tmp_path / "out"
    data_prep.prepare(inp, out, val_fraction=0.1, seed=3, rows_per_group=32, docs_per_shard=120, verbose=False)
    assert Counter(all_texts(out)) == Counter(docs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val"] == ["val_shard.parquet"]
    assert manifest["train"] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert len(list(dataset.iter_documents("val", out))) == 30
    assert pq.ParquetFile(out / "shard_00000.parquet").metadata.row_group(0).num_rows == 15  # 120 docs / 8 groups


def test_prepare_shuffle_is_seeded_and_val_has_at_least_one_doc(tmp_path):
    docs = make_docs(50)
    a = data_prep.prepare(docs, tmp_path / "a", val_fraction=0.0001, seed=7, verbose=False)
    b = data_prep.prepare(docs, tmp_path / "b", val_fraction=0.0001, seed=7, verbose=False)
    c = data_prep.prepare(docs, tmp_path / "c", val_fraction=0.0001, seed=8, verbose=False)
    assert all_texts(a) == all_texts(b)
    assert all_texts(a) != all_texts(c)
    assert all_texts(a) != docs  # shuffled
    assert len(list(dataset.iter_documents("val", a))) == 1


def test_prepare_refuses_to_overwrite_without_force(tmp_path):
    data_prep.prepare(make_docs(10), tmp_path, verbose=False)
    with pytest.raises(DataError, match="--force"):
        data_prep.prepare(make_docs(10), tmp_path, verbose=False)
    data_prep.prepare(make_docs(12), tmp_path, force=True, verbose=False)
    assert len(all_texts(tmp_path)) == 12
    with pytest.raises(DataError, match="contains the output folder"):
        data_prep.prepare(tmp_path, tmp_path, force=True, verbose=False)


def test_txt_paragraph_mode_keeps_all_text(tmp_path):
    paras = [f"paragraph {i} " + "word " * (i % 50) for i in range(200)]
    (tmp_path / "book.txt").write_text("\n\n".join(paras))
    docs = dataset.read_text_file(tmp_path / "book.txt")
    assert 1 < len(docs) < len(paras)
    assert "\n\n".join(docs) == "\n\n".join(p.strip("\n") for p in paras)
    assert all(len(d) < 2 * dataset.TXT_DOC_CHARS for d in docs)


def test_cli_prepare_then_info(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", make_docs(40))
    dataset_cli.main(["prepare", "--input", str(tmp_path / "in.jsonl"), "--val-fraction", "0.25",
                  "--data-dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert "train: 1 file(s), 30 parquet rows" in out and "val: 1 file(s), 10 parquet rows" in out


def test_default_data_dir_is_under_base_dir(base_dir):
    assert dataset.get_data_dir() == base_dir / "base_data"
    write_jsonl(base_dir / "in.jsonl", make_docs(20))
    dataset_cli.main(["prepare", "--input", str(base_dir / "in.jsonl")])
    assert [p.name for p in dataset.list_shards("val")] == ["val_shard.parquet"]


# ---------------------------------------------------------------------------------------------
# layout and sharding


def test_ranks_get_disjoint_documents_covering_the_split(tmp_path):
    docs = make_docs(500)
    data_prep.prepare(docs, tmp_path, val_fraction=0.1, rows_per_group=16, docs_per_shard=200, verbose=False)
    train = list(dataset.iter_documents("train", tmp_path))
    for world in (2, 3):
        parts = [list(dataset.iter_documents("train", tmp_path, rank=r, world_size=world)) for r in range(world)]
        seen = [set(p) for p in parts]
        for i in range(world):
            for j in range(i + 1, world):
                assert not seen[i] & seen[j]
        assert Counter(sum(parts, [])) == Counter(train)


def test_manifest_pins_validation_not_last_file(tmp_path):
    for i in (0, 1, 6542):
        pq.write_table(pa.table({"text": [f"shard {i} doc {j}" for j in range(3)]}), tmp_path / f"shard_{i:05d}.parquet")
    # no manifest: the known pinned ClimbMix validation shard is recognised by name
    assert [p.name for p in dataset.list_shards("val", tmp_path)] == ["shard_06542.parquet"]
    assert [p.name for p in dataset.list_shards("train", tmp_path)] == ["shard_00000.parquet", "shard_00001.parquet"]
    # a manifest wins over names; a later-downloaded train shard does not become validation
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "shard_00002.parquet")
    dataset.write_manifest(tmp_path, "climbmix", ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"],
                           ["shard_06542.parquet"])
    assert [p.name for p in dataset.list_shards("val", tmp_path)] == ["shard_06542.parquet"]
    assert len(dataset.list_shards("train", tmp_path)) == 3


def test_plain_folder_with_val_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", make_docs(30))
    (tmp_path / "val.txt").write_text("held out one<|endoftext|>held out two")
    assert list(dataset.iter_documents("val", tmp_path)) == ["held out one", "held out two"]
    assert len(list(dataset.iter_documents("train", tmp_path))) == 30


# ---------------------------------------------------------------------------------------------
# bad input


def test_folder_without_validation_split_is_a_clear_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    with pytest.raises(DataError, match="no validation split.*prepare"):
        dataset.list_shards("val", tmp_path)
    with pytest.raises(DataError, match="no data folder"):
        dataset.list_shards("train", tmp_path / "missing")


def test_corrupt_parquet_is_named_or_counted_when_skipping(tmp_path):
    data_prep.prepare(make_docs(100), tmp_path, rows_per_group=8, docs_per_shard=45, verbose=False)
    bad = tmp_path / "shard_00001.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated: footer gone
    with pytest.raises(DataError, match="shard_00001.parquet.*corrupt or truncated"):
        list(dataset.iter_documents("train", tmp_path))
    units, skipped = dataset.list_units("train", tmp_path, skip_corrupt=True)
    assert len(skipped) == 1 and "shard_00001" in skipped[0]
    assert {u.path.name for u in units} == {"shard_00000.parquet", "shard_00002.parquet"}


def test_empty_and_undecodable_inputs(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="at least 2 non-empty documents"):
        data_prep.prepare(tmp_path / "empty.jsonl", tmp_path / "o1", verbose=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 one\n\ncaf\xe9 two".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8.*encoding-errors"):
        data_prep.prepare(tmp_path / "latin1.txt", tmp_path / "o2", verbose=False)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="bad.jsonl is not valid UTF-8"):
        dataset.read_jsonl_file(bad_jsonl)
    assert dataset.read_jsonl_file(bad_jsonl, errors="replace") == ["ok", "caf\ufffd"]
    (tmp_path / "nofield.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match="nofield.jsonl:1 has no string field 'text'"):
        dataset.read_jsonl_file(tmp_path / "nofield.jsonl")
    # empty documents are dropped and counted
    out = data_prep.prepare(["a", "", "  ", "b", "c"], tmp_path / "o3", val_fraction=0.3, verbose=False)
    assert json.loads((out / "manifest.json").read_text())["empty_docs_dropped"] == 2
    # an empty parquet shard in a data folder
    d = tmp_path / "o4"
    d.mkdir()
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "shard_00000.parquet")
    pq.write_table(pa.table({"text": ["v"]}), d / "val.parquet")
    with pytest.raises(DataError, match="shard_00000.parquet is empty"):
        list(dataset.iter_documents("train", d))


def test_missing_input_path_is_not_sent_to_the_hub(tmp_path):
    t0 = time.time()
    with pytest.raises(DataError, match="no such file or folder"):
        data_prep.prepare(tmp_path / "nope.jsonl", tmp_path / "out", verbose=False)
    assert time.time() - t0 < 2


def test_more_ranks_than_row_groups(tmp_path):
    data_prep.prepare(make_docs(20), tmp_path, rows_per_group=1024, verbose=False)  # 8 groups of <= 3 docs
    n_groups = pq.ParquetFile(tmp_path / "shard_00000.parquet").metadata.num_row_groups
    with pytest.raises(DataError, match=f"{n_groups + 1} ranks but the train split has only {n_groups} row groups"):
        next(dataset.iter_documents("train", tmp_path, rank=0, world_size=n_groups + 1))


# ---------------------------------------------------------------------------------------------
# download: must fail fast and say what to do when the hub cannot be reached


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9", "http://10.255.255.1:81"])
def test_offline_download_fails_fast_with_advice(tmp_path, monkeypatch, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # refused / unroutable (connect must time out)
    t0 = time.time()
    with pytest.raises(DataError) as err:
        data_prep.download(2, data_dir=tmp_path)
    assert time.time() - t0 < 10
    msg = str(err.value)
    for hint in ("cannot reach", "HF_ENDPOINT", "prepare --input", "--data-dir", "nanochat.dataset embedded"):
        assert hint in msg
    assert not list(tmp_path.glob("*.parquet"))


def test_download_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        data_prep.download(1, source="nope", data_dir=tmp_path)
    with pytest.raises(ValueError, match="6542 train shards"):
        data_prep.download(6543, data_dir=tmp_path)
    assert dataset.SOURCES["climbmix"].val_name == "shard_06542.parquet"
    assert dataset.SOURCES["fineweb-edu"].val_name == "shard_01822.parquet"


def test_download_resumes_and_writes_pinned_manifest(tmp_path, monkeypatch):
    """The download loop with the hub call replaced by a local copy: kept files are not fetched again,
    a corrupt fetch is retried, the manifest pins the validation shard."""
    import huggingface_hub

    calls = Counter()

    def fake_download(repo_id, filename, repo_type, local_dir, endpoint, etag_timeout):
        assert repo_type == "dataset" and repo_id == "karpathy/climbmix-400b-shuffle"
        assert endpoint == "https://huggingface.co" and etag_timeout <= 10
        calls[filename] += 1
        out = dataset.Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        if filename == "shard_00001.parquet" and calls[filename] == 1:
            out.write_bytes(b"PAR1 truncated")  # first attempt arrives corrupt
        else:
            pq.write_table(pa.table({"text": [filename]}), out)
        return str(out)

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(data_prep, "probe_hub", lambda *a, **k: None)
    monkeypatch.setattr(data_prep.time, "sleep", lambda s: None)
    pq.write_table(pa.table({"text": ["already here"]}), tmp_path / "shard_00000.parquet")
    data_prep.download(2, data_dir=tmp_path, workers=2)
    assert calls == Counter({"shard_06542.parquet": 1, "shard_00001.parquet": 2})
    assert list(dataset.iter_documents("val", tmp_path)) == ["shard_06542.parquet"]
    assert list(dataset.iter_documents("train", tmp_path)) == ["already here", "shard_00001.parquet"]


# ---------------------------------------------------------------------------------------------
# the embedded corpus


def test_embedded_corpus_builds_offline(tmp_path):
    try:
        docs = data_prep.embedded_documents()
    except DataError as e:  # only when the package cannot be installed at all
        pytest.skip(f"embedded corpus package unavailable: {e}")
    assert len(docs) == 1189 and sum(map(len, docs)) > 4_000_000
    assert docs[0].startswith("Genesis 1\n\nIn the beginning God created")
    out = data_prep.prepare_embedded(tmp_path)
    assert [p.name for p in dataset.list_shards("val", out)] == ["val_shard.parquet"]
    assert len(list(dataset.iter_documents("val", out))) == round(0.05 * 1189)
    assert data_prep.prepare_embedded(tmp_path) == out  # second call: already there, no error
