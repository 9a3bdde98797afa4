"""The run doctor: every check fires on a run crafted to have its problem and stays quiet on a healthy one."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nanochat import diagnose as dg
from nanochat.doctor.loss import find_spikes
from nanochat.doctor.size import compute_equivalent
from nanochat.scaling import annealing_area
from nanochat.sizing import count_params, lr_multiplier, model_config

REPO = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"
BYTES_PER_TOKEN = 4.2
WARMDOWN_C = 2e-4  # annealing coefficient of the synthetic runs (a ~0.03-nat warmdown gain at 460 steps)


def make_run(root: Path, name="d4", *, n_iter=460, tokens_per_step=2**18, params_scale=1.0, mfu=0.45, device=H100,
             val_ratio=1.01, spikes=(), plateau=False, lr_fn=None, stop_at=None, tag=None, dropout=None, seed=0,
             warmdown_c=None):
    """Write a synthetic run folder as base_train does (step = steps done, MFU in percent): loss =
    2 + 40 D^-0.25 with 0.5% noise, the sizing schedule, evals every 50 steps (val loss `val_ratio` x
    train loss, logged as bpb), H100 MFU."""
    cfg = model_config(4, max_seq_len=256)
    counts = count_params(cfg)
    warm, wd, final = 40, 0.65, 0.05
    run_dir = root / name
    run_dir.mkdir(parents=True)
    info = {"args": {"depth": 4, "model_tag": tag or name, "max_seq_len": 256, **({"dropout": dropout} if dropout else {})},
            "model_config": {**cfg.__dict__},
            "sizing": {"num_params": int(counts["total"] * params_scale), "scaling_params": int(counts["scaling"] * params_scale),
                       "embedding_params": counts["embedding"], "tokens_per_step": tokens_per_step,
                       "num_iterations": n_iter, "total_tokens": n_iter * tokens_per_step, "warmup_steps": warm,
                       "warmdown_ratio": wd, "final_lr_frac": final, "bytes_per_token": BYTES_PER_TOKEN},
            "env": {"device_name": device, "peak_flops": None if device.startswith("cpu") else 989e12, "dtype": "bfloat16"}}
    (run_dir / "run.json").write_text(json.dumps(info))
    rng = np.random.default_rng(seed)
    lines = []
    last = n_iter if stop_at is None else stop_at
    # the loss of Tissue et al. 2024: a power law in the LR-weighted tokens S1 minus C x the annealing area S2
    sched = np.array([lr_multiplier(s, n_iter, warm, wd, final) for s in range(n_iter + 1)])
    s1 = np.concatenate([[0.0], np.cumsum(sched)]) * tokens_per_step
    s2 = annealing_area(sched)
    for s in range(last):
        D = (s + 1) * tokens_per_step
        clean = 3.05 if plateau and s > 60 else 2 + 40 * s1[s + 1] ** -0.25 - (WARMDOWN_C if warmdown_c is None else warmdown_c) * s2[min(s + 1, n_iter)]
        raw = clean * (1 + 0.005 * rng.standard_normal())
        if s in spikes:
            raw *= 1.3
        lr = lr_fn(s) if lr_fn else lr_multiplier(s, n_iter, warm, wd, final)
        m = dict(step=s + 1, loss=raw, raw_loss=raw, lr=lr, dt=0.5, tok_per_sec=tokens_per_step / 0.5,
                 mfu=None if device.startswith("cpu") else mfu * (1 + 0.01 * rng.standard_normal()),
                 tokens=D, flops=6.0 * counts["scaling"] * D, peak_mem_mb=1000)
        if s % 50 == 49 or s == n_iter - 1:
            m["val_bpb"] = clean * val_ratio / (math.log(2) * BYTES_PER_TOKEN)
        lines.append(json.dumps(m))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def findings(run_dir) -> dict:
    return {f.check: f for f in dg.diagnose(dg.load_run(run_dir))}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return findings(make_run(tmp_path_factory.mktemp("runs")))


def test_healthy_run_is_quiet(healthy):
    bad = {k: (f.status, f.summary) for k, f in healthy.items() if f.status not in ("ok",)}
    assert bad == {}
    # the numbers behind the verdicts are the ones we put in
    cfg = model_config(4, max_seq_len=256)
    assert healthy["param_count"].numbers["declared_total"] == count_params(cfg)["total"]
    assert healthy["mfu"].numbers["median_mfu"] == pytest.approx(0.45, rel=0.02)
    assert healthy["val_vs_train"].numbers["relative_gap"] == pytest.approx(0.01, abs=0.005)
    assert healthy["schedule"].numbers["phase"] == "warmdown"


def test_param_count_mismatch_fires(tmp_path):
    f = findings(make_run(tmp_path, params_scale=3.5))["param_count"]  # run.json records 3.5x the model
    assert f.status == "warn" and "3.50x" in f.summary
    assert f.numbers["instantiated_total"] == f.numbers["declared_total"]  # GPT on meta == closed form
    # a config edited away from what --depth implies (n_embd 256 -> 512): the depth dial disagrees
    run_dir = make_run(tmp_path, name="typo")
    info = json.loads((run_dir / "run.json").read_text())
    info["model_config"].update(n_embd=512, n_head=4, n_kv_head=4)
    (run_dir / "run.json").write_text(json.dumps(info))
    f = findings(run_dir)["param_count"]
    assert f.status == "warn" and "--depth=4 implies" in f.summary
    # a tag that declares a size far from what was built
    f = findings(make_run(tmp_path, name="gpt-124m"))["param_count"]
    assert f.status == "warn" and f.numbers["tag_declared"] == 124e6


def test_tokens_ratio_fires_past_chinchilla(tmp_path):
    # 45x past the compute-optimal ratio: ~10.5 * 45 tokens per scaling parameter
    n_scaling = count_params(model_config(4, max_seq_len=256))["scaling"]
    steps = round(10.5 * 45 * n_scaling / 2**24)
    f = findings(make_run(tmp_path, n_iter=steps, tokens_per_step=2**24))["tokens_ratio"]
    assert f.status == "warn"
    assert f.numbers["multiple_of_optimal"] == pytest.approx(45, rel=0.01)
    # the compute-optimal model for the same FLOPs is sqrt(45) ~ 6.7x larger
    assert f.numbers["optimal_params"] == pytest.approx(n_scaling * math.sqrt(45), rel=0.01)
    assert f.numbers["optimal_depth"] > 4
    # with a fitted law the optimum is the law's D*/N* at this run's compute
    from nanochat.scaling import LossLaw

    law = LossLaw(E=1.0, A=100.0, B=100.0, alpha=0.3, beta=0.3, param_count="scaling")  # symmetric: D* = N*
    f = {x.check: x for x in dg.diagnose(dg.load_run(tmp_path / "d4"), law=law)}["tokens_ratio"]
    assert f.numbers["optimal_tokens_per_param"] == pytest.approx(1.0)
    assert f.numbers["multiple_of_optimal"] == pytest.approx(10.5 * 45, rel=0.01)


def test_low_mfu_fires_and_cpu_skips(tmp_path):
    assert findings(make_run(tmp_path, mfu=0.12))["mfu"].status == "warn"
    f = findings(make_run(tmp_path, name="cpu", device="cpu: Intel Xeon"))["mfu"]
    assert f.status == "skip" and "CPU" in f.summary


def test_val_below_train_fires(tmp_path):
    f = findings(make_run(tmp_path, val_ratio=0.9))["val_vs_train"]
    assert f.status == "warn"
    assert f.numbers["relative_gap"] == pytest.approx(-0.10, abs=0.01)
    assert findings(make_run(tmp_path, name="drop", dropout=0.1))["val_vs_train"].status == "warn"


def test_val_vs_train_follows_a_fast_falling_loss(tmp_path):
    """Early in a run the loss falls fast: the eval after update s must be compared with the training
    trend read at step s + 1, not with the mean of the last 20 (higher) training losses."""
    run_dir = make_run(tmp_path, n_iter=30)
    rng = np.random.default_rng(1)
    clean = lambda step: 5.0 + 4.0 * math.exp(-step / 12)  # noqa: E731
    lines = []
    for step in range(1, 31):  # the loss logged at `step` comes from the weights before update `step`
        raw = clean(step) * (1 + 0.003 * rng.standard_normal())
        m = dict(step=step, loss=raw, raw_loss=raw, lr=1.0, dt=0.1, tok_per_sec=1e4, mfu=None,
                 tokens=step * 1024, flops=step * 1e12, peak_mem_mb=100)
        if step in (15, 30):
            m["val_loss"] = clean(step + 1)  # weights after update `step`: those of step + 1
        lines.append(json.dumps(m))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    f = findings(run_dir)["val_vs_train"]
    assert f.status == "ok", f.summary
    assert f.numbers["val_from"] == "val_loss" and abs(f.numbers["relative_gap"]) < 0.01
    window_mean = np.mean([clean(s) for s in range(11, 31)])
    assert (clean(31) - window_mean) / window_mean < -0.02  # what the old window-mean comparison flagged


def test_spikes_fire(tmp_path):
    f = findings(make_run(tmp_path, spikes=(120, 121, 300)))["spikes"]
    assert f.status == "warn" and f.numbers["count"] == 2 and f.numbers["steps"] == [121, 301]


def test_find_spikes_matches_brute_force_definition():
    rng = np.random.default_rng(1)
    x = 3 - np.linspace(0, 1, 400) + 0.01 * rng.standard_normal(400)  # falling, noisy
    x[[50, 150, 151]] += 0.5
    x[300] += 0.03  # ~3 sigma-of-noise: not a spike at k=6
    expected = []
    for i in range(10, len(x)):  # the definition, one step at a time
        w = x[max(0, i - 50):i]
        med = np.median(w)
        mad = 1.4826 * np.median(np.abs(w - med))
        if x[i] > med + max(6 * mad, 0.02 * med):
            expected.append(i)
    assert find_spikes(x) == expected
    assert expected == [50, 150, 151]


def test_plateau_fires_and_predicts(tmp_path, healthy):
    f = findings(make_run(tmp_path, plateau=True))["loss_curve"]
    assert f.status == "warn" and f.summary.startswith("flattened")
    # healthy: the fit recovers the generating curve 2 + 40 D^-0.25 well enough to extrapolate
    n = healthy["loss_curve"].numbers
    planned = n["planned_tokens"]
    for mult, key in ((1, "loss_at_planned"), (2, "loss_at_2x"), (10, "loss_at_10x")):
        assert n[key] == pytest.approx(2 + 40 * (mult * planned) ** -0.25, rel=0.01)


def test_schedule_fires(tmp_path):
    f = findings(make_run(tmp_path, lr_fn=lambda s: 1.0))["schedule"]  # no warmup/warmdown applied
    assert f.status == "warn" and f.numbers["max_lr_deviation"] > 0.5
    f = findings(make_run(tmp_path, name="early", stop_at=100))["schedule"]
    assert f.status == "info" and f.numbers["phase"] == "constant LR"


def test_missing_files_tolerated(tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "run.json").unlink()
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9999, "loss": \n')  # a line cut short by a crash
    run = dg.load_run(run_dir)
    assert any("not a JSON object" in p for p in run.problems) and any("run.json" in p for p in run.problems)
    out = {f.check: f.status for f in dg.diagnose(run)}
    assert out["param_count"] == "skip" and out["spikes"] == "ok"
    with pytest.raises(FileNotFoundError, match="run folder"):
        dg.load_run(tmp_path / "nope")


def test_run_summary_row(tmp_path):
    row = dg.run_summary(dg.load_run(make_run(tmp_path)))
    counts = count_params(model_config(4, max_seq_len=256))
    assert row["scaling_params"] == counts["scaling"] and row["total_params"] == counts["total"]
    assert row["tokens"] == 460 * 2**18 and row["complete"] and row["depth"] == 4
    sched = np.array([lr_multiplier(s, 460, 40, 0.65, 0.05) for s in range(461)])
    clean = 2 + 40 * (sched[:460].sum() * 2**18) ** -0.25 - WARMDOWN_C * annealing_area(sched)[460]
    assert row["val_bpb"] == pytest.approx(clean * 1.01 / (math.log(2) * BYTES_PER_TOKEN))


def test_cli_json(tmp_path, capsys):
    from scripts.diagnose import main

    run_dir = make_run(tmp_path, val_ratio=0.9)
    assert main([str(run_dir), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    status = {f["check"]: f["status"] for f in obj["findings"]}
    assert status["val_vs_train"] == "warn" and status["mfu"] == "ok"


def test_warmdown_owed_is_measured_mid_warmdown(tmp_path):
    """Stopped 60% into the warmdown of a run whose warmdown gain is large (C = 2e-3): the fit measures C
    on the steps taken and predicts the planned end within its interval."""
    c = 2e-3
    f = findings(make_run(tmp_path, stop_at=340, warmdown_c=c))["loss_curve"]
    n = f.numbers
    sched = np.array([lr_multiplier(s, 460, 40, 0.65, 0.05) for s in range(461)])
    s2 = annealing_area(sched)
    truth_end = 2 + 40 * (sched[:460].sum() * 2**18) ** -0.25 - c * s2[460]
    assert n["fit"]["C"] == pytest.approx(c, rel=0.25)
    assert n["warmdown_owed"] == pytest.approx(c * (s2[460] - s2[340]), rel=0.3)
    lo, hi = n["intervals_end"]
    assert lo <= truth_end <= hi and n["loss_at_planned_end"] == pytest.approx(truth_end, rel=0.01)
    assert "still owes" in f.summary


def test_fit_whose_floor_is_at_its_bound_says_unreliable(tmp_path):
    """A pure power law (E = 0, the issue's tiny-CPU-run case): E lands on its bound, the finding labels
    the extrapolations unreliable and stays an info, not an alarm."""
    run_dir = make_run(tmp_path)
    lines = []
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        rec["raw_loss"] = rec["loss"] = 11.0 * rec["tokens"] ** -0.07 * (1 + 0.003 * math.sin(rec["step"]))
        lines.append(json.dumps(rec))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    f = findings(run_dir)["loss_curve"]
    assert f.status == "info" and "UNRELIABLE" in f.summary and "bound" in f.summary
    assert f.numbers["reliable"] is False
    lo, hi = f.numbers["intervals"]["loss_at_10x"]
    assert lo < f.numbers["loss_at_10x"] < hi


FIX = REPO / "tests" / "fixtures"


def fixture_findings(name, config=None, gpu=None):
    run = dg.load_run(FIX / name, config=FIX / config if config else None)
    ranked = dg.diagnose(run, gpu=gpu)
    return ranked, {f.check: f for f in ranked}


def test_nanogpt_typo_config_ranked_findings():
    ranked, f = fixture_findings("nanogpt_typo.log", "nanogpt_typo_config.py", gpu="h100")
    # the most consequential first: the model is not the size its author thinks
    assert ranked[0].check == "param_count" and ranked[0].status == "warn"
    size = f["param_count"]
    assert size.numbers["recomputed_total"] == 12 * (12 * 1024**2 + 2 * 1024) + 1024 + 50304 * 1024 + 1024 * 1024
    assert size.numbers["claim_explained_by"][0]["dim"] == "n_embd" and size.numbers["claim_explained_by"][0]["value"] == 768
    assert "position embeddings" in size.advice and "n_embd=768" in size.advice
    # dropout 0.1 with val below the train-mode loss: the mode difference, and the eval-mode gap beside it
    vt = f["val_vs_train"]
    assert vt.status == "warn" and vt.numbers["relative_gap"] < -0.04 and "dropout" in vt.advice
    assert abs(vt.numbers["eval_mode_gap"]) < 0.01
    # nanoGPT's 30% is of an A100: on an H100 that is 30 x 312 / 989
    assert f["mfu"].numbers["median_mfu"] == pytest.approx(0.30 * 312 / 989, rel=0.03) and f["mfu"].status == "warn"
    assert [x.status for x in ranked].index("ok") > 2  # the three warnings lead


def test_mfu_rebased_per_gpu():
    _, f = fixture_findings("nanogpt_typo.log", "nanogpt_typo_config.py", gpu="4090")
    assert f["mfu"].status == "ok" and f["mfu"].numbers["median_mfu"] == pytest.approx(0.30 * 312 / 165, rel=0.03)
    assert "understates" in f["mfu"].summary
    _, f = fixture_findings("nanogpt_typo.log", "nanogpt_typo_config.py")
    assert f["mfu"].status == "info" and "A100" in f["mfu"].summary
    # a card missing from the table is one line in the MFU finding, never a refusal; --peak-tflops re-bases on anything
    _, f = fixture_findings("nanogpt_typo.log", "nanogpt_typo_config.py", gpu="voodoo5")
    assert f["mfu"].status == "info" and "'voodoo5' is not in the peak table" in f["mfu"].summary
    assert f["param_count"].status == "warn"  # the rest of the run is diagnosed
    run = dg.load_run(FIX / "nanogpt_typo.log", config=FIX / "nanogpt_typo_config.py")
    mfu = dg.check_mfu(run, gpu="voodoo5", peak_tflops=100)
    assert mfu.numbers["median_mfu"] == pytest.approx(0.30 * 312 / 100, rel=0.03)


@pytest.mark.parametrize("name", ["4070", "RTX 4070", "NVIDIA GeForce RTX 4070", "rtx4070"])
def test_consumer_gpu_names_are_matched_forgivingly(name):
    """The RTX 4070 case of issue 28: `--gpu "RTX 4070"` was refused. Its dense bf16 peak (fp32 accumulate)
    is SMs x boost x 512 = 46 x 2.475 GHz x 512 = 58.3 TFLOP/s (Ada whitepaper's rule, 466 AI TOPS / 8)."""
    _, f = fixture_findings("nanogpt_typo.log", "nanogpt_typo_config.py", gpu=name)
    assert f["mfu"].numbers["gpu"] == "RTX 4070"
    assert f["mfu"].numbers["median_mfu"] == pytest.approx(0.30 * 312 / (46 * 2.475e9 * 512 / 1e12), rel=0.03)


def test_healthy_nanogpt_run_gets_no_alarm():
    ranked, f = fixture_findings("nanogpt_good.log", "nanogpt_good_config.py", gpu="a100")
    assert [x for x in ranked if x.status in ("warn", "info")] == []
    t = f["tokens_ratio"].numbers
    assert t["param_count"] == "total" and t["tokens_per_total_param_planned"] == pytest.approx(655.36e6 / 30.33e6, rel=0.01)
    assert f["loss_curve"].numbers["reliable"]


def test_karpathy_nanochat_log():
    ranked, f = fixture_findings("nanochat_base_train.log")
    t = f["tokens_ratio"].numbers
    assert t["param_count"] == "scaling" and t["tokens_per_scaling_param_planned"] == pytest.approx(10.5, abs=0.01)
    assert t["tokens_per_scaling_param_now"] == pytest.approx(280 * 524288 / 23199744, rel=1e-6)
    assert t["tokens_per_total_param_now"] == pytest.approx(280 * 524288 / 35782668, rel=1e-6)
    assert f["mfu"].status == "ok" and 0.3 < f["mfu"].numbers["median_mfu"] < 0.4  # already of the H100's peak
    assert f["schedule"].status == "info"  # stopped at 60%
    assert "planned end" in f["loss_curve"].summary  # the warmdown under way is extrapolated from the logged lrm
    assert not [x for x in ranked if x.status == "warn"]


def test_missing_fields_are_reported_not_guessed():
    ranked, f = fixture_findings("wandb_nanochat_history.jsonl")
    assert {f[k].status for k in ("param_count", "tokens_ratio", "loss_curve", "mfu")} == {"skip"}
    assert "--config" in f["param_count"].summary
    out = dg.report(dg.load_run(FIX / "wandb_nanochat_history.jsonl"), ranked)
    assert "not in this format: tokens" in out


def test_cli_foreign_and_errors(tmp_path, capsys):
    from scripts.diagnose import main

    assert main([str(FIX / "nanogpt_typo.log"), "--config", str(FIX / "nanogpt_typo_config.py"), "--gpu", "h100",
                 "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["source"] == "nanogpt" and obj["findings"][0]["check"] == "param_count"
    assert main([str(FIX / "nanogpt_typo.log"), "--gpu", "RTX 4070"]) == 0
    assert "RTX 4070" in capsys.readouterr().out
    assert main([str(FIX / "nanogpt_typo.log"), "--gpu", "voodoo5"]) == 0  # diagnosed; the MFU line says why not re-based
    assert "not in the peak table" in capsys.readouterr().out
    junk = tmp_path / "junk.txt"
    junk.write_text("nothing here\n")
    assert main([str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_gpu_table_agrees_with_the_training_loop_and_prints(capsys):
    from nanochat.common import get_peak_flops
    from nanochat.gpus import GPUS, find_gpu
    from scripts.diagnose import main

    for gpu in GPUS:  # the peaks base_train divides by are the ones the doctor re-bases on: one table
        assert find_gpu(gpu.name) is gpu, gpu.name
        assert get_peak_flops(gpu.name) == (gpu.peak_flops if gpu.bf16 else None), gpu.name
    for name in ("RTX 5090", "RTX 4060", "RTX A4000", "RTX 4000 Ada", "L4", "L40S", "A100", "H100", "H200", "B200", "MI300X"):
        assert find_gpu(name) is not None, name
    assert main(["--gpu", "list"]) == 0
    out = capsys.readouterr().out
    assert "RTX 4090" in out and "165.0" in out and "datasheet" in out


def test_compute_equivalent_against_the_law():
    """A 1B model on 1T tokens (~1000 tokens/param): the compute-optimal split of the same compute is bigger
    and lower; the fraction of compute it needs to match the run is where its loss equals the run's."""
    from nanochat.scaling import CHINCHILLA

    eq = compute_equivalent(CHINCHILLA, 1e9, 1e12)
    N, D = (float(v) for v in CHINCHILLA.compute_optimal(6e21))
    assert eq["optimal_params"] == pytest.approx(N) and eq["optimal_params"] > 1e9
    assert eq["law_loss_gap"] == pytest.approx(float(CHINCHILLA.loss(1e9, 1e12) - CHINCHILLA.loss(N, D)))
    n_f, d_f = CHINCHILLA.compute_optimal(6e21 * eq["compute_fraction_needed"])
    assert float(CHINCHILLA.loss(n_f, d_f)) == pytest.approx(float(CHINCHILLA.loss(1e9, 1e12)), abs=1e-9)
    assert 0 < eq["compute_fraction_needed"] < 1
