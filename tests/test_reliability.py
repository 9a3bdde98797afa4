"""Reliability: one writer per run folder, leftovers of failures cleaned, checkpoints that fail to load or to
save, a model always meets its own tokenizer, bad inputs as one-line errors (exit 2, no traceback), eval
failures that keep what was scored, progress lines. Each test checks the exit code or exception, the message,
and that nothing was lost."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.run_dir import RunLock, RunLockedError, clean_run_dir, remove_if_unused
from tests.test_base_train import (
    TINY,
    read_metrics,
    run_dir,
    subprocess_env,
    tiny_base,  # noqa: F401  (a fixture, used by name)
    torchrun,
)
from tests.test_checkpoint_manager import save, tiny_model, trained_state

REPO = Path(__file__).resolve().parents[1]


def py_env(base: Path | None = None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    if base is not None:
        env["NANOCHAT_BASE_DIR"] = str(base)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def one_line_error(err: str, prefix: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# one writer per run folder


HOLDER = """
import sys, time
from nanochat.run_dir import RunLock
RunLock(sys.argv[1], what="training").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    run = tmp_path / "d2"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], env=py_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as e:
            RunLock(run).acquire()
        msg = str(e.value)
        assert f"in use by process {holder.pid}" in msg and "training" in msg and "--model-tag" in msg
        holder.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock with the process
        holder.wait(timeout=30)
        with RunLock(run) as lock:
            assert lock.held
            assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
        assert not lock.held
        RunLock(run).acquire().release()  # and released on exit of the with block
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_clean_run_dir_removes_dead_temp_files_and_uncommitted_steps_only(tmp_path):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    # what a kill -9 during the save of step 10 leaves: a temp file of a dead process, a model without meta
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"optim_000010_rank0.pt.tmp{dead.pid}").write_bytes(b"x" * 1000)
    (tmp_path / "model_000010.pt").write_bytes((tmp_path / "model_000005.pt").read_bytes())
    (tmp_path / f"tokenizer.tmp{dead.pid}").mkdir()
    live = tmp_path / f"model_000012.pt.tmp{os.getpid()}"  # our own write in progress: kept
    live.write_bytes(b"y")
    removed = {p.name for p in clean_run_dir(tmp_path)}
    assert removed == {f"optim_000010_rank0.pt.tmp{dead.pid}", "model_000010.pt", f"tokenizer.tmp{dead.pid}"}
    assert live.exists()
    assert cm.list_steps(tmp_path) == [5]
    _, optim, meta = cm.load_checkpoint(tmp_path, 5, load_optimizer=True)  # step 5 untouched
    assert meta["step"] == 5 and optim is not None


def test_remove_if_unused_drops_only_empty_run_folders(tmp_path):
    empty = tmp_path / "failed"
    with RunLock(empty):
        (empty / "metrics.jsonl").write_text("")
    assert remove_if_unused(empty) and not empty.exists()
    used = tmp_path / "used"
    with RunLock(used):
        (used / "metrics.jsonl").write_text('{"step": 1}\n')
    assert not remove_if_unused(used) and (used / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# checkpoints that fail to load or to save


def three_checkpoints(d: Path):
    model = tiny_model()
    opt = trained_state(model)
    for step in (5, 10, 15):
        save(d, step, model, opt)
    return model, opt


@pytest.mark.parametrize("victim", ["model_000015.pt", "meta_000015.json", "optim_000015_rank0.pt"])
def test_truncated_newest_checkpoint_is_named_and_resume_falls_back(tmp_path, victim):
    three_checkpoints(tmp_path)
    path = tmp_path / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    # the meta does not parse; a data file is shorter than its recorded size
    why = "cannot be read" if victim.endswith(".json") else r"is corrupt: it holds .* bytes where .* were written \(cut short\)"
    with pytest.raises(cm.UnreadableCheckpoint, match=f"{victim} {why}"):
        cm.verify_checkpoint(tmp_path, 15)
    logged = []
    assert cm.newest_readable_step(tmp_path, log=logged.append) == 10
    assert len(logged) == 1 and victim in logged[0] and "falling back to step 10" in logged[0]
    _, optim, meta = cm.load_checkpoint(tmp_path, 10, load_optimizer=True)
    assert meta["step"] == 10 and optim["state"]
    if victim != "meta_000015.json":
        with pytest.raises(cm.UnreadableCheckpoint, match=victim):
            cm.load_checkpoint(tmp_path, 15, load_optimizer=True)


def test_no_readable_checkpoint_lists_every_problem(tmp_path):
    three_checkpoints(tmp_path)
    for step in (5, 10, 15):
        (tmp_path / f"model_{step:06d}.pt").write_bytes(b"PK")
    with pytest.raises(cm.CheckpointError, match="no readable checkpoint") as e:
        cm.newest_readable_step(tmp_path)
    assert all(f"model_{s:06d}.pt" in str(e.value) for s in (5, 10, 15))


class FullDisk:
    """A file whose write() fails with ENOSPC once `room` bytes are written (what a full disk does)."""

    def __init__(self, path, room):
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115  (closed by __exit__, like a real file)

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 3000])
def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, room):
    model = tiny_model()
    opt = trained_state(model)
    save(tmp_path, 5, model, opt)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(cm, "_open_for_write", lambda path: FullDisk(path, room))
    with pytest.raises(cm.DiskFullError) as e:
        save(tmp_path, 10, model, opt)
    msg = str(e.value)
    assert "\n" not in msg and "enforce" not in msg
    assert msg.startswith(f"No space left on device while writing {tmp_path / 'model_000010.pt'}")
    assert "previous checkpoint step 5 kept" in msg
    # what would help: the space one more checkpoint needs, and another base dir (--keep-last cannot make a
    # disk that holds one checkpoint hold the second a save writes before it prunes)
    need = cm._gb(cm.checkpoint_bytes(tmp_path, 5))
    assert f"room for one more checkpoint beside the kept one ({need} each" in msg and "NANOCHAT_BASE_DIR" in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, no half step 10
    monkeypatch.undo()
    assert cm.list_steps(tmp_path) == [5] and cm.load_checkpoint(tmp_path, 5, load_optimizer=True)[2]["step"] == 5


# ---------------------------------------------------------------------------------------------
# a model and its tokenizer


def _texts(seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "light", "north", "south"]
    if seed:
        words = [w[::-1] + "x" for w in words]
    return [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]


def test_retrained_tokenizer_at_the_same_vocab_size_is_refused(base_dir, tmp_path, capsys):
    from nanochat.tokenizer import Tokenizer
    from scripts import tok_train

    first = Tokenizer.train_from_iterator(_texts(0), vocab_size=300)
    first.save(base_dir / "tokenizer")
    first = Tokenizer.from_directory(base_dir / "tokenizer")
    model = tiny_model(vocab_size=first.get_vocab_size())
    run = base_dir / "base_checkpoints" / "d1"
    cm.save_checkpoint(run, 3, model.state_dict(), None, {"model_config": model.config.to_dict()}, tokenizer=first)
    meta = cm.load_meta(run, 3)
    assert meta["tokenizer"]["hash"] == first.identity and (run / "tokenizer" / "ranks.tiktoken").is_file()
    assert Tokenizer.from_directory(run / "tokenizer").identity == first.identity  # the run keeps a copy

    # tok_train refuses to overwrite the tokenizer the checkpoint was trained with ...
    (tmp_path / "other.txt").write_text("\n".join(_texts(1)))
    with pytest.raises(SystemExit) as e:
        tok_train.main(["--input", str(tmp_path / "other.txt"), "--vocab-size", "300"])
    err = capsys.readouterr().err
    line = one_line_error(err, "error:")
    assert e.value.code == 2 and first.identity in line and str(run) in line and "--force" in line
    assert Tokenizer.from_directory(base_dir / "tokenizer").identity == first.identity  # nothing overwritten

    # ... --force does it, and then load_model refuses the swapped tokenizer, naming both hashes and the copy
    tok_train.main(["--input", str(tmp_path / "other.txt"), "--vocab-size", "300", "--force"])
    second = Tokenizer.from_directory(base_dir / "tokenizer")
    assert second.get_vocab_size() == first.get_vocab_size() and second.identity != first.identity
    with pytest.raises(cm.TokenizerMismatch) as e:
        cm.load_model("base", "cpu", model_tag="d1")
    msg = str(e.value)
    assert first.identity in msg and second.identity in msg and str(run / "tokenizer") in msg
    from nanochat.chat_session import (  # the chat tools load through load_model
        ChatError,
        load_chat_model,
    )

    with pytest.raises(ChatError) as e:
        load_chat_model("base", "cpu", model_tag="d1")
    assert first.identity in str(e.value) and second.identity in str(e.value)
    # restoring the kept copy makes the checkpoint loadable again
    import shutil

    shutil.rmtree(base_dir / "tokenizer")
    shutil.copytree(run / "tokenizer", base_dir / "tokenizer")
    loaded, tok, _ = cm.load_model("base", "cpu", model_tag="d1")
    assert tok.identity == first.identity
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_identity_depends_on_ranks_and_specials_not_on_the_folder(tmp_path):
    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

    a = Tokenizer.train_from_iterator(_texts(0), vocab_size=300)
    a.save(tmp_path / "a")
    assert Tokenizer.from_directory(tmp_path / "a").identity == a.identity and len(a.identity) == 16
    ranks = {bytes([b]): b for b in range(256)}
    assert Tokenizer(ranks).identity != Tokenizer(ranks, special_tokens=SPECIAL_TOKENS[::-1]).identity
    swapped = dict(a.mergeable_ranks)
    (t1, r1), (t2, r2) = sorted(swapped.items(), key=lambda kv: kv[1])[-2:]
    swapped[t1], swapped[t2] = r2, r1
    assert Tokenizer(swapped).identity != a.identity


# ---------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2, no traceback


@pytest.mark.parametrize("env,needle", [({"NANOCHAT_PRESET": "bogus"}, "NANOCHAT_PRESET='bogus' is not a preset: use one of auto, gpu, cpu, ci"),
                                        ({"NANOCHAT_DEPTH": "abc"}, "NANOCHAT_DEPTH='abc' is not a positive integer")])
def test_speedrun_bad_environment_is_one_line(tmp_path, env, needle):
    out = subprocess.run([sys.executable, "-m", "scripts.speedrun"], cwd=REPO, env=py_env(tmp_path, **env),
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2
    assert needle in one_line_error(out.stderr, "speedrun: error:")
    assert not any(tmp_path.iterdir())  # nothing was started


def run_on_read_only(folder: Path, cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """`cmd` with `folder` read-only: a private read-only bind mount (root: chmod does not stop root), or
    mode 555 (other users). Skips where neither works."""
    if os.geteuid() == 0:
        mount = (f'mount --bind "{folder}" "{folder}" && mount -o remount,ro,bind "{folder}" "{folder}" && '
                 f'exec "$@"')
        probe = subprocess.run(["unshare", "-m", "sh", "-c", mount, "sh", "touch", str(folder / "x")],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 or "Read-only" not in probe.stderr:
            pytest.skip(f"cannot make a read-only folder here (unshare -m + remount: {probe.stderr.strip()[:100]})")
        cmd = ["unshare", "-m", "sh", "-c", mount, "sh", *cmd]
    else:
        folder.chmod(0o555)
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("command,where", [(["scripts.speedrun"], "the base dir {base}"),
                                           (["nanochat.dataset", "embedded"], "the data folder {base}/base_data"),
                                           (["scripts.speedrun"], "the base dir {base}/sub")])
def test_read_only_base_dir_is_one_line(tmp_path, command, where):
    base = tmp_path / "ro"
    base.mkdir()
    target = base / "sub" if where.endswith("sub") else base
    out = run_on_read_only(base, [sys.executable, "-m", *command],
                           py_env(target, NANOCHAT_PRESET="cpu"))
    prefix = "speedrun: error:" if command[0] == "scripts.speedrun" else "error:"
    line = one_line_error(out.stderr, prefix)
    assert out.returncode == (2 if prefix.startswith("speedrun") else 1)
    assert f"cannot write {where.format(base=base)}: " in line and "NANOCHAT_BASE_DIR" in line, line
    assert not any(base.iterdir())


@pytest.mark.parametrize("flags,needle", [(["--device-type", "cuda"], "cuda"), (["--dtype", "fp8"], "fp8")])
def test_base_eval_bad_device_or_dtype_is_one_line(tmp_path, flags, needle):
    if needle == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--eval", "bpb", *flags], cwd=REPO,
                         env=py_env(tmp_path), capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and needle in one_line_error(out.stderr, "base_eval: error:")


def test_hf_path_offline_fails_within_seconds(tmp_path):
    pytest.importorskip("transformers")
    env = py_env(tmp_path, HF_HOME=tmp_path / "hf", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--hf-path", "openai-community/gpt2", "--eval",
                          "bpb", "--device-type", "cpu"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    seconds = time.time() - t0
    line = one_line_error(out.stderr, "base_eval: error:")
    assert out.returncode == 2 and seconds < 10, (seconds, out.stderr)
    assert "cannot be reached" in line and "--hf-path DIR" in line


def test_non_string_text_column_is_a_one_line_data_error(tmp_path):
    from nanochat.dataloader import DataLoader
    from nanochat.dataset import DataError
    from tests.test_dataloader import ByteTokenizer

    pq.write_table(pa.table({"text": pa.array(list(range(50)), pa.int64())}), tmp_path / "shard_00000.parquet")
    pq.write_table(pa.table({"text": pa.array(list(range(5)), pa.int64())}), tmp_path / "shard_00001.parquet")
    with pytest.raises(DataError, match=r"shard_0000\d.parquet: the 'text' column is int64, not strings") as e:
        DataLoader(ByteTokenizer(), 2, 32, data_dir=tmp_path)
    assert "\n" not in str(e.value) and "prepare" in str(e.value)


# ---------------------------------------------------------------------------------------------
# the eval side


def test_corrupt_task_line_names_file_and_line_and_keeps_the_scored_tasks(tmp_path, base_dir, capsys):
    from nanochat import core_eval as ce
    from scripts.base_eval import main
    from tests.test_core_eval import byte_tokenizer, make_bundle, small_gpt

    bundle = make_bundle(tmp_path)
    schema = bundle / "eval_data" / "synthetic" / "schema.jsonl"
    lines = schema.read_text().splitlines()
    lines[6] = lines[6][:25]  # a line cut in the middle (a copy interrupted)
    schema.write_text("\n".join(lines) + "\n")
    tok = byte_tokenizer()
    model = small_gpt(tok.get_vocab_size(), seq_len=96)

    check = ce.check_bundle(bundle)  # the start-up check says which task will be skipped
    assert check["tasks"] == ["syn_mc", "syn_lm"] and f"{schema} line 7 is not valid JSON" in check["skipped"]["syn_schema"]
    with pytest.raises(ValueError, match="max_per_task=3 is too small: 3-shot"):
        ce.check_bundle(bundle, max_per_task=3)

    out = ce.evaluate_core(model, tok, "cpu", bundle, verbose=False)
    assert set(out["tasks"]) == {"syn_mc", "syn_lm"} and f"{schema} line 7" in out["failed"]["syn_schema"]
    clean = make_bundle(tmp_path / "clean")
    ref = ce.evaluate_core(model, tok, "cpu", clean, verbose=False)
    for label in ("syn_mc", "syn_lm"):
        assert out["tasks"][label]["accuracy"] == ref["tasks"][label]["accuracy"]

    # base_eval: the scored tasks are written, the failure is reported with exit code 1
    tok.save(base_dir / "tokenizer")
    cm.save_checkpoint(base_dir / "base_checkpoints" / "t1", 5, model.state_dict(), None,
                       {"model_config": model.config.to_dict()})
    with pytest.raises(SystemExit) as e:
        main(["--eval", "core", "--eval-bundle", str(bundle), "--device-type", "cpu"])
    captured = capsys.readouterr()
    assert e.value.code == 1 and "WARNING: CORE task syn_schema will be skipped" in captured.out
    assert "1 CORE task(s) failed" in captured.err and "line 7" in captured.err
    saved = json.loads((base_dir / "base_checkpoints" / "t1" / "base_eval_000005.json").read_text())
    assert set(saved["tasks"]) == {"syn_mc", "syn_lm"} and "syn_schema" in saved["core_eval"]["failed"]


def test_check_eval_data_names_a_truncated_val_shard(tmp_path):
    from nanochat import data_prep, dataset
    from nanochat.dataset import DataError
    from nanochat.loss_eval import check_eval_data
    from tests.test_dataloader import make_docs

    data_prep.prepare(make_docs(300), tmp_path, val_fraction=0.2, rows_per_group=13, docs_per_shard=100, verbose=False)
    ok = check_eval_data("val", tmp_path)
    assert ok["docs"] == 60 and ok["row_groups"] >= 4
    assert check_eval_data("val", tmp_path, tokens=10)["row_groups"] == 1  # reads only what the eval needs
    val = dataset.list_shards("val", tmp_path)[0]
    data = val.read_bytes()
    val.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=f"{val.name} is not a readable parquet file"):
        check_eval_data("val", tmp_path)


def test_progress_lines_say_done_total_rate_and_eta(capsys):
    from nanochat.loss_eval import evaluate_loss_and_bpb
    from nanochat.progress import Progress

    now = [0.0]
    bar = Progress("val bpb", 40, "batches", every=5.0, clock=lambda: now[0])
    for _ in range(40):
        now[0] += 0.5
        bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # at 5 s, 10 s, 15 s; none at the end (the caller prints its summary)
    assert lines[0] == "  val bpb: 10/40 batches (25%), 2.00 batches/s, elapsed 5s, ETA 15s"
    # a real pass prints them too (every=0: a line per batch but the last)
    model = tiny_model()
    x = torch.randint(0, 300, (2, 17))
    batches = [(x[:, :-1], x[:, 1:])] * 4
    out = evaluate_loss_and_bpb(model, batches, 4, torch.ones(300, dtype=torch.long), progress="val bpb",
                                progress_every=0.0)
    printed = capsys.readouterr().out
    assert out["tokens"] == 4 * 2 * 16 and "val bpb: 3/4 batches (75%)" in printed and "ETA" in printed


# ---------------------------------------------------------------------------------------------
# the training run: scripts/base_train.py on the tiny artifact dir of tests/test_base_train.py


def train_run(base: Path, *flags: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *flags], cwd=REPO,
                          env=subprocess_env(base, **env), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def train_here(monkeypatch, capsys):
    """base_train's main() in this process (no interpreter start-up): (returncode, stdout, stderr)."""
    from scripts.base_train import main

    def run(base: Path, *flags: str):
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
        for k in ("NANOCHAT_TEST_NAN_STEP", "NANOCHAT_TEST_HANG_STEP", "NANOCHAT_DEVICE", "NANOCHAT_DTYPE"):
            monkeypatch.delenv(k, raising=False)
        capsys.readouterr()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            code = main(list(flags))
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr()
        return subprocess.CompletedProcess(flags, code, out.out, out.err)

    return run


@pytest.fixture
def own_base(tiny_base, tmp_path) -> Path:  # noqa: F811  (the fixture)
    """A private copy of the tiny artifact dir (these tests break its files)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("base_checkpoints"))
    return base


@pytest.mark.slow
def test_concurrent_runs_with_one_tag_the_second_stops_naming_the_first(own_base):
    flags = [*TINY, "--num-iterations", "4", "--model-tag", "same"]
    first = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *flags], cwd=REPO, text=True,
                             env=subprocess_env(own_base, NANOCHAT_TEST_HANG_STEP=2), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    try:
        for line in first.stdout:
            if "hanging at step 2" in line:
                break
        second = train_run(own_base, *flags, "--resume", "auto")
        line = one_line_error(second.stderr, "base_train: error:")
        assert second.returncode == 2 and f"in use by process {first.pid}" in line and "--model-tag" in line
        records = read_metrics(own_base, "same")
        assert [r["step"] for r in records] == [1, 2]  # the first run's records, untouched
    finally:
        first.kill()
        first.wait()
    # after a kill -9 the lock is free, and the leftovers of the killed save are cleaned on the next start
    d = run_dir(own_base, "same")
    (d / "model_000003.pt").write_bytes(b"half a model")
    (d / "optim_000003_rank0.pt.tmp999999").write_bytes(b"x" * 100)
    again = train_run(own_base, *flags, "--resume", "auto")
    assert again.returncode == 0, again.stderr
    assert "removed model_000003.pt" in again.stdout and "removed optim_000003_rank0.pt.tmp999999" in again.stdout
    assert not list(d.glob("*.tmp*")) and [r["step"] for r in read_metrics(own_base, "same")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_truncated_newest_checkpoint_resume_falls_back_and_tokenizer_swap_is_refused(own_base, train_here):
    from nanochat.tokenizer import Tokenizer
    from tests.test_base_train import generated_documents

    flags = [*TINY, "--num-iterations", "4", "--save-every", "1", "--model-tag", "t"]
    done = train_here(own_base, *flags)
    assert done.returncode == 0, done.stderr
    d = run_dir(own_base, "t")
    before = read_metrics(own_base, "t")
    model4 = d / "model_000004.pt"
    model4.write_bytes(model4.read_bytes()[:1000])  # a copy cut short
    out = train_here(own_base, *flags, "--resume", "auto")
    assert out.returncode == 0, out.stderr
    assert "model_000004.pt is corrupt" in out.stdout and "falling back to step 3" in out.stdout
    after = read_metrics(own_base, "t")
    assert [r["step"] for r in after] == [1, 2, 3, 4] and after[3]["raw_loss"] == before[3]["raw_loss"]

    # a tokenizer retrained at the same vocab size: --resume refuses it, naming both hashes and the kept copy
    old = Tokenizer.from_directory(own_base / "tokenizer")
    new = Tokenizer.train_from_iterator(generated_documents(600, seed=7)[::-1][:300], vocab_size=old.get_vocab_size())
    assert new.identity != old.identity
    new.save(own_base / "tokenizer")
    refused = train_here(own_base, *flags, "--num-iterations", "5", "--resume", "latest")
    line = one_line_error(refused.stderr, "base_train: error:")
    assert refused.returncode == 2 and old.identity in line and new.identity in line and str(d / "tokenizer") in line
    assert [r["step"] for r in read_metrics(own_base, "t")] == [1, 2, 3, 4]  # nothing written


@pytest.mark.slow
def test_bad_runs_fail_at_start_with_one_line_and_leave_no_folder(own_base, train_here):
    cases = [(["--device-type", "cuda"], "cuda"), (["--dtype", "fp8"], "fp8"),
             (["--resume", "latest"], "no complete checkpoint")]
    if torch.cuda.is_available():
        cases = cases[1:]
    for extra, needle in cases:
        out = train_here(own_base, *TINY, "--num-iterations", "2", "--model-tag", "bad", *extra)
        assert out.returncode == 2 and needle in one_line_error(out.stderr, "base_train: error:"), extra
        assert not run_dir(own_base, "bad").exists(), extra
    # a truncated validation shard is found before training, not after it
    from nanochat.dataset import list_shards

    val = list_shards("val", own_base / "base_data")[0]
    val.write_bytes(val.read_bytes()[:200])
    out = train_here(own_base, *TINY, "--num-iterations", "2", "--eval-every", "2", "--model-tag", "bad")
    line = one_line_error(out.stderr, "base_train: error:")
    assert out.returncode == 2 and val.name in line and "step 00001" not in out.stdout
    assert not run_dir(own_base, "bad").exists()


def _c4_base(shared_data: Path, base: Path) -> None:
    from nanochat.data_prep import prepare
    from nanochat.tokenizer import Tokenizer

    docs = [json.loads(line)["text"] for line in (shared_data / "text" / "c4").glob("*.jsonl").__next__().open()][:400]
    Tokenizer.train_from_iterator(docs, vocab_size=512).save(base / "tokenizer")
    prepare(docs, data_dir=base / "base_data", val_fraction=0.1, rows_per_group=8, verbose=False)


@pytest.mark.slow
def test_elastic_resume_on_real_text_continues_the_uninterrupted_run(shared_data, tmp_path, train_here):
    """1 process x 2 accumulation == 2 processes x 1 on real web text; a 2-process run resumed on 1 process
    with another --device-batch-size, and back on 2 processes, gives the uninterrupted run's losses."""
    base = tmp_path / "base"
    _c4_base(shared_data, base)
    flags = [*TINY, "--max-seq-len", "64", "--total-batch-size", "512", "--num-iterations", "4", "--save-every", "1",
             "--eval-every", "4"]
    one = train_here(base, *flags, "--model-tag", "one")
    assert one.returncode == 0, one.stderr
    assert "x 1 ranks x 2 accumulation" in one.stdout
    two = torchrun(base, 2, *flags, "--model-tag", "two")
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out
    assert "x 2 ranks x 1 accumulation" in out
    straight = read_metrics(base, "one")
    losses = [r["raw_loss"] for r in straight]
    assert losses[0] != losses[-1]
    assert [r["raw_loss"] for r in read_metrics(base, "two")] == pytest.approx(losses, rel=1e-5)
    # 2 -> 1 process, micro-batch 4 -> 2 (4 accumulation steps): steps 3 and 4 again
    down = train_here(base, *flags, "--model-tag", "two", "--device-batch-size", "2", "--resume-from-step", "2")
    assert down.returncode == 0, down.stderr
    assert "x 1 ranks x 4 accumulation" in down.stdout and "it was written by 2" in down.stdout
    # and back: 1 -> 2 processes from the step the single process saved
    up = torchrun(base, 2, *flags, "--model-tag", "two", "--resume-from-step", "3")
    out, _ = up.communicate(timeout=300)
    assert up.returncode == 0, out
    resumed = read_metrics(base, "two")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["raw_loss"] for r in resumed] == pytest.approx(losses, rel=1e-5)
    assert resumed[3]["val_bpb"] == pytest.approx(straight[3]["val_bpb"], rel=1e-5)


def test_leftovers_of_a_killed_bundle_download_do_not_block_the_next(tmp_path, monkeypatch):
    import shutil
    import zipfile

    from nanochat import core_eval as ce
    from tests.test_core_eval import make_bundle

    monkeypatch.delenv(ce.EVAL_BUNDLE_ENV, raising=False)
    src = make_bundle(tmp_path / "src")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            zf.write(p, Path("eval_bundle") / p.relative_to(src))
    base = tmp_path / "base"
    stale = base / ".eval_bundle_tmp_killed"
    stale.mkdir(parents=True)
    (stale / "eval_bundle.zip").write_bytes(b"half a download")
    (base / "eval_bundle.lock").write_text("")  # the lock file of a process killed mid-download
    got = ce.resolve_eval_bundle(base_dir=base, url=archive.as_uri(), timeout=5)
    assert got == base / "eval_bundle" and [s.label for s in ce.load_task_specs(got)] == \
        [s.label for s in ce.load_task_specs(src)]
    assert not stale.exists() and not list(base.glob(".eval_bundle_tmp_*"))
    shutil.rmtree(src)


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(own_base, train_here, monkeypatch):
    real_open = cm._open_for_write

    def open_for_write(path):  # the disk fills up while step 2's model is written
        return FullDisk(path, 500) if "model_000002" in path.name else real_open(path)

    monkeypatch.setattr(cm, "_open_for_write", open_for_write)
    out = train_here(own_base, *TINY, "--num-iterations", "3", "--save-every", "1", "--model-tag", "full")
    line = one_line_error(out.stderr, "base_train: error:")
    d = run_dir(own_base, "full")
    assert out.returncode == 2
    assert f"No space left on device while writing {d / 'model_000002.pt'}, previous checkpoint step 1 kept" in line
    # what can help when the disk holds one checkpoint only: the space a save needs, another base dir
    assert f"({cm._gb(cm.checkpoint_bytes(d, 1))} each" in line and "set NANOCHAT_BASE_DIR to a disk with" in line
    assert cm.list_steps(d) == [1] and not list(d.glob("*.tmp*")) and not (d / "model_000002.pt").exists()
    monkeypatch.setattr(cm, "_open_for_write", real_open)
    again = train_here(own_base, *TINY, "--num-iterations", "3", "--save-every", "1", "--model-tag", "full",
                       "--resume", "auto")
    assert again.returncode == 0 and cm.list_steps(d) == [1, 2, 3]


@pytest.mark.slow
def test_resume_with_another_device_batch_size_continues_the_run(tiny_base, tmp_path, train_here):  # noqa: F811
    """What the OOM message tells users to do: a smaller --device-batch-size, same total batch, more accumulation."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base, ignore=shutil.ignore_patterns("base_checkpoints"))
    flags = [*TINY, "--num-iterations", "4", "--save-every", "2", "--eval-every", "4", "--model-tag", "dbs"]
    first = train_here(base, *flags)
    assert first.returncode == 0 and "x 1 ranks x 2 accumulation" in first.stdout
    before = read_metrics(base, "dbs")
    again = train_here(base, *flags, "--device-batch-size", "2", "--resume-from-step", "2")
    assert again.returncode == 0, again.stderr
    assert "x 1 ranks x 4 accumulation" in again.stdout
    after = read_metrics(base, "dbs")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["raw_loss"] for r in after] == pytest.approx([r["raw_loss"] for r in before], rel=1e-5)
    assert after[3]["val_bpb"] == pytest.approx(before[3]["val_bpb"], rel=1e-5)
