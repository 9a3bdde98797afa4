"""Checkpoints: round trip, completeness rule (meta written last), atomicity under a kill mid-save,
keep-last-N, `_orig_mod.` stripping, load_model's defaults and its clear errors."""

import json
import os
import time

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizer

CONFIG = {"sequence_len": 16, "vocab_size": 300, "n_layer": 1, "n_head": 2, "n_kv_head": 2, "n_embd": 32}


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**dict(CONFIG, **overrides)))
    model.init_weights()
    return model


def trained_state(model):
    """A model and optimizer that took one step, so the optimizer has state."""
    opt = build_optimizer(model, matrix_lr=0.01, embedding_lr=0.01, unembedding_lr=0.01, scalar_lr=0.01)
    x = torch.randint(0, 300, (2, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    model.zero_grad(set_to_none=True)
    return opt


def save(d, step, model, opt, **meta):
    cm.save_checkpoint(d, step, model.state_dict(), opt.state_dict(),
                       dict({"model_config": model.config.to_dict(), "world_size": 1}, **meta))


def test_round_trip_and_file_layout(tmp_path):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt, val_bpb=1.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta_000005.json", "model_000005.pt",
                                                          "optim_000005_rank0.pt"]
    model_state, optim_state, meta = cm.load_checkpoint(tmp_path, 5, load_optimizer=True)
    assert meta["step"] == 5 and meta["val_bpb"] == 1.25
    for k, v in model.state_dict().items():
        assert torch.equal(model_state[k], v)
    fresh = tiny_model(seed=1)
    cm.load_state_into(fresh, model_state)
    opt2 = build_optimizer(fresh, matrix_lr=0.01, embedding_lr=0.01, unembedding_lr=0.01, scalar_lr=0.01)
    opt2.load_state_dict(optim_state)
    x = torch.randint(0, 300, (2, 17))
    assert torch.equal(fresh(x[:, :-1], x[:, 1:]), model(x[:, :-1], x[:, 1:]))
    # the restored optimizer continues exactly like the original
    for m, o in ((model, opt), (fresh, opt2)):
        m(x[:, :-1], x[:, 1:]).backward()
        o.step()
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_compile_prefix_is_stripped(tmp_path):
    model = tiny_model()
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    cm.save_checkpoint(tmp_path, 1, state, None, {"model_config": model.config.to_dict()})
    loaded, _, _ = cm.load_checkpoint(tmp_path, 1)
    assert set(loaded) == set(model.state_dict())


def test_a_checkpoint_exists_only_once_its_meta_exists(tmp_path):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 10, model, opt)
    # a save killed after the data files but before the meta (the commit mark)
    with pytest.raises(KeyboardInterrupt):
        cm.save_checkpoint(tmp_path, 20, model.state_dict(), opt.state_dict(), {}, barrier=_raise_interrupt)
    assert (tmp_path / "model_000020.pt").exists() and not (tmp_path / "meta_000020.json").exists()
    assert cm.list_steps(tmp_path) == [10] and cm.find_last_step(tmp_path) == 10
    (tmp_path / "meta_000030.json").write_text("{}")  # a meta without its model file does not count either
    assert cm.find_last_step(tmp_path) == 10


def _raise_interrupt():
    raise KeyboardInterrupt


def test_kill_while_writing_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 10, model, opt, val_bpb=2.0)
    real_save = torch.save

    def torn_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 10, model, opt, val_bpb=3.0)  # overwriting the same step must not tear it either
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20, model, opt)
    monkeypatch.setattr(torch, "save", real_save)
    assert cm.find_last_step(tmp_path) == 10
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert not (tmp_path / "model_000020.pt").exists()
    state, optim_state, meta = cm.load_checkpoint(tmp_path, 10, load_optimizer=True)
    assert meta["val_bpb"] == 2.0 and optim_state["rank"] == 0
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_keep_last_prunes_oldest_whole_checkpoints(tmp_path):
    model = tiny_model()
    opt = trained_state(model)
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt)
    assert cm.prune_checkpoints(tmp_path, 2) == [1, 2]
    assert cm.list_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "meta_000003.json", "meta_000004.json", "model_000003.pt", "model_000004.pt",
        "optim_000003_rank0.pt", "optim_000004_rank0.pt"]
    assert cm.prune_checkpoints(tmp_path, -1) == []


def test_missing_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(cm.CheckpointError, match="no complete checkpoint"):
        cm.find_last_step(tmp_path)
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 3, model, opt)
    with pytest.raises(cm.CheckpointError, match=r"step 4 .*\[3\]"):
        cm.load_checkpoint(tmp_path, 4)
    with pytest.raises(cm.CheckpointError, match="rank1.pt is missing"):
        cm.load_checkpoint(tmp_path, 3, load_optimizer=True, rank=1)


def test_other_model_config_is_a_clear_error(tmp_path):
    model = tiny_model()
    other = tiny_model(n_embd=64)
    with pytest.raises(cm.CheckpointError, match="shape mismatches.*c_q"):
        cm.load_state_into(other, model.state_dict())
    diff = cm.config_mismatch(model.config.to_dict(), other.config.to_dict())
    assert diff == ["n_embd: checkpoint 32 vs now 64"]


@pytest.fixture(scope="module")
def tokenizer_300():
    from nanochat.tokenizer import Tokenizer

    docs = [f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(300)]
    return Tokenizer.train_from_iterator(docs, vocab_size=300)


def test_load_model_latest_tag_and_step_and_vocab_check(base_dir, tokenizer_300):
    tokenizer_300.save(base_dir / "tokenizer")
    phase = base_dir / "base_checkpoints"
    m_old, m_new = tiny_model(seed=1), tiny_model(seed=2)
    cm.save_checkpoint(phase / "d1", 4, m_old.state_dict(), None, {"model_config": m_old.config.to_dict()})
    cm.save_checkpoint(phase / "d1_new", 2, m_old.state_dict(), None, {"model_config": m_old.config.to_dict()})
    cm.save_checkpoint(phase / "d1_new", 7, m_new.state_dict(), None, {"model_config": m_new.config.to_dict()})
    past = time.time() - 100
    os.utime(phase / "d1" / "meta_000004.json", (past, past))
    model, tok, meta = cm.load_model("base", "cpu")
    assert meta["step"] == 7 and not model.training and tok.get_vocab_size() == 300
    for k, v in m_new.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    _, _, meta = cm.load_model("base", "cpu", model_tag="d1_new", step=2)
    assert meta["step"] == 2
    # a model trained with another vocabulary
    big = tiny_model(vocab_size=512)
    cm.save_checkpoint(phase / "big", 1, big.state_dict(), None, {"model_config": big.config.to_dict()})
    with pytest.raises(cm.CheckpointError, match=r"tokenizer vocab size 300 does not match the model's 512"):
        cm.load_model("base", "cpu", model_tag="big")
    with pytest.raises(ValueError, match="unknown phase"):
        cm.load_model("pre", "cpu")


def test_load_model_without_checkpoints_says_what_to_do(base_dir):
    with pytest.raises(cm.CheckpointError, match="train a model first"):
        cm.load_model("base", "cpu")


def test_meta_is_plain_json(tmp_path):
    model = tiny_model()
    cm.save_checkpoint(tmp_path, 1, model.state_dict(), None, {"model_config": model.config.to_dict(), "x": [1, 2]})
    meta = json.loads((tmp_path / "meta_000001.json").read_text())
    size = (tmp_path / "model_000001.pt").stat().st_size
    assert meta == {"model_config": model.config.to_dict(), "x": [1, 2], "step": 1,
                    "checksums": {"model_000001.pt": {"crc32": meta["checksums"]["model_000001.pt"]["crc32"],
                                                      "bytes": size}}}


# ---------------------------------------------------------------------------------------------
# checksums: computed while writing, checked on load


def wide_model():
    """Big enough (~1.1 MB of weights) that 28 KB written into the middle of its file hit tensor data only,
    which torch.load itself does not notice."""
    return tiny_model(n_embd=128, n_head=4, n_kv_head=4, n_layer=2, vocab_size=512)


def overwrite_middle(path, n=28 * 1024, seed=0):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed),
                                      dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))


def test_checksums_are_those_of_the_files_as_written(tmp_path):
    import zlib

    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    sums = json.loads((tmp_path / "meta_000005.json").read_text())["checksums"]
    assert set(sums) == {"model_000005.pt", "optim_000005_rank0.pt"}
    for name, rec in sums.items():
        data = (tmp_path / name).read_bytes()  # an independent reference: zlib over the whole file at once
        assert rec == {"crc32": f"{zlib.crc32(data):08x}", "bytes": len(data)}


def test_garbage_in_the_middle_of_a_model_file_is_refused_by_name(tmp_path):
    model = wide_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    save(tmp_path, 10, model, opt)
    meta = json.loads((tmp_path / "meta_000010.json").read_text())
    path = tmp_path / "model_000010.pt"
    overwrite_middle(path)
    # torch alone loads it, with wrong weights: what the checksum is for
    damaged = torch.load(path, weights_only=True)
    assert any(not torch.equal(damaged[k], v) for k, v in model.state_dict().items())
    with pytest.raises(cm.CorruptCheckpoint, match=r"model_000010\.pt is corrupt: its CRC-32 is [0-9a-f]{8} where "
                                                   rf"{meta['checksums']['model_000010.pt']['crc32']} was recorded") as e:
        cm.load_checkpoint(tmp_path, 10)
    assert str(e.value).endswith("restore it, or load another step")
    # --resume latest falls back past it as past a truncated file
    logged = []
    assert cm.newest_readable_step(tmp_path, log=logged.append) == 5
    assert "model_000010.pt is corrupt" in logged[0] and "falling back to step 5" in logged[0]
    # a file of another size (cut, or grown) is refused without reading it
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(cm.CorruptCheckpoint, match="bytes where .* were written"):
        cm.verify_checkpoint(tmp_path, 10)


def test_checkpoints_written_before_checksums_still_load(tmp_path):
    model = wide_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    meta_file = tmp_path / "meta_000005.json"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]
    meta_file.write_text(json.dumps(meta))
    state, optim_state, _ = cm.load_checkpoint(tmp_path, 5, load_optimizer=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and optim_state["state"]
    assert cm.newest_readable_step(tmp_path) == 5


def test_every_ranks_checksum_reaches_the_meta_through_gather(tmp_path):
    """Distributed, rank 0 writes the meta with the checksums of every rank's optimizer file (gather)."""
    model = tiny_model()
    opt = trained_state(model)
    other = {"optim_000005_rank1.pt": {"crc32": "0badc0de", "bytes": 7}}
    cm.save_checkpoint(tmp_path, 5, model.state_dict(), opt.state_dict(), {"model_config": model.config.to_dict()},
                       gather=lambda own: [own, other])
    sums = json.loads((tmp_path / "meta_000005.json").read_text())["checksums"]
    assert set(sums) == {"model_000005.pt", "optim_000005_rank0.pt", "optim_000005_rank1.pt"}


def test_unreadable_file_messages_end_in_a_whole_sentence(tmp_path):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    meta_file = tmp_path / "meta_000005.json"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]  # an old checkpoint: torch's own error is what the user sees
    meta_file.write_text(json.dumps(meta))
    path = tmp_path / "model_000005.pt"
    data = bytearray(path.read_bytes())
    for start in range(0, len(data), 4096):  # damage every zip header torch reads
        data[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(cm.UnreadableCheckpoint) as e:
        cm.load_checkpoint(tmp_path, 5)
    msg = str(e.value)
    assert msg.startswith(f"{path} cannot be read (truncated or corrupt: ") and msg.endswith(")")
    reason = msg[len(f"{path} cannot be read (truncated or corrupt: "):-1]
    assert "your checkpoint f" not in reason and "weights_only" not in reason and not reason.endswith((" is", " f"))
    assert cm._short(RuntimeError("PytorchStreamReader failed reading file data/6: invalid header or archive is "
                                  "corrupted. This is an internal miniz error. If you are seeing this error, there "
                                  "is a high likelihood that your checkpoint file is corrupted.")) == (
        "PytorchStreamReader failed reading file data/6: invalid header or archive is corrupted")
