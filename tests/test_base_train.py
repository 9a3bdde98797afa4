"""End-to-end tests of scripts/base_train.py: real tokenizer, real prepared dataset, real optimizer.

A session fixture builds, once, a tiny artifact directory: a ~384-token BPE tokenizer trained on
generated text and that text prepared as shards (nanochat.data_prep.prepare). Runs use depth 1-2
models at sequence length 32-64, so each takes seconds. Subprocess and torchrun tests use the
test hooks of nanochat/train_loop.py (NANOCHAT_TEST_NAN_STEP / NANOCHAT_TEST_HANG_STEP).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

WORDS = ["the", "a", "one", "every", "some", "quick", "lazy", "brown", "red", "small", "large", "old", "new",
         "happy", "sad", "cat", "dog", "bird", "fish", "king", "queen", "river", "mountain", "city", "house",
         "tree", "garden", "sun", "moon", "star", "runs", "jumps", "sings", "sleeps", "eats", "reads",
         "writes", "sees", "finds", "loves", "under", "over", "near", "beside", "with", "without", "and",
         "but", "because", "while", "then", "1", "2", "3", "42", "1999", "2026"]


def generated_documents(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """An artifact dir with tokenizer/ (vocab 384) and base_data/ (train shards + pinned val shard)."""
    from nanochat.data_prep import prepare
    from nanochat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("nanochat_base")
    docs = generated_documents(600)
    tok = Tokenizer.train_from_iterator(docs, vocab_size=384)
    tok.save(base / "tokenizer")
    prepare(docs, data_dir=base / "base_data", val_fraction=0.1, rows_per_group=16, verbose=False)
    return base


TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "32", "--device-batch-size", "4",
        "--total-batch-size", "256", "--warmup-steps", "2", "--eval-tokens", "256", "--core-metric-every", "0",
        "--sample-every", "0", "--eval-every", "0", "--weight-decay", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs use one thread too (see subprocess_env); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def env_base(tiny_base, monkeypatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base))
    monkeypatch.delenv("NANOCHAT_TEST_NAN_STEP", raising=False)
    monkeypatch.delenv("NANOCHAT_TEST_HANG_STEP", raising=False)
    return tiny_base


def run_dir(base: Path, tag: str) -> Path:
    return base / "base_checkpoints" / tag


def read_metrics(base: Path, tag: str) -> list[dict]:
    from nanochat.run_dir import read_metrics as read

    return read(run_dir(base, tag))


def train_inprocess(*flags: str) -> int:
    from scripts.base_train import main

    return main(list(flags))


def subprocess_env(base: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_TEST_", "RANK", "WORLD_SIZE",
                                                                      "LOCAL_RANK", "MASTER_"))}
    # one thread: tiny matmuls gain nothing from more, and oversubscribed cores make them 10x slower
    env.update(NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_meta_streams(d: Path, step: int) -> int:
    """The number of logical data streams a checkpoint's loader state records."""
    from nanochat.checkpoint_manager import load_meta

    return load_meta(d, step)["dataloader_state"][0]["streams"]


def final_weights(base: Path, tag: str, step: int) -> dict:
    from nanochat.checkpoint_manager import load_checkpoint

    return load_checkpoint(run_dir(base, tag), step)[0]


# ---------------------------------------------------------------------------------------------
# command line


def test_unknown_flag_is_an_argparse_error(capsys):
    from scripts.base_train import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--depht", "4"])
    assert e.value.code == 2
    assert "--depht" in capsys.readouterr().err


def test_resume_flag_spellings():
    from scripts.base_train import build_parser

    p = build_parser()
    assert p.parse_args(["--resume", "latest"]).resume_from_step == "latest"
    assert p.parse_args(["--resume", "auto"]).resume_from_step == "auto"
    assert p.parse_args(["--resume-from-step", "12"]).resume_from_step == 12
    with pytest.raises(SystemExit):
        p.parse_args(["--resume-from-step", "soon"])


def test_indivisible_batch_is_rejected_before_training(env_base, capsys):
    flags = [f for f in TINY]
    flags[flags.index("--total-batch-size") + 1] = "300"  # not a multiple of 4 x 32
    assert train_inprocess(*flags, "--num-iterations", "2", "--model-tag", "bad") == 2
    err = capsys.readouterr().err
    assert "--total-batch-size=300" in err and "256" in err  # names the flag and a valid value
    assert not run_dir(env_base, "bad").exists()


def test_bad_kv_heads_rejected(env_base, capsys):
    assert train_inprocess(*TINY, "--n-kv-head", "3", "--num-iterations", "2", "--model-tag", "bad") == 2
    assert "--n-kv-head=3" in capsys.readouterr().err
    assert train_inprocess(*TINY, "--keep-remainder", "-1", "--num-iterations", "2", "--model-tag", "bad") == 2
    assert "--keep-remainder must be >= 0" in capsys.readouterr().err


def test_data_streams_that_do_not_divide_the_step_are_one_line_errors(env_base, capsys):
    # 8 rows per step (256 tokens of 32): 3 streams cannot each give a whole number of them
    assert train_inprocess(*TINY, "--data-streams", "3", "--num-iterations", "2", "--model-tag", "bad") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-streams 3 does not divide the 8 rows" in err[0] and "1, 2, 4, 8" in err[0]
    assert not run_dir(env_base, "bad").exists()
    assert train_inprocess(*TINY, "--data-streams", "-1", "--num-iterations", "2", "--model-tag", "bad") == 2
    assert "--data-streams must be >= 1, or 0" in capsys.readouterr().err


def test_missing_tokenizer_and_missing_checkpoint_are_one_line_errors(base_dir, env_base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))  # empty: no tokenizer, no data
    assert train_inprocess(*TINY, "--num-iterations", "2") == 2
    assert "tok_train.py" in capsys.readouterr().err
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(env_base))
    assert train_inprocess(*TINY, "--num-iterations", "2", "--model-tag", "never", "--resume", "latest") == 2
    assert "no complete checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# one real run: sizing table, metrics, run.json, checkpoints, evals


def test_tiny_run_writes_metrics_checkpoints_and_evals(env_base, capsys, monkeypatch):
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(env_base / "no_bundle_here"))  # CORE: warn once, go on
    flags = [f for f in TINY if True]
    for name, value in (("--eval-every", "3"), ("--core-metric-every", "3"), ("--sample-every", "-1")):
        flags[flags.index(name) + 1] = value
    code = train_inprocess(*flags, "--num-iterations", "6", "--save-every", "2", "--keep-last", "2",
                           "--model-tag", "tiny")
    out = capsys.readouterr().out
    assert code == 0
    # sizing table before step 0, with the instantiated model
    assert out.index("tokens per step") < out.index("step 00001/6")
    assert "GPT(" in out and "256 = 4 x 32 x 1 ranks x 2 accumulation" in out
    assert out.count("WARNING: CORE metric disabled") == 1
    assert out.count("sample: ") == 4  # the fixed prompts, at the last step only
    records = read_metrics(env_base, "tiny")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert set(r) >= {"step", "loss", "raw_loss", "lr", "dt", "tok_per_sec", "mfu", "tokens", "flops",
                          "peak_mem_mb"}
        assert r["mfu"] is None and r["tokens"] == 256 * r["step"] and r["tok_per_sec"] > 0
    assert [r["step"] for r in records if "val_bpb" in r] == [3, 6]
    assert all(0 < r["val_bpb"] < 20 for r in records if "val_bpb" in r)
    # val_loss in nats/token, in the training loss's units: near it this early in a run
    assert all(0.5 < r["val_loss"] / r["raw_loss"] < 2 for r in records if "val_bpb" in r)
    # smoothed loss: bias-corrected EMA(0.9) of the raw losses
    ema = 0.0
    for i, r in enumerate(records, 1):
        ema = 0.9 * ema + 0.1 * r["raw_loss"]
        assert r["loss"] == pytest.approx(ema / (1 - 0.9 ** i), rel=1e-12)
    assert records[0]["lr"] == pytest.approx(0.5)  # warmup 2 steps
    # keep-last 2 of the checkpoints at 2, 4, 6
    from nanochat.checkpoint_manager import list_steps, load_model

    d = run_dir(env_base, "tiny")
    assert list_steps(d) == [4, 6]
    assert sorted(p.name for p in d.glob("optim_*")) == ["optim_000004_rank0.pt", "optim_000006_rank0.pt"]
    run = json.loads((d / "run.json").read_text())
    assert run["sizing"]["num_iterations"] == 6 and run["sizing"]["grad_accum_steps"] == 2
    assert run["sizing"]["tokens_per_step"] == 256 and run["model_config"]["n_layer"] == 2
    assert run["env"]["dtype"] == "float32"
    assert run["sizing"]["data_streams"] == 8 and "data: 8 logical streams, 8 per rank" in out  # 8 rows per step
    assert load_meta_streams(d, 6) == 8
    model, tok, meta = load_model("base", "cpu", model_tag="tiny")
    assert meta["step"] == 6 and meta["val_bpb"] == records[-1]["val_bpb"]
    assert tok.get_vocab_size() == model.config.vocab_size == 384


def test_no_final_checkpoint_keeps_the_metrics_and_writes_no_checkpoint(env_base, capsys):
    """--no-final-checkpoint (benchmarks: a multi-GB write at depth 20 that they never read): the periodic
    checkpoints are still written, the last step's is not, and the metrics are all there."""
    from nanochat.checkpoint_manager import list_steps

    code = train_inprocess(*TINY, "--num-iterations", "3", "--save-every", "2", "--no-final-checkpoint",
                           "--model-tag", "nofinal")
    out = capsys.readouterr().out
    assert code == 0 and "saved checkpoint step 3" not in out
    assert list_steps(run_dir(env_base, "nofinal")) == [2]
    assert [r["step"] for r in read_metrics(env_base, "nofinal")] == [1, 2, 3]


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(env_base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_TEST_NAN_STEP", "3")  # 0-based step 3 = the 4th update
    code = train_inprocess(*TINY, "--num-iterations", "6", "--save-every", "2", "--model-tag", "nan")
    assert code == 3
    out = capsys.readouterr().out
    assert "loss is nan at step 3" in out and "step 2" in out
    from nanochat.checkpoint_manager import list_steps

    assert list_steps(run_dir(env_base, "nan")) == [2]
    assert [r["step"] for r in read_metrics(env_base, "nan")] == [1, 2, 3]


def test_out_of_memory_names_device_batch_size(env_base, monkeypatch, capsys):
    from nanochat.gpt import GPT

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    assert train_inprocess(*TINY, "--num-iterations", "2", "--model-tag", "oom") == 4
    err = capsys.readouterr().err
    assert "out of memory at step 0" in err and "--device-batch-size=4" in err


def test_fp16_without_grad_scaler_is_refused(env_base, capsys):
    assert train_inprocess(*TINY, "--num-iterations", "2", "--model-tag", "fp16", "--dtype", "float16") == 2
    assert "bfloat16" in capsys.readouterr().err


def test_resume_refuses_another_model_config(env_base, capsys):
    assert train_inprocess(*TINY, "--num-iterations", "2", "--model-tag", "cfg") == 0
    code = train_inprocess(*TINY, "--num-iterations", "4", "--model-tag", "cfg", "--n-kv-head", "1",
                           "--resume", "latest")
    assert code == 2
    assert "different model" in capsys.readouterr().err
    # a fresh run (no --resume) into a folder with checkpoints would mix two runs
    assert train_inprocess(*TINY, "--num-iterations", "2", "--model-tag", "cfg") == 2
    assert "--resume latest" in capsys.readouterr().err


def test_mfu_is_model_flops_over_peak(tmp_path, monkeypatch):
    import nanochat.train_loop as tl
    from nanochat import sizing

    real = tl.init_runtime

    def with_peak(*a, **k):  # pretend the device has a known peak of 1 TFLOP/s
        ctx = real(*a, **k)
        ctx.peak_flops = 1e12
        return ctx

    monkeypatch.setattr(tl, "init_runtime", with_peak)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert train_inprocess(*SYNTH, "--num-iterations", "2", "--model-tag", "mfu") == 0
    fpt = sizing.flops_per_token(sizing.model_config(2, aspect_ratio=32, head_dim=32, max_seq_len=32, vocab_size=256))
    for r in read_metrics(tmp_path, "mfu"):
        assert r["mfu"] == pytest.approx(fpt * r["tok_per_sec"] / 1e12)
        assert r["flops"] == pytest.approx(fpt * r["tokens"])


@pytest.mark.slow
def test_wandb_offline_run_logs_every_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train_inprocess(*SYNTH, "--num-iterations", "2", "--model-tag", "wb", "--run", "wb-test") == 0
    assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


# ---------------------------------------------------------------------------------------------
# exact resume after SIGKILL, preemption by SIGTERM


def start_run(base: Path, tag: str, *flags: str, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/base_train.py", *TINY, "--model-tag", tag, *flags],
                            cwd=REPO_ROOT, env=subprocess_env(base, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> str:
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{needle!r} not seen; output:\n{''.join(seen)}")


def test_resume_auto_starts_fresh_then_continues_from_the_last_checkpoint(env_base, capsys):
    flags = ("--num-iterations", "4", "--save-every", "2", "--eval-every", "-1", "--model-tag", "auto")
    assert train_inprocess(*TINY, *flags, "--resume", "auto") == 0
    assert "no checkpoint in" in capsys.readouterr().out
    first = read_metrics(env_base, "auto")
    # as if the job had been killed after its step-2 checkpoint: drop the step-4 files, requeue
    for f in run_dir(env_base, "auto").glob("*000004*"):
        f.unlink()
    assert train_inprocess(*TINY, *flags, "--resume", "auto") == 0
    out = capsys.readouterr().out
    assert "resuming from step 2" in out and "resumed from" in out
    again = read_metrics(env_base, "auto")
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [r["raw_loss"] for r in again] == [r["raw_loss"] for r in first]


def test_a_checkpoint_of_the_global_stream_continues_on_it(env_base, monkeypatch, capsys):
    """A checkpoint written before logical streams holds the single global stream's loader state: the
    resumed run (logical streams by default) continues on that stream, says so, and trains exactly as the
    run that wrote it would have."""
    import nanochat.train_loop as tl
    from nanochat.dataloader import DataLoader

    real = tl.make_loader

    def global_stream(cfg, tokenizer, split, ctx, grad_accum, vocab_size):  # the loader before streams
        if split != "train":
            return real(cfg, tokenizer, split, ctx, grad_accum, vocab_size)
        return DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, device=ctx.device, rank=ctx.rank,
                          world_size=ctx.world_size, data_dir=cfg.data_dir)

    flags = (*TINY, "--num-iterations", "4", "--save-every", "2", "--model-tag", "before")
    monkeypatch.setattr(tl, "make_loader", global_stream)
    assert train_inprocess(*flags) == 0
    monkeypatch.setattr(tl, "make_loader", real)
    want = [r["raw_loss"] for r in read_metrics(env_base, "before")]
    from nanochat.checkpoint_manager import load_meta

    assert "stream_states" not in load_meta(run_dir(env_base, "before"), 2)["dataloader_state"][0]
    for f in run_dir(env_base, "before").glob("*000004*"):
        f.unlink()
    capsys.readouterr()
    assert train_inprocess(*flags, "--resume", "latest") == 0
    out = capsys.readouterr().out
    assert "continues on that stream" in out and "logical streams, " not in out
    assert [r["raw_loss"] for r in read_metrics(env_base, "before")] == want


@pytest.mark.slow
def test_exact_resume_after_sigkill_is_bit_identical(env_base, capsys):
    flags = ("--num-iterations", "6", "--save-every", "3", "--eval-every", "3")
    # uninterrupted 6 steps (in this process: one thread, like the subprocesses)
    assert train_inprocess(*TINY, *flags, "--model-tag", "ref") == 0
    # the same run, killed mid-way through step 5 (after its step-3 checkpoint), then resumed
    victim = start_run(env_base, "resume", *flags, NANOCHAT_TEST_HANG_STEP=4)
    wait_for_line(victim, "hanging at step 4")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    from nanochat.checkpoint_manager import list_steps

    assert list_steps(run_dir(env_base, "resume")) == [3]
    assert train_inprocess(*TINY, *flags, "--model-tag", "resume", "--resume-from-step", "3") == 0
    assert "resumed from" in capsys.readouterr().out
    ref_metrics, res_metrics = read_metrics(env_base, "ref"), read_metrics(env_base, "resume")
    assert [r["step"] for r in res_metrics] == [1, 2, 3, 4, 5, 6]
    for key in ("raw_loss", "loss"):
        assert [r[key] for r in res_metrics] == [r[key] for r in ref_metrics]  # exact
    assert res_metrics[-1]["val_bpb"] == ref_metrics[-1]["val_bpb"]
    w_ref, w_res = final_weights(env_base, "ref", 6), final_weights(env_base, "resume", 6)
    assert w_ref.keys() == w_res.keys()
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


@pytest.mark.slow
def test_sigterm_saves_at_end_of_step_and_exits_cleanly(env_base):
    proc = start_run(env_base, "preempt", "--num-iterations", "8", NANOCHAT_TEST_HANG_STEP=2)
    wait_for_line(proc, "hanging at step 2")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by signal at step 3" in out
    from nanochat.checkpoint_manager import list_steps, load_meta

    d = run_dir(env_base, "preempt")
    assert list_steps(d) == [3]
    assert load_meta(d, 3)["loop_state"]["smooth_n"] == 3


def test_sigterm_during_a_long_validation_saves_without_waiting_for_it(env_base):
    # 10M validation tokens: far longer than the test's patience if the signal had to wait for them
    proc = start_run(env_base, "preempt_eval", "--num-iterations", "6", "--eval-every", "2",
                     "--eval-tokens", str(10_000_000))
    wait_for_line(proc, "step 00002/6")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "validation abandoned: stop requested" in out or "evaluations skipped: stop requested" in out
    assert "stopped by signal at step 2" in out
    from nanochat.checkpoint_manager import list_steps

    assert list_steps(run_dir(env_base, "preempt_eval")) == [2]
    assert "val_bpb" not in read_metrics(env_base, "preempt_eval")[-1]


@pytest.mark.slow
def test_sigterm_during_a_long_validation_on_two_ranks_stops_both_at_once(env_base):
    # the ranks agree before every validation batch, so the pass ends on both without a desynchronised
    # collective and without waiting for its 10M tokens
    run = torchrun(env_base, 2, *TINY, "--model-tag", "preempt_eval2", "--num-iterations", "6", "--eval-every", "2",
                   "--eval-tokens", str(10_000_000))
    wait_for_line(run, "step 00002/6", timeout=240)
    time.sleep(1.0)
    run.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    out, _ = run.communicate(timeout=120)
    # (torchrun itself exits 1 after a SIGTERM, once its workers are done; they finished cleanly)
    assert "validation abandoned: stop requested" in out or "evaluations skipped: stop requested" in out, out
    assert "stopped by signal at step 2" in out and "done: step 2/6" in out, out
    from nanochat.checkpoint_manager import list_steps

    d = run_dir(env_base, "preempt_eval2")
    assert list_steps(d) == [2]
    assert (d / "optim_000002_rank0.pt").exists() and (d / "optim_000002_rank1.pt").exists()


# ---------------------------------------------------------------------------------------------
# distributed, for real (gloo on CPU)


def torchrun(base: Path, nproc: int, *flags: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             **env) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        cmd += [f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
    else:
        cmd += ["--master-addr=127.0.0.1", f"--master-port={port or free_port()}"]
    cmd += ["scripts/base_train.py", *flags]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(base, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun launcher and every worker it started (a lost node). The workers run in sessions
    of their own, so they are found by their parent process ids."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    doomed, frontier = [], [proc.pid]
    while frontier:
        pid = frontier.pop()
        doomed.append(pid)
        frontier += [child for child, parent in parents.items() if parent == pid]
    for pid in reversed(doomed):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=60)


SYNTH = ["--synthetic-data", "--vocab-size", "256", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32",
         "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "4",
         "--warmup-steps", "1", "--weight-decay", "0"]


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_accumulation(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert train_inprocess(*SYNTH, "--model-tag", "w1") == 0
    assert "x 1 ranks x 4 accumulation" in capsys.readouterr().out
    two = torchrun(tmp_path, 2, *SYNTH, "--model-tag", "w2")
    out2, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out2
    assert "x 2 ranks x 2 accumulation" in out2
    # eager: after the first step every reduction starts from backward's gradient hooks
    started = re.search(r"gradient reductions: (\d+) of (\d+) started during backward", out2)
    assert started and started[1] == started[2] and int(started[2]) > 0, out2
    l1 = [r["raw_loss"] for r in read_metrics(tmp_path, "w1")]
    l2 = [r["raw_loss"] for r in read_metrics(tmp_path, "w2")]
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    assert l1[0] != l1[-1]  # it trained (an unchanged loss would make the comparison vacuous)
    w1, w2 = final_weights(tmp_path, "w1", 4), final_weights(tmp_path, "w2", 4)
    # Muon orthogonalises in bf16: gradients that differ by fp32 summation order give updates that differ
    # by ~1% (its own rounding noise); zero-initialised output projections hold only such updates
    for k in w1:
        assert (w2[k] - w1[k]).norm() <= 2e-2 * w1[k].norm(), k
    assert sum(bool((w2[k] - w1[k]).norm() <= 1e-4 * w1[k].norm()) for k in w1) >= len(w1) // 2
    # bf16 reductions, started after backward: the same run up to bf16 rounding of the gradient sums
    bf16 = torchrun(tmp_path, 2, *SYNTH, "--model-tag", "w2bf16", "--grad-reduce-dtype", "bf16",
                    "--no-overlap-reductions")
    out3, _ = bf16.communicate(timeout=300)
    assert bf16.returncode == 0, out3
    assert "started during backward" not in out3
    l3 = [r["raw_loss"] for r in read_metrics(tmp_path, "w2bf16")]
    assert l3[0] == l1[0] and l3 == pytest.approx(l1, rel=1e-2) and l3 != l2


@pytest.mark.slow
def test_non_finite_loss_on_two_ranks_stops_both_before_the_update(tmp_path):
    """The gradient reductions are launched before the step's flags are read: a NaN step must drain them
    on every rank (no hang) and exit 3 with the last checkpoint intact."""
    run = torchrun(tmp_path, 2, *SYNTH, "--model-tag", "nan2", "--save-every", "2", NANOCHAT_TEST_NAN_STEP="2")
    out, _ = run.communicate(timeout=300)
    assert run.returncode != 0, out  # torchrun itself exits 1 when its workers fail
    # EXIT_NONFINITE (torchrun may stop the slower rank itself once the first has exited)
    assert "exitcode  : 3" in out, out
    assert "loss is nan at step 2; no update was applied" in out
    from nanochat.checkpoint_manager import list_steps

    assert list_steps(run_dir(tmp_path, "nan2")) == [2]


@pytest.mark.slow
def test_two_node_launch_trains_checkpoints_and_resumes_on_another_world_size(env_base):
    port = free_port()
    flags = [*TINY, "--num-iterations", "3", "--save-every", "2", "--eval-every", "3", "--model-tag", "nodes"]
    nodes = [torchrun(env_base, 1, *flags, nnodes=2, node_rank=r, port=port) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out
    assert "x 2 ranks x 1 accumulation" in outs[0]
    d = run_dir(env_base, "nodes")
    from nanochat.checkpoint_manager import list_steps, load_meta

    assert list_steps(d) == [2, 3]
    assert (d / "optim_000003_rank0.pt").exists() and (d / "optim_000003_rank1.pt").exists()
    meta = load_meta(d, 3)
    assert meta["world_size"] == 2 and len(meta["dataloader_state"]) == 2 and meta["val_bpb"] > 0
    # two ranks resume from step 2 (per-rank optimizer shards and data positions) and redo step 3 exactly
    before = read_metrics(env_base, "nodes")
    again = torchrun(env_base, 2, *flags, "--resume-from-step", "2")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    after = read_metrics(env_base, "nodes")
    assert [r["step"] for r in after] == [1, 2, 3]
    assert after[2]["raw_loss"] == before[2]["raw_loss"] and after[2]["val_bpb"] == before[2]["val_bpb"]
    # elastic: one process (2 accumulation steps, the optimizer state re-sharded) takes over the 2-rank
    # checkpoint and redoes step 3 with the same loss, up to fp32 summation order
    assert train_inprocess(*flags, "--resume-from-step", "2") == 0
    one = read_metrics(env_base, "nodes")
    assert [r["step"] for r in one] == [1, 2, 3]
    assert one[2]["raw_loss"] == pytest.approx(before[2]["raw_loss"], rel=1e-5)
    assert one[2]["val_bpb"] == pytest.approx(before[2]["val_bpb"], rel=1e-5)


def wait_for_record(base: Path, tag: str, step: int, timeout: float = 120) -> None:
    """Until rank 0 has written step `step`'s metrics record (it follows the step's checkpoint)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir(base, tag) / "metrics.jsonl").exists() and any(r["step"] == step for r in read_metrics(base, tag)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no metrics record of step {step} in {tag} after {timeout} s")


@pytest.mark.slow
def test_real_data_steps_match_on_1_2_4_ranks_and_a_run_killed_on_4_continues_on_2_then_1(env_base):
    """Logical streams on the real loader: 1 process x accumulation 4, 2 x 2 and 4 x 1 train every step on
    the same rows (same losses up to fp32 summation order); a 4-rank run killed after its step-2 checkpoint,
    resumed on 2 ranks, killed after step 3, and finished on 1 process reproduces the uninterrupted losses."""
    flags = [*TINY, "--device-batch-size", "2", "--num-iterations", "4"]  # 8 rows per step: L = 8 streams
    assert train_inprocess(*flags, "--model-tag", "s1") == 0
    want = [r["raw_loss"] for r in read_metrics(env_base, "s1")]
    assert len(want) == 4 and want[0] != want[-1]
    two = torchrun(env_base, 2, *flags, "--model-tag", "s2")
    out, _ = two.communicate(timeout=300)
    assert two.returncode == 0 and "x 2 ranks x 2 accumulation" in out, out
    assert "data: 8 logical streams, 4 per rank" in out
    assert [r["raw_loss"] for r in read_metrics(env_base, "s2")] == pytest.approx(want, rel=1e-5)
    # 4 ranks, killed (every process at once) during step 3, after the step-2 checkpoint
    four = torchrun(env_base, 4, *flags, "--model-tag", "elastic", "--save-every", "2",
                    NANOCHAT_TEST_HANG_STEP=2)
    wait_for_line(four, "hanging at step 2", timeout=300)
    wait_for_record(env_base, "elastic", 2)  # another rank may hang before rank 0 has written step 2's record
    kill_all(four)
    from nanochat.checkpoint_manager import list_steps, load_meta

    d = run_dir(env_base, "elastic")
    assert list_steps(d) == [2] and len(load_meta(d, 2)["dataloader_state"]) == 4
    # on 2 ranks from step 2: step 3, saved, then killed during step 4
    resumed = torchrun(env_base, 2, *flags, "--model-tag", "elastic", "--save-every", "1", "--resume", "latest",
                       NANOCHAT_TEST_HANG_STEP=3)
    seen = wait_for_line(resumed, "hanging at step 3", timeout=300)
    wait_for_record(env_base, "elastic", 3)
    kill_all(resumed)
    assert "resumed from" in seen and "it was written by 4" in seen
    assert list_steps(d) == [2, 3]
    # on 1 process from step 3
    assert train_inprocess(*flags, "--model-tag", "elastic", "--resume", "latest") == 0
    got = read_metrics(env_base, "elastic")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["raw_loss"] for r in got] == pytest.approx(want, rel=1e-5)


def test_bf16_cpu_training_follows_fp32(env_base, capsys):
    # the bf16 CPU path (bf16 matmuls, bf16 Muon orthogonalisation, fp32 master weights and loss) against
    # the fp32 run of the same seed: the same losses to bf16 accuracy, and the run records its dtype
    assert train_inprocess(*TINY, "--num-iterations", "6", "--model-tag", "f32", "--dtype", "float32") == 0
    assert train_inprocess(*TINY, "--num-iterations", "6", "--model-tag", "b16", "--dtype", "bfloat16") == 0
    f32 = [r["raw_loss"] for r in read_metrics(env_base, "f32") if "raw_loss" in r]
    b16 = [r["raw_loss"] for r in read_metrics(env_base, "b16") if "raw_loss" in r]
    assert len(f32) == len(b16) == 6 and f32[-1] < f32[0]
    assert b16 == pytest.approx(f32, rel=0.02)
    run = json.loads((run_dir(env_base, "b16") / "run.json").read_text())
    assert run["env"]["dtype"] == "bfloat16"
    from nanochat.checkpoint_manager import load_checkpoint

    model_state, optim_state, _ = load_checkpoint(run_dir(env_base, "b16"), 6, device="cpu", load_optimizer=True)
    assert all(v.dtype == torch.float32 for v in model_state.values() if v.is_floating_point())  # fp32 masters
    muon = [g for g in optim_state["param_groups"] if g.get("kind", g.get("type")) == "muon" or "orth_dtype" in g]
    assert muon and all("bfloat16" in str(g["orth_dtype"]) for g in muon)


def test_failed_final_evaluation_keeps_the_trained_model(env_base, monkeypatch, capsys):
    """The final checkpoint is written before the final evaluations; an evaluation that raises is reported
    (exit code 5, its error named) and the trained model, its metrics and the other evaluations survive."""
    import nanochat.train_loop as tl
    from nanochat.checkpoint_manager import list_steps, load_meta

    def broken(*args, **kwargs):
        raise RuntimeError("validation shard is truncated")

    monkeypatch.setattr(tl, "evaluate_val", broken)
    rc = train_inprocess(*TINY, "--num-iterations", "4", "--eval-every", "-1", "--model-tag", "evalfail")
    out = capsys.readouterr().out
    assert rc == tl.EXIT_EVAL
    assert "val bpb evaluation failed: RuntimeError: validation shard is truncated" in out
    assert list_steps(run_dir(env_base, "evalfail")) == [4]
    assert load_meta(run_dir(env_base, "evalfail"), 4)["loop_state"]["step"] == 4
    assert [r["step"] for r in read_metrics(env_base, "evalfail")] == [1, 2, 3, 4]


def test_final_evaluation_results_reach_the_checkpoint_meta(env_base):
    """Saved first, evaluated second: the meta of the final step still carries that step's val bpb."""
    from nanochat.checkpoint_manager import load_meta

    assert train_inprocess(*TINY, "--num-iterations", "3", "--eval-every", "-1", "--model-tag", "evalmeta") == 0
    meta = load_meta(run_dir(env_base, "evalmeta"), 3)
    last = read_metrics(env_base, "evalmeta")[-1]
    assert meta["val_bpb"] == last["val_bpb"] and meta["loop_state"]["val_bpb"] == last["val_bpb"]
    assert meta["loop_state"]["best_val_bpb"] == last["val_bpb"]
