"""The CPU demo end to end (`bash speedrun.sh` with the cpu preset), per instruction set, interleaved.

    python benchmarks/bench_cpu_demo.py --isa native,avx2 --rounds 1 --venv /path/to/venv \
        --eval-bundle ../shared/data/eval_bundle

Each run gets a fresh NANOCHAT_BASE_DIR under --work-dir and no OMP_NUM_THREADS (the product's
`--threads auto` decides). `avx512` limits oneDNN to AVX-512 without its bf16 extensions and AMX
(ONEDNN_MAX_CPU_ISA=AVX512_CORE), as on Skylake to Ice Lake Xeons. `avx2` runs the same machine as an AVX2-only CPU would: ATen's own kernels
(ATEN_CPU_CAPABILITY=avx2), oneDNN's (ONEDNN_MAX_CPU_ISA=AVX2: its bf16 matmuls lose AMX / AVX512-BF16
and are emulated, so `--dtype auto` picks fp32) and MKL's fp32 GEMMs (MKL_ENABLE_INSTRUCTIONS=AVX2).
Prints, per run, the wall clock, the report card's stage times, the load average before and after, the
dtype the run trained in, the final val bpb and the held-out chat scores; then the median per ISA.

`--venv`: an existing environment with nanochat's dependencies (speedrun.sh's NANOCHAT_VENV); touch its
`.nanochat-installed` beforehand if nanochat must not be pip-installed into it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nanochat.common import cpu_name  # noqa: E402

ISA_ENV = {"native": {},
           # AVX-512 without AMX and without AVX512-BF16 (Skylake to Ice Lake servers): oneDNN's bf16 loses both
           "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
           "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}



def one_run(isa: str, base: Path, venv: str | None, bundle: str | None, log: Path) -> dict:
    if base.exists():
        shutil.rmtree(base)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "NANOCHAT_THREADS", "NANOCHAT_DTYPE",
                                                             *ISA_ENV["avx2"], *ISA_ENV["avx512"])}
    env.update(ISA_ENV[isa], NANOCHAT_PRESET="cpu", NANOCHAT_BASE_DIR=str(base))
    if venv:
        env["NANOCHAT_VENV"] = venv
    if bundle:
        env["NANOCHAT_EVAL_BUNDLE"] = bundle
    load_before = os.getloadavg()
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(["bash", "speedrun.sh"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    load_after = os.getloadavg()
    if rc != 0:
        raise SystemExit(f"bench_cpu_demo: the {isa} run failed (exit {rc}); see {log}")
    run_dir = base / "base_checkpoints" / "cpu_d4"
    state = json.loads((run_dir / "report" / "report_state.json").read_text())
    run_json = json.loads((run_dir / "run.json").read_text())
    base_eval = json.loads(next(run_dir.glob("base_eval_*.json")).read_text())
    sft_eval = json.loads(next((base / "chatsft_checkpoints" / "cpu_d4").glob("chat_eval_*.json")).read_text())
    chat = sft_eval["tasks"]["EmbeddedChat"]
    return {"isa": isa, "wall_s": wall, "stages": state.get("stage_seconds", {}), "load_before": load_before[0],
            "load_after": load_after[0], "load_15min_after": load_after[2],
            "dtype": (run_json.get("env") or {}).get("dtype"), "val_bpb": base_eval.get("val_bpb"),
            "core": base_eval.get("core"), "chat": chat["accuracy"],
            "multiturn": (chat.get("by_kind") or {}).get("multiturn")}


def fmt_min(s: float) -> str:
    return f"{int(s // 60)} min {round(s % 60):02d} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isa", default="native,avx2", help="comma-separated: native, avx512, avx2")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--venv", default=None, help="NANOCHAT_VENV for speedrun.sh")
    ap.add_argument("--eval-bundle", default=None, help="NANOCHAT_EVAL_BUNDLE (CORE on 16 examples per task)")
    ap.add_argument("--work-dir", default="/tmp/nanochat-bench-cpu-demo")
    ap.add_argument("--json", default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    isas = [s.strip() for s in args.isa.split(",") if s.strip()]
    bad = [s for s in isas if s not in ISA_ENV]
    if bad or args.rounds < 1:
        ap.error(f"--isa takes {', '.join(ISA_ENV)} (got {bad}); --rounds >= 1")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores; python {platform.python_version()}", flush=True)
    runs = []
    for r in range(args.rounds):
        for isa in isas:  # interleaved: round 1 native, avx2; round 2 native, avx2; ...
            print(f"round {r + 1}: {isa} ...", flush=True)
            res = one_run(isa, work / f"base_{isa}_{r}", args.venv, args.eval_bundle, work / f"log_{isa}_{r}.txt")
            runs.append(res)
            stages = ", ".join(f"{k} {v:.0f}" for k, v in res["stages"].items())
            print(f"  {isa}: {fmt_min(res['wall_s'])} wall (stages, s: {stages}); load {res['load_before']:.1f} -> "
                  f"{res['load_after']:.1f}; dtype {res['dtype']}; val bpb {res['val_bpb']:.4f}; "
                  f"EmbeddedChat {res['chat']:.2f} (multi-turn {res['multiturn']})", flush=True)
    print("\n| ISA | runs | wall clock (median) | train stage | dtype | val bpb | EmbeddedChat | multi-turn |")
    print("|---|---|---|---|---|---|---|---|")
    for isa in isas:
        rs = [r for r in runs if r["isa"] == isa]
        print(f"| {isa} | {len(rs)} | {fmt_min(statistics.median(r['wall_s'] for r in rs))} | "
              f"{statistics.median(r['stages'].get('train', float('nan')) for r in rs):.0f} s | {rs[0]['dtype']} | "
              f"{statistics.median(r['val_bpb'] for r in rs):.4f} | {statistics.median(r['chat'] for r in rs):.2f} | "
              f"{statistics.median(r['multiturn'] or 0 for r in rs):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
