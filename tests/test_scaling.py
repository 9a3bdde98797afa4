"""Scaling-law fits, the compute-optimal split, the inference-aware optimum and the planner."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat import scaling as sc

REPO = Path(__file__).resolve().parents[1]
TRUE = sc.LossLaw(E=1.8, A=400.0, B=1500.0, alpha=0.34, beta=0.32)
BUDGETS = np.geomspace(1e17, 1e21, 5)


def isoflop_points(law=TRUE, noise=0.002, seed=0) -> sc.Points:
    """9 runs per budget spread 64x in N around the optimum, loss x lognormal noise."""
    rng = np.random.default_rng(seed)
    N, D, B = [], [], []
    for C in BUDGETS:
        n_opt = law.compute_optimal(C)[0]
        for f in np.geomspace(1 / 8, 8, 9):
            N.append(n_opt * f)
            D.append(C / (6 * n_opt * f))
            B.append(C)
    N, D = np.array(N), np.array(D)
    L = law.loss(N, D) * np.exp(noise * rng.standard_normal(len(N)))
    return sc.Points(N, D, L, budget=np.array(B))


@pytest.fixture(scope="module")
def points():
    return isoflop_points()


@pytest.fixture(scope="module")
def fit3(points):
    return sc.fit_approach3(points)


def brute_force_optimum(law, C):
    """Minimise L(N, C/6N) on a fine log grid: an independent check of the closed form."""
    N = np.geomspace(1e3, 1e15, 400_001)
    return N[np.argmin(law.loss(N, C / (6 * N)))]


@pytest.mark.parametrize("law", [sc.CHINCHILLA, sc.EPOCH_AI, TRUE])
@pytest.mark.parametrize("C", [1e18, 5.76e23])
def test_closed_form_optimum_matches_brute_force(law, C):
    N, D = law.compute_optimal(C)
    assert N == pytest.approx(brute_force_optimum(law, C), rel=1e-4)
    assert 6 * N * D == pytest.approx(C)
    # hand-checked: N* = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))
    G = (law.alpha * law.A / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    assert N == pytest.approx(G * (C / 6) ** (law.beta / (law.alpha + law.beta)))


def test_published_constants():
    # Hoffmann et al.: N* ~ C^0.46 from approach 3 (0.28 / 0.62)
    assert sc.CHINCHILLA.n_exponent == pytest.approx(0.28 / 0.62)
    # Epoch AI's refit is consistent with ~20 tokens per parameter at Chinchilla's compute (5.76e23)
    N, D = sc.EPOCH_AI.compute_optimal(5.76e23)
    assert 15 < D / N < 30
    assert sc.LossLaw.from_dict(sc.EPOCH_AI.to_dict()) == sc.EPOCH_AI


def test_approach3_recovers_known_constants(fit3):
    law = fit3.law
    assert law.E == pytest.approx(TRUE.E, rel=0.02)
    assert law.alpha == pytest.approx(TRUE.alpha, abs=0.01)
    assert law.beta == pytest.approx(TRUE.beta, abs=0.01)
    assert law.A == pytest.approx(TRUE.A, rel=0.15)
    assert law.B == pytest.approx(TRUE.B, rel=0.15)
    for C in (1e19, 1e22):
        assert law.compute_optimal(C)[0] == pytest.approx(TRUE.compute_optimal(C)[0], rel=0.05)


def test_approach3_exact_on_noiseless_data():
    fit = sc.fit_approach3(isoflop_points(noise=0.0))
    for k in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, k) == pytest.approx(getattr(TRUE, k), rel=2e-3), k


def test_huber_gradient_matches_finite_differences(points):
    logN, logD, logL = np.log(points.N), np.log(points.D), np.log(points.L)
    theta = np.array([6.0, 7.3, 0.6, 0.35, 0.3])
    _, g = sc._objective(theta, logN, logD, logL, 1e-3)
    eps = 1e-7
    num = [(sc._objective(theta + eps * e, logN, logD, logL, 1e-3)[0]
            - sc._objective(theta - eps * e, logN, logD, logL, 1e-3)[0]) / (2 * eps) for e in np.eye(5)]
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-9)


def test_approach2_agrees_with_approach3(points, fit3):
    iso = sc.fit_approach2(points)
    assert len(iso.slices) == 5 and all(s["in_range"] for s in iso.slices)
    assert iso.a == pytest.approx(TRUE.n_exponent, abs=0.02)
    assert iso.a + iso.b == pytest.approx(1.0)  # D* = C / 6N* exactly per slice
    for C in (1e18, 1e20, 1e22):
        assert iso.compute_optimal(C)[0] == pytest.approx(fit3.law.compute_optimal(C)[0], rel=0.08)


def test_approach2_buckets_near_equal_budgets(points):
    # without the budget column, 6ND within 0.05 decades still groups the runs of one target
    jitter = np.exp(np.random.default_rng(3).uniform(-0.05, 0.05, len(points)))
    pts = sc.Points(points.N, points.D * jitter, points.L)
    labels = sc.group_budgets(pts.C)
    assert len(np.unique(labels)) == 5
    assert all(len(np.unique(labels[i * 9:(i + 1) * 9])) == 1 for i in range(5))


def test_bootstrap_intervals(points, fit3):
    b = sc.bootstrap_approach3(points, n_boot=5, fit=fit3, budgets=[1e21])
    assert b.n_bootstrap == 5
    for k in ("E", "alpha", "beta", "N_opt@1e+21"):
        lo, hi = b.intervals[k]
        assert lo < hi
    assert b.intervals["alpha"][0] <= fit3.law.alpha + 1e-3 and fit3.law.alpha - 1e-3 <= b.intervals["alpha"][1]


def test_load_points_n_c_loss(tmp_path):
    path = tmp_path / "pts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "C", "loss"])
        w.writerow([1e6, 6e12, 3.0])
        w.writerow([2e6, 6e12, ""])  # a failed run: skipped
        w.writerow([4e6, 6e13, 2.5])
    p = sc.load_points(path, n_col="N", loss_col="loss", c_col="C")
    np.testing.assert_allclose(p.D, [1e6, 6e13 / (6 * 4e6)])
    with pytest.raises(ValueError, match="'tokens'"):
        sc.load_points(path, n_col="N", loss_col="loss", d_col="tokens")


# ---------------------------------------------------------------------------------------------
# inference-aware optimum


def test_inference_optimal_without_inference_is_chinchilla():
    N0, D0 = sc.EPOCH_AI.compute_optimal(1e21)
    N1, D1 = sc.inference_optimal(sc.EPOCH_AI, float(sc.EPOCH_AI.loss(N0, D0)), 0.0)
    assert N1 == pytest.approx(N0, rel=1e-4) and D1 == pytest.approx(D0, rel=1e-3)


def test_inference_aware_is_smaller_and_cheaper():
    law, C = sc.EPOCH_AI, 1e21
    small, large = sc.inference_plan(law, C, 1e10), sc.inference_plan(law, C, 1e13)
    for p in (small, large):
        ia, ch = p["inference_aware"], p["chinchilla"]
        assert float(law.loss(ia["N"], ia["D"])) == pytest.approx(p["loss"], rel=1e-9)
        assert ia["total_flops"] <= ch["total_flops"]
        assert ia["N"] < ch["N"] and ia["D"] > ch["D"]
    assert large["inference_aware"]["N"] < small["inference_aware"]["N"]
    assert large["saving"] > small["saving"] > 0
    # independent check: brute force over N along the iso-loss curve
    N = np.geomspace(1e6, 1e11, 200_001)
    cost = sc.lifetime_flops(N, sc.tokens_for_loss(law, N, large["loss"]), 1e13)
    assert large["inference_aware"]["N"] == pytest.approx(N[np.argmin(cost)], rel=1e-3)


def test_breakeven_inference_tokens():
    law, C = sc.EPOCH_AI, 1e21
    d = sc.breakeven_inference_tokens(law, C, saving=0.10)
    assert sc.inference_plan(law, C, d)["saving"] == pytest.approx(0.10, abs=1e-6)
    assert sc.inference_plan(law, C, d / 2)["saving"] < 0.10
    assert sc.breakeven_inference_tokens(law, C, saving=0.999) is None


# ---------------------------------------------------------------------------------------------
# planner and CLIs


def plan_json(capsys, *argv):
    from scripts.plan import main

    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_chinchilla_and_gpu_hours(capsys):
    from nanochat.sizing import count_params, model_config

    out = plan_json(capsys, "--gpu-hours", "10", "--gpu", "h100", "--mfu", "0.4")
    C = 10 * 3600 * 989e12 * 0.4
    assert out["budget_flops"] == pytest.approx(C)
    ch = out["plans"]["chinchilla"]
    N, D = sc.EPOCH_AI.compute_optimal(C)
    assert ch["N"] == pytest.approx(N) and ch["D"] == pytest.approx(D)
    # the depth is the closest in (total, the default law's counting) parameters among 2..64
    counts = {d: count_params(model_config(d))["total"] for d in range(2, 65)}
    assert ch["depth"] == min(counts, key=lambda d: abs(math.log(counts[d] / N)))
    assert ch["num_iterations"] * ch["total_batch_size"] == pytest.approx(ch["depth_tokens"], rel=0.01)
    # no inference: both plans coincide
    assert out["plans"]["inference_aware"]["N"] == pytest.approx(N, rel=1e-4)


def test_plan_inference_aware(capsys):
    out = plan_json(capsys, "--flops", "1e20", "--inference-tokens", "1e13")
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    assert ia["depth"] < ch["depth"] and ia["tokens_per_param"] > 10 * ch["tokens_per_param"]
    assert ia["lifetime_flops"] < ch["lifetime_flops"] and out["saving"] > 0.1
    assert ia["depth_predicted_loss"] == pytest.approx(out["predicted_loss"])
    # the inference-aware depth is the cheapest of its neighbours over the model's lifetime
    from nanochat.sizing import count_params, model_config

    def lifetime(d):
        n = count_params(model_config(d))["total"]
        return float(sc.lifetime_flops(n, sc.tokens_for_loss(sc.EPOCH_AI, n, out["predicted_loss"]), 1e13))

    assert lifetime(ia["depth"]) <= min(lifetime(ia["depth"] - 1), lifetime(ia["depth"] + 1))


def test_plan_rejects_bad_input(capsys):
    from scripts.plan import main

    with pytest.raises(SystemExit):
        main(["--flops", "-1"])
    assert main(["--gpu-hours", "1", "--gpu", "tpu-v9"]) == 2
    assert "unknown --gpu" in capsys.readouterr().err


def test_fit_cli_json_feeds_planner(tmp_path, points, capsys):
    path = tmp_path / "sweep.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scaling_params", "tokens", "val_bpb", "target_flops"])
        for n, d, loss, c in zip(points.N, points.D, points.L, points.budget):
            w.writerow([n, d, loss, c])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "scaling_fit.py"), "--csv", str(path), "--json",
                          "--budget", "1e21"], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["alpha"] == pytest.approx(TRUE.alpha, abs=0.01) and out["param_count"] == "scaling"
    assert out["loss_unit"] == "bpb" and out["budget_col"] == "target_flops"
    assert out["approach2"]["a"] == pytest.approx(TRUE.n_exponent, abs=0.02)
    assert out["budgets"][0]["N_opt"] == pytest.approx(TRUE.compute_optimal(1e21)[0], rel=0.05)
    fit_json = tmp_path / "fit.json"
    fit_json.write_text(res.stdout)
    plan = plan_json(capsys, "--flops", "1e21", "--fit", str(fit_json))
    assert plan["law"]["param_count"] == "scaling"
    assert plan["plans"]["chinchilla"]["N"] == pytest.approx(out["budgets"][0]["N_opt"])


def test_fit_cli_plots_and_errors(tmp_path, points, capsys):
    from scripts.scaling_fit import main

    path = tmp_path / "pts.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["N", "C", "loss"])
        for n, d, loss in zip(points.N, points.D, points.L):
            w.writerow([n, 6 * n * d, loss])
    assert main(["--csv", str(path), "--c-col", "C", "--plot-dir", str(tmp_path / "plots")]) == 0
    assert "approach 2: N* =" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["contours.png", "frontier.png", "isoflop.png"]
    with pytest.raises(SystemExit, match="not found"):
        main(["--csv", str(path), "--n-col", "params", "--c-col", "C", "--loss-col", "loss"])


# ---------------------------------------------------------------------------------------------
# sweep runner: collection from run folders (training itself is base_train's, exercised in its tests)


def test_sweep_collects_run_folders_into_fit_ready_csv(tmp_path, capsys, monkeypatch):
    from scripts import scaling_sweep
    from tests.test_diagnose import make_run

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    runs = tmp_path / "base_checkpoints"
    tag_a, tag_b = scaling_sweep.run_tag("t", 4, 1e12), scaling_sweep.run_tag("t", 4, 3e12)
    make_run(runs, name=tag_a)
    make_run(runs, name=tag_b, stop_at=100)  # interrupted
    out = tmp_path / "sweep.csv"
    rc = scaling_sweep.main(["--depths", "4", "--flops", "1e12,3e12,1e13", "--name", "t", "--collect-only",
                             "--out", str(out)])
    assert rc == 1  # not all complete
    with open(out) as f:
        rows = {r["model_tag"]: r for r in csv.DictReader(f)}
    assert rows[tag_a]["status"] == "complete" and rows[tag_b]["status"] == "incomplete"
    assert rows[scaling_sweep.run_tag("t", 4, 1e13)]["status"] == "missing"
    assert float(rows[tag_a]["tokens"]) == 460 * 2**18 and int(rows[tag_b]["steps"]) == 100
    assert "1/3 runs complete" in capsys.readouterr().out
    # the CSV is what scaling_fit reads by default
    p = sc.load_points(out)
    assert len(p) == 2 and p.n_col == "scaling_params" and p.loss_col == "val_bpb"
    # dry run: the base_train command line
    assert scaling_sweep.main(["--preset", "cpu", "--dry-run"]) == 0
    cmds = capsys.readouterr().out.splitlines()
    assert len(cmds) == 12 and "--target-flops 1e+12" in cmds[0] and "--depth 1" in cmds[0]
    # the GPU grid is one command: d10-d20 x 1e18-1e19 on torchrun
    assert scaling_sweep.main(["--preset", "gpu", "--nproc", "8", "--dry-run"]) == 0
    cmds = capsys.readouterr().out.splitlines()
    assert len(cmds) == 24 and "--nproc_per_node=8" in cmds[0] and "--target-flops 1e+18" in cmds[0]
    assert "--depth 20" in cmds[-1] and "--target-flops 1e+19" in cmds[-1]
