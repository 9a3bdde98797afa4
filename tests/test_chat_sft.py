"""SFT end to end on CPU: it lowers the masked val loss, short rows finish the epoch, exact resume, errors."""

import json
import shutil

import pytest
import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat.chat_sft import SFTConfig, run_sft
from nanochat.sizing import sft_lr_multiplier as lr_multiplier
from nanochat.sizing import sft_muon_momentum as muon_momentum
from nanochat.tasks import TaskDataError
from scripts import chat_sft as cli
from tests.chat_helpers import make_base_checkpoint


@pytest.fixture
def base(base_dir):
    try:
        make_base_checkpoint(base_dir)
    except TaskDataError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)
    return base_dir


def cfg(**kw):
    c = dict(mix="embedded", train_size=400, val_size=64, device_batch_size=8, max_seq_len=256, eval_every=-1,
             eval_steps=8, device_type="cpu", quiet=True)
    c.update(kw)
    return SFTConfig(**c)


def test_schedule_is_the_reference_one():
    assert lr_multiplier(0.0, 0.5, 0.0) == 1.0 and lr_multiplier(0.49, 0.5, 0.0) == 1.0
    assert lr_multiplier(0.75, 0.5, 0.0) == pytest.approx(0.5) and lr_multiplier(1.0, 0.5, 0.0) == 0.0
    assert lr_multiplier(1.0, 0.5, 0.1) == pytest.approx(0.1)
    assert muon_momentum(0) == 0.85 and muon_momentum(150) == pytest.approx(0.90) and muon_momentum(1000) == 0.95


@pytest.mark.slow
def test_sft_lowers_masked_val_loss_by_a_nat(base):
    import time

    t0 = time.time()
    assert run_sft(cfg()) == 0
    assert time.time() - t0 < 60
    out = rd.run_dir("sft", "d2")
    records = rd.read_metrics(out)
    meta = ckpt.load_meta(out, ckpt.find_last_step(out))
    start, end = meta["sft_evals"]["val_loss_start"], records[-1]["val_loss"]
    assert start - end >= 1.0, (start, end)
    assert all(r["lr"] <= 1.0 for r in records) and records[-1]["lr"] < 0.2  # warmed down
    assert records[-1]["progress"] >= 1.0 and len(records) == records[-1]["step"]
    run = rd.read_run_json(out)
    assert run["source"]["phase"] == "base" and run["sizing"]["matrix_lr"] == pytest.approx(0.8 * 0.02)
    model, _, _ = ckpt.load_model("sft", "cpu")  # the next phase can load it
    assert model.config.n_layer == 2


@pytest.mark.slow
def test_short_rows_finish_the_epoch_with_finite_losses(base):
    assert run_sft(cfg(max_seq_len=24, train_size=200, eval_every=0, chatcore_every=-1,
                       chatcore_tasks="EmbeddedChat", chatcore_max_problems=4)) == 0
    records = rd.read_metrics(rd.run_dir("sft", "d2"))
    assert records and all(torch.isfinite(torch.tensor(r["raw_loss"])) for r in records)
    assert records[-1]["progress"] >= 1.0
    # the in-training chat eval ran on the last step (EmbeddedChat is not one of ChatCORE's five tasks)
    assert "EmbeddedChat" in records[-1]["chat_accuracy"] and records[-1]["chatcore"] is None


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(base):
    common = dict(num_iterations=10, train_size=120, eval_every=0)
    assert run_sft(cfg(model_tag="full", save_every=4, **common)) == 0
    full = rd.run_dir("sft", "full")
    part = rd.run_dir("sft", "part")
    part.mkdir(parents=True)
    for f in full.iterdir():  # the run as it stood after step 4 (a kill after that checkpoint)
        if "000004" in f.name:
            shutil.copy(f, part / f.name)
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rd.read_metrics(full) if r["step"] <= 4))
    assert run_sft(cfg(model_tag="part", resume_from_step="latest", **common)) == 0
    a, b = rd.read_metrics(full), rd.read_metrics(part)
    assert [r["step"] for r in b] == list(range(1, 11))
    assert [r["raw_loss"] for r in a] == [r["raw_loss"] for r in b]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa, _, _ = ckpt.load_checkpoint(full, 10)
    wb, _, _ = ckpt.load_checkpoint(part, 10)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_configs_are_one_line_errors(base, capsys):
    assert cli.main(["--mix", "embedded", "--max-seq-len", "4096", "--device-type", "cpu"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert cli.main(["--mix", "nope", "--device-type", "cpu"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["--mix", "embedded", "--source-tag", "d9", "--device-type", "cpu"]) == 2
    assert "d9" in capsys.readouterr().err
    assert cli.main(["--mix", "embedded", "--resume", "latest", "--device-type", "cpu"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_under_torchrun_then_eval_on_two_ranks_equals_one(base):
    import os
    import subprocess
    import sys

    from tests.helpers import free_port

    repo = str(rd.__file__).rsplit("/nanochat/", 1)[0]
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1")

    def torchrun(*args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master-addr=127.0.0.1", f"--master-port={free_port()}", *args],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)

    out = torchrun("scripts/chat_sft.py", "--mix", "embedded", "--train-size", "96", "--val-size", "32",
                   "--device-batch-size", "4", "--max-seq-len", "128", "--eval-every", "-1", "--eval-steps", "2",
                   "--device-type", "cpu")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    folder = rd.run_dir("sft", "d2")
    step = ckpt.find_last_step(folder)
    assert (folder / f"optim_{step:06d}_rank1.pt").exists() and ckpt.load_meta(folder, step)["world_size"] == 2
    records = rd.read_metrics(folder)
    assert records[-1]["progress"] >= 1.0 and "val_loss" in records[-1]

    two = torchrun("scripts/chat_eval.py", "--source", "sft", "-a", "EmbeddedChat", "-x", "6", "-m", "6",
                   "--output", str(base / "two.json"), "--device-type", "cpu")
    assert two.returncode == 0, two.stderr[-2000:]
    from scripts import chat_eval

    assert chat_eval.main(["--source", "sft", "-a", "EmbeddedChat", "-x", "6", "-m", "6", "--output",
                           str(base / "one.json"), "--device-type", "cpu"]) == 0
    r1 = json.loads((base / "one.json").read_text())["tasks"]["EmbeddedChat"]
    r2 = json.loads((base / "two.json").read_text())["tasks"]["EmbeddedChat"]
    assert (r1["n"], r1["accuracy"]) == (r2["n"], r2["accuracy"]) == (6, r1["accuracy"])


def test_nonfinite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(base, monkeypatch, capsys):
    monkeypatch.setenv("NANOCHAT_TEST_NAN_STEP", "3")
    assert run_sft(cfg(quiet=False, num_iterations=6, save_every=2, train_size=64, eval_every=0)) == 3
    out = rd.run_dir("sft", "d2")
    assert ckpt.list_steps(out) == [2] and "no update was applied" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_reproduces_the_losses(base):
    import os
    import signal
    import subprocess
    import sys

    common = dict(num_iterations=8, train_size=96, eval_every=0, save_every=3)
    assert run_sft(cfg(model_tag="whole", **common)) == 0
    repo = str(rd.__file__).rsplit("/nanochat/", 1)[0]
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", NANOCHAT_TEST_HANG_STEP="4")
    flags = ["--mix", "embedded", "--train-size", "96", "--val-size", "64", "--device-batch-size", "8",
             "--max-seq-len", "256", "--eval-every", "0", "--num-iterations", "8", "--save-every", "3",
             "--model-tag", "killed", "--device-type", "cpu"]
    proc = subprocess.Popen([sys.executable, "scripts/chat_sft.py", *flags], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # step 4 (0-based) hangs after backward, before its update
        if "hanging at step 4" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed = rd.run_dir("sft", "killed")
    assert ckpt.list_steps(killed) == [3]
    assert run_sft(cfg(model_tag="killed", resume_from_step="latest", **common)) == 0
    a, b = rd.read_metrics(rd.run_dir("sft", "whole")), rd.read_metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["raw_loss"] for r in a] == [r["raw_loss"] for r in b]


def test_one_writer_per_run_folder_and_no_fresh_run_over_checkpoints(base, capsys):
    """SFT takes its run folder the way pretraining does (training.open_run_folder): a folder another process
    holds is refused naming the holder, and a fresh run over existing checkpoints is refused."""
    holder = rd.RunLock(rd.run_dir("sft", "held"), what="another chat_sft").acquire()
    try:
        assert run_sft(cfg(model_tag="held", num_iterations=1)) == 2
        err = capsys.readouterr().err
        assert "is in use by process" in err and "another chat_sft" in err
    finally:
        holder.release()
    assert run_sft(cfg(model_tag="held", num_iterations=2, train_size=32, eval_every=0)) == 0
    assert run_sft(cfg(model_tag="held", num_iterations=2, train_size=32, eval_every=0)) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run_sft(cfg(model_tag="held", num_iterations=3, train_size=32, eval_every=0, resume_from_step="auto")) == 0


@pytest.mark.slow
def test_sft_run_record_reaches_the_model_card_and_the_doctor(base, tmp_path):
    """SFT writes the run record every phase writes (flags under "args", a FinetunePlan as "sizing", its source):
    the doctor's run-folder reader sees the flags, and an export's model card shows the SFT figures and the
    pretraining run's, not "n/a"."""
    from nanochat.diagnose import load_run
    from nanochat.sizing import BASE_LRS
    from scripts import export_hf

    base_run = rd.run_dir("base", "d2")  # what base training records (a real one is tests/test_base_train.py's)
    rd.write_run_record(base_run, phase="base", args={"depth": 2}, model_config={}, env={},
                        sizing={"total_tokens": 123_456, **{k: 2 * v for k, v in BASE_LRS.items()}})
    (base_run / "metrics.jsonl").write_text(json.dumps({"step": 0, "tokens": 123_456, "flops": 7.5e12,
                                                        "val_bpb": 2.3456, "core": 0.0123}) + "\n")
    assert run_sft(cfg(num_iterations=3, eval_every=-1, init_lr_frac=0.5)) == 0
    folder = rd.run_dir("sft", "d2")
    record = rd.read_run_json(folder)
    assert record["phase"] == "sft" and record["args"]["mix"] == "embedded"
    assert record["source"] == {"phase": "base", "tag": "d2", "step": 0}
    assert record["sizing"]["base_lrs"] == {k: 2 * v for k, v in BASE_LRS.items()}  # the base run's, not defaults
    assert record["sizing"]["matrix_lr"] == pytest.approx(2 * BASE_LRS["matrix_lr"] * 0.5)
    meta = ckpt.load_meta(folder, 3)
    assert meta["args"] == record["args"] and meta["sizing"] == record["sizing"] and meta["phase"] == "sft"

    run = load_run(folder)  # the doctor
    assert run.args["mix"] == "embedded" and run.args["num_iterations"] == 3 and run.sizing["grad_accum_steps"] == 1

    out = tmp_path / "hf"
    assert export_hf.main(["--source", "sft", "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    figures = card.split("## Training and evaluation")[1].split("## Tokenizer")[0]
    last = rd.read_metrics(folder)[-1]
    assert "Started from the base run `d2`, step 0" in figures
    assert "- training tokens: 123,456" in figures and "- validation bits per byte: 2.3456" in figures
    assert "- CORE: 0.0123" in figures and "- training FLOPs: 7.500e+12" in figures
    assert "Fine-tuning (SFT), 3 steps" in figures and f"- tokens (slots per step x steps): {last['tokens']:,}" in figures
    assert f"- validation loss (nats per trained token): {meta['val_loss']:.4f}" in figures
    assert '"mix": "embedded"' in card.split("## Training flags")[1]


def test_older_sft_records_with_config_read_as_args(tmp_path):
    """An SFT run folder written before the one record (flags under "config", resumed_from at the top): the
    record reader and the doctor see it as a current one."""
    from nanochat.diagnose import load_run

    (tmp_path / "run.json").write_text(json.dumps({"config": {"mix": "embedded"}, "resumed_from": 4, "sizing": {}}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    record = rd.read_run_json(tmp_path)
    assert record["args"] == {"mix": "embedded"} and record["env"]["resumed_from"] == 4
    assert load_run(tmp_path).args == {"mix": "embedded"}
