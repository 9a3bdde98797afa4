"""The run doctor on the logs people have (issue 28): each format, written as its program writes it
(tests/run_log_writers.py), gives the findings it must, and the issue's cases stay fixed."""

import math
import re

import numpy as np
import pytest

from nanochat import diagnose as dg
from nanochat.run_formats import detect
from tests import run_log_writers as w


def findings(path, **kw):
    run = dg.load_run(path, tokens_per_step=kw.pop("tokens_per_step", None))
    return run, {f.check: f for f in dg.diagnose(run, **kw)}


def test_hf_trainer_folder(tmp_path):
    """GPT-2 small's config, HF's default dropout 0.1, window-mean losses, tokens from num_input_tokens_seen."""
    pytest.importorskip("transformers")
    out = w.write_hf_trainer(tmp_path / "gpt2-124M-run")
    assert detect(out).name == "hf-trainer"
    run, f = findings(out)
    assert run.knows.loss_smoothing.kind == "window" and run.knows.loss_smoothing.window == 10
    pc = f["param_count"]
    assert pc.status == "ok" and pc.numbers["recomputed_total"] == 124_439_808  # HF GPT-2 small, biases and wpe
    t = f["tokens_ratio"].numbers
    assert t["param_count"] == "total" and t["tokens_per_total_param_now"] == pytest.approx(600 * 65536 / 124_439_808)
    assert f["val_vs_train"].numbers["dropout"] == pytest.approx(0.1)
    lc = f["loss_curve"]
    assert lc.status in ("ok", "warn", "info") and "mean of the last 10 steps" in lc.summary
    assert lc.numbers["loss_at_2x"] < lc.numbers["loss_at_planned"]
    # the fit recovers the curve the losses were drawn from (E + B D^-beta) at the planned end
    assert lc.numbers["loss_at_planned"] == pytest.approx(float(w.loss_at(600 * 65536)), rel=0.01)


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    logdir = w.write_tensorboard(tmp_path / "runs")
    assert detect(logdir).name == "tensorboard"
    run, f = findings(logdir)
    recs = {m["step"]: m for m in run.metrics}
    assert recs[100]["val_loss"] > 0 and recs[100]["tokens"] == 100 * 65536
    assert f["param_count"].status == "skip" and "scalars only" in f["param_count"].summary
    assert f["loss_curve"].numbers["loss_at_planned"] == pytest.approx(float(w.loss_at(600 * 65536)), rel=0.01)
    assert f["spikes"].status == "ok" and "10-step mean" in f["spikes"].summary


@pytest.mark.parametrize("trainer", ["megatron", "torchtitan"])
def test_tensorboard_tags_of_other_trainers(tmp_path, trainer):
    pytest.importorskip("tensorboard")
    logdir = w.write_tensorboard(tmp_path / trainer, trainer=trainer)
    run, f = findings(logdir, tokens_per_step=65536)  # neither writes tokens: given on the command line
    assert run.info["tags"]["loss"] == w.TB_TAGS[trainer][0] and run.knows.loss_smoothing is None
    assert len(run.series("raw_loss")[1]) == 60 and len(run.series("val_loss")[1]) == 6
    assert f["loss_curve"].numbers["loss_at_planned"] == pytest.approx(float(w.loss_at(600 * 65536)), rel=0.01)


def test_llmc_log(tmp_path):
    log = w.write_llmc(tmp_path / "train.log")
    assert detect(log).name == "llm.c"
    run, f = findings(log, gpu="a100")
    pc = f["param_count"]
    assert pc.status == "ok" and pc.numbers["recomputed_total"] == run.info["printed_params"]
    # llm.c's MFU is of its own peak for the device (989.4 TFLOP/s): on an A100 it is re-based
    assert f["mfu"].numbers["median_mfu"] == pytest.approx(0.40 * 989.4 / 312, rel=0.03)
    assert f["val_vs_train"].status == "ok"
    assert math.isfinite(f["loss_curve"].numbers["loss_at_10x"])
    # the step line of earlier train_gpt2.cu versions: `| train loss %7.6f | norm %6.4f |`, no z-scores
    old = tmp_path / "old.log"
    old.write_text(re.sub(r"\| loss ([\d.]+) \(\+0\.00z\)\| norm ([\d.]+) \(\+0\.00z\)\|", r"| train loss \1 | norm \2 |",
                          log.read_text()))
    assert "| train loss " in old.read_text() and detect(old).name == "llm.c"
    assert dg.load_run(old).series("raw_loss")[1] == pytest.approx(run.series("raw_loss")[1])


def test_modded_nanogpt_log(tmp_path):
    log = w.write_modded_nanogpt(tmp_path / "run.txt")
    assert detect(log).name == "modded-nanogpt"
    run, f = findings(log)
    assert run.sizing["tokens_per_step"] == 8 * 64 * 1024
    assert f["val_vs_train"].status == "ok" and f["loss_curve"].status != "skip"
    new = w.write_modded_nanogpt(tmp_path / "new.txt", with_train_loss=False, val_every=10)
    run, f = findings(new)
    assert "val_loss" in f["loss_curve"].summary or "validation" in f["loss_curve"].numbers.get("loss_from", "")


def test_our_console_output_is_accepted(tmp_path):
    """Issue 28: this project's base_train output saved to a file was refused."""
    log = w.write_nanochat_console(tmp_path / "base_train.log")
    assert detect(log).name == "nanochat-console"
    run, f = findings(log)
    assert run.sizing["tokens_per_step"] == 2**16 and run.sizing["warmup_steps"] == 40
    t = f["tokens_ratio"].numbers
    assert t["param_count"] == "scaling" and t["tokens_per_scaling_param_planned"] == pytest.approx(400 * 2**16 / 25e6)
    assert f["mfu"].numbers["gpu"] == "RTX 4090" and f["mfu"].numbers["median_mfu"] == pytest.approx(0.45, rel=0.02)
    assert f["schedule"].status == "ok" and f["spikes"].status == "ok"
    assert "warmdown" in f["loss_curve"].summary


def test_our_sft_console_output_knows_its_phase(tmp_path):
    log = w.write_sft_console(tmp_path / "sft.log")
    assert detect(log).name == "nanochat-console"
    run, f = findings(log)
    assert run.knows.phase == "sft" and f["val_vs_train"].status == "warn" and "SFT" in f["val_vs_train"].summary
    assert f["loss_curve"].status == "skip" and f["tokens_ratio"].status == "skip"


def test_smoothed_karpathy_log_is_fitted_at_its_lag(tmp_path):
    """Issue 28: a karpathy/nanochat log whose lines are thinned cannot be inverted; the doctor dropped it all.
    Now the debiased EMA is fitted at its known lag, the spike check alone is skipped (saying why), and the
    prediction at the planned end, 2x and 10x comes with intervals. The grad-norm field of some versions
    sits between loss and lrm."""
    log = w.write_karpathy_nanochat(tmp_path / "base.log", every=7)
    run, f = findings(log)
    assert not run.series("raw_loss")[1].size and len(run.series("loss")[1]) > 250
    assert f["spikes"].status == "skip" and "exponential moving average" in f["spikes"].summary
    lc = f["loss_curve"]
    assert lc.status != "skip" and "read at its mean lag" in lc.summary
    iv = lc.numbers["intervals"]
    for k in ("loss_at_planned", "loss_at_2x", "loss_at_10x"):
        lo, hi = iv[k]
        assert lo <= lc.numbers[k] <= hi
    # the lag matters: the EMA sits above the curve while the loss falls; read at its lag it fits the truth
    D = 2000 * 524288
    assert lc.numbers["loss_at_planned"] == pytest.approx(float(w.loss_at(D)), rel=0.01)
    # on a short run, where the loss falls fast, the lag decides: the interval holds the truth only when the
    # smoothed loss is read at its lag
    short = w.write_karpathy_nanochat(tmp_path / "short.log", n_steps=400, every=3)
    truth = float(w.loss_at(400 * 524288))
    run = dg.load_run(short)
    lo, hi = dg.check_loss_curve(run).numbers["intervals"]["loss_at_planned"]
    assert lo <= truth <= hi
    run.knows.loss_smoothing = None  # as if the EMA were the step loss
    lo, hi = dg.check_loss_curve(run).numbers["intervals"]["loss_at_planned"]
    assert truth < lo
    # the complete log is inverted into step losses and gets the spike check
    full = w.write_karpathy_nanochat(tmp_path / "full.log", n_steps=600)
    run, f = findings(full)
    assert run.series("raw_loss")[1].size == 600 and f["spikes"].status == "ok"


def test_nanogpt_125m_comment_names_the_width(tmp_path):
    """Issue 28: "~125M" with n_layer 12, n_head 12, n_embd 384: the finding leads with n_embd=768 (GPT-2 small)."""
    cfg = tmp_path / "train_small.py"
    cfg.write_text("# ~125M parameters\nn_layer = 12\nn_head = 12\nn_embd = 384\nmax_iters = 100\nlr_decay_iters = 100\n"
                   "warmup_iters = 10\nbatch_size = 8\ngradient_accumulation_steps = 1\nblock_size = 1024\n")
    log = tmp_path / "train.log"
    log.write_text("tokens per iteration will be: 8,192\ndefaulting to vocab_size of GPT-2 to 50304 (50257 rounded up "
                   "for efficiency)\nnumber of parameters: 29.94M\n"
                   + "".join(f"iter {i}: loss {4 - i / 100:.4f}, time 100.00ms, mfu 10.00%\n" for i in range(100)))
    run = dg.load_run(log, config=cfg)
    pc = dg.check_param_count(run)
    assert pc.status == "warn"
    assert pc.numbers["claim_explained_by"][0]["changes"] == {"n_embd": 768}
    assert pc.advice.index("n_embd=768") < len(pc.advice) and "GPT-2 small" in pc.advice
    assert "269176" not in pc.advice and "n_layer=59" not in pc.advice


def test_sft_gap_is_judged_as_fine_tuning(tmp_path):
    """Issue 28: an SFT run with val 1.1626 vs train 0.8880 (+31%) was marked ok."""
    run = dg.load_run(w.write_sft_run(tmp_path / "chatsft_checkpoints" / "d12", 1.1626 / 0.8880 - 1))
    assert run.knows.phase == "sft" and run.args == {"num_epochs": 3}  # flags read under "config" too
    f = dg.check_val_vs_train(run)
    assert f.status == "warn" and "SFT" in f.summary and "fewer epochs" in f.advice
    assert f.numbers["relative_gap"] == pytest.approx(0.309, abs=0.01)
    ok = dg.check_val_vs_train(dg.load_run(w.write_sft_run(tmp_path / "b" / "chatsft_checkpoints" / "d12", 0.08)))
    assert ok.status == "ok"  # +8% is the ordinary fine-tuning gap


def test_base_run_above_its_threshold_warns_with_pretraining_words(tmp_path):
    """The same +8% that is ordinary in fine-tuning is a warning in single-epoch pretraining."""
    d = w.write_sft_run(tmp_path / "base_checkpoints" / "d12", 0.08)
    run = dg.load_run(d)
    assert run.knows.phase == "base"  # the phase folder it sits in decides
    f = dg.check_val_vs_train(run)
    assert f.status == "warn" and "single-epoch pretraining" in f.summary


def test_smoothing_lag_matches_its_definition():
    from nanochat.run_formats import Smoothing

    ema, win = Smoothing("ema", beta=0.9), Smoothing("window", window=10)
    for t in (1, 2, 7, 50, 400):
        wts = 0.1 * 0.9 ** np.arange(t)  # the debiased EMA after t steps: weight on the loss k steps back
        assert ema.lag(np.array([t]))[0] == pytest.approx(float((wts * np.arange(t)).sum() / wts.sum()))
        m = min(t, 10)
        assert win.lag(np.array([t]))[0] == pytest.approx(np.arange(m).mean())


@pytest.mark.slow
def test_a_real_hf_trainer_run_reads_back(tmp_path):
    """The real transformers Trainer (tiny GPT-2, 40 CPU steps, ~2 s) writes trainer_state.json, config.json
    and TensorBoard events; both readers get back what it logged, and the size from config.json is the
    model's own count."""
    pytest.importorskip("accelerate")
    pytest.importorskip("tensorboard")
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n):
            self.x = torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=40, logging_steps=2, eval_strategy="steps",
                             eval_steps=10, per_device_train_batch_size=4, report_to=["tensorboard"], save_steps=40,
                             include_num_input_tokens_seen="all", use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=Tokens(200), eval_dataset=Tokens(16)).train()
    run = dg.load_run(tmp_path / "out")
    assert run.source == "hf-trainer" and run.sizing["tokens_per_step"] == 4 * 32
    assert run.info["counts"]["total"] == model.num_parameters()  # tied head counted once, wpe and biases in
    assert run.knows.loss_smoothing.window == 2
    assert {m["step"] for m in run.metrics if "val_loss" in m} == {10, 20, 30, 40}
    tb_dir = next((tmp_path / "out" / "runs").iterdir())
    tb = dg.load_run(tb_dir)
    assert tb.source == "tensorboard" and tb.info["tags"]["loss"] == "train/loss"
    by_step = {m["step"]: m for m in tb.metrics}
    for m in run.metrics:
        if "loss" in m:
            assert by_step[m["step"]]["loss"] == pytest.approx(m["loss"], rel=1e-6)  # the same numbers, two files
    f = {x.check: x for x in dg.diagnose(run)}
    assert f["param_count"].status == "ok" and f["val_vs_train"].status in ("ok", "warn")


@pytest.mark.slow
def test_our_real_base_train_console_reads_like_its_run_folder(tmp_path, monkeypatch, capsys):
    """base_train itself (synthetic data, CPU, 12 steps): its console output saved to a file reads back
    the same losses, tokens and plan as the run folder it wrote."""
    import torch

    from scripts.base_train import main

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--synthetic-data", "--vocab-size", "256", "--depth", "2", "--aspect-ratio", "32", "--head-dim",
                     "32", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "128",
                     "--num-iterations", "12", "--warmup-steps", "2", "--weight-decay", "0", "--model-tag", "c"]) == 0
    finally:
        torch.set_num_threads(threads)
    log = tmp_path / "base_train.log"
    log.write_text(capsys.readouterr().out)
    console, folder = dg.load_run(log), dg.load_run(tmp_path / "base_checkpoints" / "c")
    assert console.source == "nanochat-console" and folder.source == "nanochat"
    for key in ("num_params", "scaling_params", "tokens_per_step", "num_iterations", "warmup_steps"):
        assert console.sizing[key] == folder.sizing[key], key
    assert console.sizing["warmdown_ratio"] == pytest.approx(folder.sizing["warmdown_ratio"])
    c_steps, c_raw = console.series("raw_loss")
    f_steps, f_raw = folder.series("raw_loss")
    assert list(c_steps) == list(f_steps) and c_raw == pytest.approx(f_raw, abs=6e-5)  # printed to 4 decimals
    assert console.series("tokens")[1] == pytest.approx(folder.series("tokens")[1])
    assert console.series("lr")[1] == pytest.approx(folder.series("lr")[1], abs=6e-4)
