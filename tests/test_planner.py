"""The planner: textbook checks of the closed form, the memo, the inference-aware optimum and the page."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat import planner
from nanochat import scaling as sc

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(aspect_ratio=64, head_dim=128, max_seq_len=2048, vocab_size=32768)


def plan(C=1e22, d_inf=2e13, law=sc.EPOCH_AI):
    return planner.make_plan(law, "test law", C, f"C = {C:g}", d_inf, SHAPE, gpu="h100", peak=989e12)


def test_rule_of_thumb_1e23():
    # 1e23 FLOPs at 20 tokens per parameter: ~29B parameters on ~580B tokens (N = sqrt(C / 120))
    N, D = sc.ratio_optimum(1e23, 20)
    assert N == pytest.approx(28.9e9, rel=0.01) and D == pytest.approx(577e9, rel=0.01)
    assert plan(1e23)["rule_of_thumb"]["N"] == pytest.approx(N)


def test_published_constants_reproduce_published_optima():
    # Epoch AI's refit puts Chinchilla's own budget (5.76e23 FLOPs) at Chinchilla's size: 70B on 1.4T tokens
    N, D = sc.EPOCH_AI.compute_optimal(5.76e23)
    assert N == pytest.approx(70e9, rel=0.1) and D == pytest.approx(1.4e12, rel=0.1)
    # Hoffmann et al.'s approach-3 constants give their published exponents a = 0.46, b = 0.54 (Table 2)
    assert sc.CHINCHILLA.n_exponent == pytest.approx(0.46, abs=0.01)
    assert 1 - sc.CHINCHILLA.n_exponent == pytest.approx(0.54, abs=0.01)


@pytest.mark.parametrize("law", [sc.EPOCH_AI, sc.CHINCHILLA])
def test_lagrangian_conditions_hold_at_the_optimum(law):
    N, D = (float(v) for v in law.compute_optimal(3e21))
    assert law.alpha * law.A / N ** law.alpha == pytest.approx(law.beta * law.B / D ** law.beta, rel=1e-9)
    grid = np.geomspace(N / 3, N * 3, 200_001)  # brute force along 6ND = C
    assert grid[np.argmin(law.loss(grid, 3e21 / (6 * grid)))] == pytest.approx(N, rel=1e-4)


def test_memo_numbers():
    out = plan()
    text = planner.memo(out, "plan.png")
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    t = out["loss_terms"]
    assert t["E"] + t["params_term"] + t["data_term"] == pytest.approx(out["predicted_loss"], rel=1e-9)
    assert f"**N\\* = {ch['N']:.3g}**" in text and "| 1.82 | 482 | 2085 | 0.3478 | 0.3658 |" in text
    assert "Lagrangian" in text and "irreducible" in text and "![" in text
    assert f"`{ch['base_train_flags']}`" in text and ch["base_train_flags"].startswith(f"--depth={ch['depth']} ")
    # the inference-aware plan: the same loss, a smaller model, a lower lifetime cost
    assert ia["N"] < ch["N"] and ia["lifetime_flops"] < ch["lifetime_flops"]
    assert float(sc.EPOCH_AI.loss(ia["N"], ia["D"])) == pytest.approx(out["predicted_loss"], rel=1e-6)
    # lifetime cost at equal loss, brute force over N: nothing cheaper than the reported optimum
    Ns = np.geomspace(ia["N"] / 3, ia["N"] * 3, 20001)
    Ds = sc.tokens_for_loss(sc.EPOCH_AI, Ns, out["predicted_loss"])
    cost = sc.lifetime_flops(Ns, Ds, 2e13)
    assert cost[np.isfinite(cost)].min() >= ia["lifetime_flops"] * (1 - 1e-6)
    # at the break-even volume the saving is the defined 10%
    be = out["breakeven_inference_tokens"]
    assert sc.inference_plan(sc.EPOCH_AI, 1e22, be)["saving"] == pytest.approx(0.10, abs=1e-3)
    assert out["inference_equals_training_tokens"] == pytest.approx(3 * ch["D"])


def test_optimum_moves_left_as_inference_grows():
    law, C = sc.EPOCH_AI, 1e23
    loss = float(law.loss(*law.compute_optimal(C)))
    Ns = np.geomspace(1e9, 1e12, 6000)
    last = math.inf
    for d_inf in (0.0, 1e11, 1e12, 1e13, 1e14):
        train, life = planner.cost_vs_n(law, loss, d_inf, Ns)
        n_aware = Ns[np.argmin(life)]
        assert n_aware < last or d_inf == 0
        last = n_aware
        # the training curve bottoms out at the compute-optimal model, which spends exactly C
        assert Ns[np.argmin(train)] == pytest.approx(float(law.compute_optimal(C)[0]), rel=0.01)
        assert train.min() == pytest.approx(C, rel=1e-4)


def test_every_view_answers_the_table_question():
    out = plan(1e22, 2e13)
    ch, ia = out["plans"]["chinchilla"], out["plans"]["inference_aware"]
    law = sc.EPOCH_AI
    Ns = np.geomspace(ch["N"] / 30, ch["N"] * 30, 200_001)
    train, life = planner.cost_vs_n(law, out["predicted_loss"], 2e13, Ns)
    # the plot's curves have their minima at the table's two plans
    assert Ns[np.argmin(train)] == pytest.approx(ch["N"], rel=1e-3)
    assert Ns[np.nanargmin(life)] == pytest.approx(ia["N"], rel=1e-3)
    text = planner.memo(out, "plan.png")
    assert planner.question(out) in text and planner.question(out) in planner.print_table(out)
    assert "1e+22 training FLOPs" in planner.question(out)


def test_warns_when_the_inference_aware_plan_trains_past_the_budget():
    r = subprocess.run([sys.executable, "scripts/plan.py", "--gpu-hours", "24", "--gpu", "h100", "--mfu", "0.45",
                        "--inference-tokens", "1e12"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("warning:"))
    budget = 24 * 3600 * 989e12 * 0.45
    ratio = float(re.search(r", ([0-9.]+)x the budget", line).group(1))
    train = float(re.search(r"trains for ([0-9.e+]+) FLOPs", line).group(1))
    assert ratio > 2 and train / budget == pytest.approx(ratio, rel=0.05)
    # no serving: both plans are the same model, nothing to warn about
    out = plan(1e20, 0.0)
    assert planner.budget_warning(out) is None and "warning" not in planner.print_table(out)


def test_cli_memo_plot_and_html(tmp_path):
    memo = tmp_path / "plan.md"
    page = tmp_path / "plan.html"
    r = subprocess.run([sys.executable, "scripts/plan.py", "--flops", "1e21", "--inference-tokens", "1e12", "--memo",
                        str(memo), "--html", str(page)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "plan.png").stat().st_size > 10_000
    assert "![FLOPs to reach the compute-optimal loss against N" in memo.read_text() and "(plan.png)" in memo.read_text()
    html = page.read_text()
    assert "__PLAN_DATA__" not in html and not re.search(r"(src|href)=\"?(https?:)?//", html)
    r = subprocess.run([sys.executable, "scripts/plan.py", "--flops", "1e21", "--memo"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("# Training plan for 1e+21 FLOPs")
    r = subprocess.run([sys.executable, "scripts/plan.py", "--flops", "1e21", "--fit", str(tmp_path / "none.json")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: --fit")


CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.slow
def test_page_in_headless_chromium(tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no /usr/bin/chromium")
    page_path = tmp_path / "plan.html"
    out = plan(1e22, 2e13)
    page_path.write_text(planner.html_page(out))
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            state = page.evaluate("window.plannerState")
            # it opens where the command pointed, and answers the table's question with the table's numbers
            assert state["budget"] == pytest.approx(1e22, rel=0.01) and state["inference"] == pytest.approx(2e13, rel=0.01)
            assert state["trainingOptimumN"] == pytest.approx(out["plans"]["chinchilla"]["N"], rel=0.03)
            assert state["inferenceOptimumN"] == pytest.approx(out["plans"]["inference_aware"]["N"], rel=0.03)
            assert state["loss"] == pytest.approx(out["predicted_loss"], rel=1e-4)
            assert "1.00e+22 training FLOPs" in page.inner_text("#question")
            assert state["overBudget"] > 2 and "x the training budget" in page.inner_text("#warning")
            n_star = state["trainingOptimumN"]
            lo, hi = (float(page.get_attribute("#inference", k)) for k in ("min", "max"))
            seen = []
            for v in np.linspace(lo + 0.3 * (hi - lo), hi, 5):
                page.evaluate("v => { const s = document.getElementById('inference'); s.value = v; "
                              "s.dispatchEvent(new Event('input')); }", f"{v:.2f}")
                st = page.evaluate("window.plannerState")
                seen.append(st["inferenceOptimumN"])
                assert st["trainingOptimumN"] == pytest.approx(n_star, rel=1e-6)  # ignores inference
            assert all(b < a for a, b in zip(seen, seen[1:])), seen  # moves left as inference rises
            assert page.inner_text("#aN") != ""
            assert errors == [] and all(u.startswith("file:") for u in requests)
        finally:
            browser.close()
