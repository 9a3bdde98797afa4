"""benchmarks/gpu_bench.py on CPU: the budget cut, the documented calls, and every section at toy size.

The GPU window is short and rare; what these check is that its first call returns figures whatever
happens: a section killed at the budget leaves every earlier figure in gpu.md, its process group dies with
it, the later sections are recorded as skipped, and each section runs end to end (at toy size, eager).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gb():
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_bench"] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def _bench(gb, tmp_path, seconds):
    return gb.Bench(gb.Report(tmp_path / "out" / "gpu.md"), gb.Budget(seconds), tmp_path / "base", tmp_path / "out",
                    cpu=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has finished all the same
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_a_section_killed_at_the_budget_keeps_the_earlier_figures(gb, tmp_path, monkeypatch):
    monkeypatch.setattr(gb, "MIN_START_S", 1.0)
    monkeypatch.setattr(gb, "KILL_GRACE_S", 2)
    b = _bench(gb, tmp_path, seconds=4.0)
    pid_file = tmp_path / "grandchild.pid"

    def first(b, args):
        b.report.add("## first", "figure: 123 tok/s")

    def hangs(b, args):
        b.report.add("## second", "started")
        # a child that starts a grandchild and waits: the whole process group must go at the budget
        b.run(["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], "sleeper")
        b.report.add("never written")

    def never(b, args):
        b.report.add("never started")

    funcs = {"one": first, "two": hangs, "three": never}
    t0 = time.monotonic()
    outcomes = gb.run_sections(b, ["one", "two", "three"], SimpleNamespace(), funcs)
    assert outcomes == {"one": "done", "two": "cut", "three": "skipped"}
    assert time.monotonic() - t0 < 60  # killed near the budget, not after the sleep
    text = b.report.path.read_text()
    assert "figure: 123 tok/s" in text and "started" in text
    assert "**two: cut at the budget**" in text and "## three: skipped" in text
    assert "never written" not in text and "never started" not in text
    assert not _alive(int(pid_file.read_text()))
    assert (tmp_path / "out" / "logs.tar.gz").is_file()


def test_a_failing_section_does_not_cost_the_others(gb, tmp_path):
    b = _bench(gb, tmp_path, seconds=60)

    def boom(b, args):
        raise RuntimeError("no such GPU")

    outcomes = gb.run_sections(b, ["a", "b"], SimpleNamespace(), {"a": boom, "b": lambda b, a: b.report.add("b ran")})
    assert outcomes == {"a": "failed", "b": "done"}
    text = b.report.path.read_text()
    assert "**a: failed** (RuntimeError: no such GPU)" in text and "b ran" in text


def test_calls_cover_every_section_once_in_value_order_and_readme_names_them(gb):
    flat = [s for call in sorted(gb.CALLS) for s in gb.CALLS[call]]
    assert flat == list(gb.SECTIONS)
    assert gb.SECTIONS[:4] == ("d20", "ref", "fp8", "tests")  # the order the GPU issue asks for
    assert gb.parse_args(["--call", "1"]).names == ["d20", "ref"]
    assert gb.parse_args(["--sections", "tests,d20"]).names == ["d20", "tests"]  # always run in value order
    with pytest.raises(SystemExit):
        gb.parse_args(["--sections", "d20,nope"])
    readme = (REPO / "README.md").read_text()
    for call, names in gb.CALLS.items():
        assert f"--call {call}" in readme and ",".join(names) in readme, call


def test_figures_of_a_run_cut_after_some_steps(gb, tmp_path):
    """throughput() reads whatever steps a run logged: the figures of a cut run are its finished steps."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [dict(step=i, dt=dt, tok_per_sec=1000 / dt, mfu=0.4, peak_mem_mb=2048, raw_loss=5.0 - i)
            for i, dt in enumerate([30.0, 1.0, 1.2, 0.8, 1.0], 1)]
    (run / "metrics.jsonl").write_text("".join(__import__("json").dumps(r) + "\n" for r in rows))
    fig = gb.throughput(run, skip=3)
    assert fig["steps"] == 5 and fig["timed_steps"] == 2
    assert fig["step_ms"] == pytest.approx(900) and fig["compile_s"] == pytest.approx(29.1)
    assert "MFU 40.0%" in gb.format_figures("d20", fig) and gb.throughput(tmp_path / "none", 3) is None


@pytest.mark.slow
def test_every_section_runs_at_toy_size_on_cpu(tmp_path, shared_data_optional):
    """The whole bench as the GPU machine runs it (through gpu_bench.sh), at toy size on CPU: every section
    ends `done`, the report names each, and the real-text sections ran when the shared text is here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(GPU_BENCH_CPU="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    if shared_data_optional is not None:
        env["NANOCHAT_EVAL_BUNDLE"] = str(shared_data_optional / "eval_bundle")
    out = subprocess.run(["bash", "benchmarks/gpu_bench.sh", "--budget", "1200", "--base-dir", str(tmp_path / "base")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = (tmp_path / "out" / "gpu.md").read_text()
    summary = report.strip().splitlines()[-1]
    for name in ("d20", "ref", "fp8", "tests", "backends", "auto", "head", "scope", "resume", "core"):
        assert f"{name} done" in summary, summary
    assert "d20: " in report and "tok/s" in report
    assert "--fp8 on CPU: exit 2 (refused" in report or "no benchmark text" in report
    assert "recompilations logged after the probe chose its size: 0" in report
    if shared_data_optional is not None:
        assert "resume check ok" in report and "CORE " in report
    assert (tmp_path / "out" / "logs.tar.gz").is_file()


def test_runs_as_a_plain_script_from_anywhere(tmp_path):
    """`python benchmarks/gpu_bench.py` without nanochat installed or on PYTHONPATH (as on the GPU machine when
    run by hand): the sections that import nanochat in the bench process itself still work."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NANOCHAT_BASE_DIR", "OUT")}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--cpu", "--sections", "backends",
                          "--budget", "300", "--base-dir", str(tmp_path / "base")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = (tmp_path / "base" / "out" / "gpu.md").read_text()
    assert "backends done" in report and "flex-fa4: not available" in report and "d20_flex: " in report
