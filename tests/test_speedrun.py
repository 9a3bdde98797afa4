"""The whole pipeline end to end at toy size (the `ci` preset): data, tokenizer, training, evaluation,
report card; then a re-run that skips finished stages and a re-evaluation without an eval bundle."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_speedrun(env, timeout=900):
    return subprocess.run([sys.executable, "-m", "scripts.speedrun", "--preset", "ci"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ci_preset_end_to_end(tmp_path, shared_data_optional):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), OMP_NUM_THREADS="2")
    env.pop("NANOCHAT_EVAL_BUNDLE", None)
    bundle = shared_data_optional / "eval_bundle" if shared_data_optional else None
    if bundle is not None and bundle.is_dir():
        env["NANOCHAT_EVAL_BUNDLE"] = str(bundle)
    out = run_speedrun(env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    run_dir = tmp_path / "base" / "base_checkpoints" / "ci_d2"
    report = (run_dir / "report" / "report.md").read_text()
    for section in ("## Environment", "## Tokenizer", "## Model sizing", "## Training", "## Evaluation", "## Chat",
                    "## Wall time"):
        assert section in report, section
    assert (run_dir / "report" / "curve_vs_step.png").exists()
    result = json.loads(next(run_dir.glob("base_eval_*.json")).read_text())
    assert math.isfinite(result["val_bpb"]) and math.isfinite(result["untrained_val_bpb"])
    assert result["val_bpb"] < result["untrained_val_bpb"]  # 30 steps already learn something
    if "NANOCHAT_EVAL_BUNDLE" in env:
        assert "### CORE" in report and "CORE =" in report and math.isfinite(result["core"])
    else:
        assert "CORE was not computed" in report

    # the chat stages: SFT on the embedded mix, then the held-out embedded metric before and after it
    chat_evals = {ph: json.loads(next((tmp_path / "base" / d / "ci_d2").glob("chat_eval_*.json")).read_text())
                  for ph, d in (("base", "base_checkpoints"), ("sft", "chatsft_checkpoints"))}
    assert all(r["tasks"]["EmbeddedChat"]["n"] == 8 for r in chat_evals.values())
    assert "SFT masked validation loss" in report and "| EmbeddedChat |" in report
    # the held-out multi-turn chats are scored on their own row
    assert all("multiturn" in r["tasks"]["EmbeddedChat"]["by_kind"] for r in chat_evals.values())
    assert "| EmbeddedChat: multi-turn (last reply of a 2-3 exchange chat) |" in report
    # one labelled figure per quantity: the final val bpb once, with its step and tokens
    assert report.count("val bpb, final checkpoint (step 30, 8,192 tokens)") == 1
    assert "training text used | " in report and "| compute dtype (training) |" in report
    assert "matrix_lr as passed (--matrix-lr) | 0.02 |" in report

    def wall_time(text):
        return text[text.index("## Wall time"):]

    first_times = wall_time(report)
    # re-running skips every finished stage
    again = run_speedrun(env, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    # ... and keeps the stage times of the run that did the work
    assert wall_time((run_dir / "report" / "report.md").read_text()) == first_times
    assert "sft finished earlier" in again.stdout and "chat evaluation of sft" in again.stdout
    assert "skipping training" in again.stdout and "training finished earlier" in again.stdout
    assert "exists" in again.stdout and "skipping" in again.stdout

    # without an eval bundle the evaluation still runs (bpb, samples) and the report says why CORE is missing
    for f in run_dir.glob("base_eval_*"):
        f.unlink()
    env["NANOCHAT_EVAL_BUNDLE"] = str(tmp_path / "no_such_bundle")
    third = run_speedrun(env, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    report = (run_dir / "report" / "report.md").read_text()
    assert "CORE was not computed" in report and "NANOCHAT_EVAL_BUNDLE" in report
    result = json.loads(next(run_dir.glob("base_eval_*.json")).read_text())
    assert result["core"] is None and math.isfinite(result["val_bpb"])


def test_speedrun_sh_leaves_the_thread_count_to_the_product(tmp_path):
    """speedrun.sh hands over to `python -m scripts.speedrun` without fixing OMP_NUM_THREADS (which would
    override every stage's `--threads auto`). A stand-in venv's python reports the environment it got."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\nif [ "$1" = "-m" ]; then echo "OMP=${OMP_NUM_THREADS-unset} ARGS=$*"; fi\nexit 0\n')
    python.chmod(0o755)
    (venv / ".nanochat-installed").touch()
    os.utime(venv / ".nanochat-installed", (4e9, 4e9))  # newer than pyproject.toml: no pip install
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VIRTUAL_ENV")}
    env.update(NANOCHAT_VENV=str(venv), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    out = subprocess.run(["bash", "speedrun.sh", "--preset", "ci"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OMP=unset ARGS=-m scripts.speedrun --preset ci" in out.stdout
