"""Every GPU figure of the project from one command, ordered by value, under a time budget.

A GPU is lent rarely and briefly (one H100 or H200, ~15 minutes in all, at most 10 minutes per command,
no network), so the first call must return the figures that matter most, and a kill at the limit must
cost nothing already measured. Sections, in the order they run (each can be asked for alone):

    d20       depth 20, --attention auto (offline Hopper: FlexAttention with the record recipe), bf16,
              whole-model torch.compile, synthetic tokens: tok/s, MFU, peak memory, compile time apart
              from step time
    ref       the reference implementation at depth 20 on the same GPU, same sequence and batch: its
              tok/s, the attention it ran, its MFU (its own FLOPs per token: its windows are half the
              context), and its FLOPs by our formula
    fp8       depth 24 bf16 vs --fp8 on real text: tok/s, the ratio, the loss after the same steps, and
              the time-to-GPT-2 estimate on 8 such GPUs
    tests     the cuda-marked tests (tests/test_cuda.py)
    backends  depth 20 with every other attention backend available here (fa3, fa4, flex-fa4, flex, sdpa)
    auto      --device-batch-size auto at depth 20: the probe's answer and the recompiles after it
    head      the LM head at depth 20: --fused-loss on (chunked, outside the graph) vs d20's auto
    scope     depth 20 with --compile-scope blocks vs d20's whole-model compile
    resume    depth 12: run A; run B SIGKILLed mid-step, resumed from its last checkpoint: same losses
    core      CORE on a few examples per task through the compiled model (run A of `resume`)

The calls that cover everything (python benchmarks/gpu_bench.py --calls prints this table):

    call 1  d20,ref                   ~5-7 min cold (two compiles of depth 20 + the reference's data prep)
    call 2  fp8,tests,backends        ~6-9 min, on the still-warm machine (Inductor cache reused)
    call 3  auto,head,scope,resume,core  ~7-9 min

Each figure is appended to `gpu.md` in the output folder ($OUT on the device machine) the moment it
exists; each section runs under a timeout of what is left of the budget (--budget, default 540 s, so a
600 s command limit leaves time to send the files back), and a section cut at the budget reports what its
run had logged so far. The base dir and the Inductor cache are fixed (/tmp/nanochat_gpu_bench), so a
second call on the still-warm machine reuses the compiled kernels and the prepared data. Runs skip the
final checkpoint (--no-final-checkpoint) except in `resume`. The logs of every run go back as one
logs.tar.gz beside gpu.md (the device tool returns at most 8 files).

    python benchmarks/gpu_bench.py                      # all sections in order, 540 s budget
    python benchmarks/gpu_bench.py --call 1             # the sections of call 1
    python benchmarks/gpu_bench.py --sections fp8,tests --budget 300
    python benchmarks/gpu_bench.py --cpu --budget 300   # the same logic at toy size on CPU (checks the script)

`bash benchmarks/gpu_bench.sh [args]` runs it with the carried wheels and data (benchmarks/device_env.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the figures computed here import nanochat, installed or not
    sys.path.insert(0, str(REPO))
SECTIONS = ("d20", "ref", "fp8", "tests", "backends", "auto", "head", "scope", "resume", "core")
CALLS = {1: ("d20", "ref"), 2: ("fp8", "tests", "backends"), 3: ("auto", "head", "scope", "resume", "core")}
CALL_COST = {1: "~5-7 min cold", 2: "~6-9 min warm", 3: "~7-9 min warm"}
DEFAULT_BASE = "/tmp/nanochat_gpu_bench"
MIN_START_S = 15  # a section is not started with less than this left: it could not finish a step
KILL_GRACE_S = 10  # SIGTERM, then SIGKILL after this long


# ---------------------------------------------------------------------------------------------
# the report, the budget, the runs


class Report:
    """gpu.md, appended line by line and flushed to disk at once: a kill loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, *lines: str) -> None:
        with open(self.path, "a") as f:
            for line in lines:
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Budget:
    seconds: float
    start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class SectionCut(Exception):
    """A run of the section reached the budget and was killed."""


@dataclass
class Bench:
    report: Report
    budget: Budget
    base: Path
    out: Path
    cpu: bool
    py: str = sys.executable
    env: dict = field(default_factory=dict)
    logs: list = field(default_factory=list)
    results: dict = field(default_factory=dict)  # figures later sections compare with (d20's tok/s, ...)

    @property
    def checkpoints(self) -> Path:
        return self.base / "base_checkpoints"

    def say(self, msg: str) -> None:
        print(f"[gpu_bench {self.budget.elapsed():.0f}s] {msg}", flush=True)

    def run(self, cmd: list[str], log_name: str, env: dict | None = None, cwd: Path | None = None,
            until: str | None = None) -> int:
        """Run `cmd` with its output in logs/<log_name>.log, killed (its whole process group) when the budget
        runs out: raises SectionCut then. `until`: a regex; when the log shows it, the run is SIGKILLed and
        -9 returned (the resume section's mid-step kill)."""
        log = self.base / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.logs.append(log)
        left = self.budget.left()
        if left < MIN_START_S:
            raise SectionCut(f"{left:.0f} s left, not started")
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd or REPO,
                                    env={**os.environ, **self.env, **(env or {})}, start_new_session=True)
            deadline = time.monotonic() + left
            while proc.poll() is None:
                if until and re.search(until, log.read_text(errors="replace")):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return -9
                if time.monotonic() > deadline:
                    _kill_group(proc)
                    raise SectionCut(f"`{log_name}` killed at the budget after {left:.0f} s")
                time.sleep(0.2)
        return proc.returncode

    def train(self, tag: str, flags: list[str], env: dict | None = None, until: str | None = None) -> int:
        self.report.add("", f"`base_train {' '.join(flags)} --model-tag {tag}`", "")
        return self.run([self.py, "-m", "scripts.base_train", *flags, "--model-tag", tag], tag, env, until=until)

    def figures(self, tag: str, rc: int | None = None, skip: int | None = None) -> dict | None:
        """The run's figures (also after a cut: whatever steps it logged), added to the report."""
        log = self.base / "logs" / f"{tag}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        head = [ln for ln in text.splitlines() if re.match(r"^\s+(attention|dtype|tokens per step)\b", ln)
                or ln.startswith(("--device-batch-size", "device batch size probe", "first step"))]
        fig = throughput(self.checkpoints / tag, self.skip if skip is None else skip)
        lines = ["```", *head]
        if fig:
            lines.append(format_figures(tag, fig))
        if rc not in (0, None):
            lines += [f"exit {rc}:", *[ln for ln in text.splitlines() if not ln.startswith(" ")][-4:]]
        elif not fig:
            lines.append("no step finished")
        self.report.add(*lines, "```")
        return fig

    @property
    def skip(self) -> int:
        return 1 if self.cpu else 3

    def pack_logs(self) -> None:
        """logs.tar.gz beside gpu.md: every run's log, for a failure the report only summarises."""
        tmp = self.out / "logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for log in sorted(set(self.logs)):
                if log.exists():
                    tar.add(log, arcname=log.name)
        os.replace(tmp, self.out / "logs.tar.gz")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def throughput(run_dir: Path, skip: int) -> dict | None:
    """Median tok/s, step time and MFU after `skip` steps, peak memory, and the first step's time beyond a
    median step (compilation and warm-up), from a run folder's metrics.jsonl (None before any step)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if not records:
        return None
    timed = records[skip:] or records[-1:]
    step_s = statistics.median(r["dt"] for r in timed)
    mfu = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"steps": len(records), "timed_steps": len(records[skip:]), "tok_per_sec":
            statistics.median(r["tok_per_sec"] for r in timed), "step_ms": 1000 * step_s,
            "mfu": statistics.median(mfu) if mfu else None, "peak_mem_mb": max(r["peak_mem_mb"] for r in records),
            "compile_s": max(0.0, records[0]["dt"] - step_s), "last_loss": records[-1]["raw_loss"]}


def format_figures(tag: str, f: dict) -> str:
    mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a"
    partial = "" if f["timed_steps"] > 0 else " (no step after warm-up: the figures are the first step's)"
    return (f"{tag}: {f['tok_per_sec']:,.0f} tok/s, {f['step_ms']:.0f} ms/step, MFU {mfu}, peak memory "
            f"{f['peak_mem_mb'] / 1024:.1f} GiB, compile + warm-up {f['compile_s']:.1f} s, "
            f"{f['steps']} steps{partial}")


# ---------------------------------------------------------------------------------------------
# sizes: the real ones on a GPU, toy ones for the CPU check of the script


def sizes(cpu: bool) -> dict:
    if cpu:
        toy = ["--device-type", "cpu", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len",
               "64", "--device-batch-size", "4"]
        return {"d20": toy + ["--vocab-size", "512", "--total-batch-size", "256", "--num-iterations", "4"],
                "d24": toy + ["--total-batch-size", "256", "--num-iterations", "4"],
                "d12": toy + ["--total-batch-size", "512", "--num-iterations", "6", "--save-every", "2",
                              "--eval-tokens", "1024"],
                "hang_step": 3, "resume_step": 2, "core_per_task": 12, "vocab": 512,
                "ref": ["--device-type=cpu", "--depth=2", "--aspect-ratio=32", "--head-dim=32", "--max-seq-len=64",
                        "--device-batch-size=4", "--total-batch-size=256", "--num-iterations=4"]}
    return {"d20": ["--depth", "20", "--max-seq-len", "2048", "--vocab-size", "32768", "--device-batch-size", "32",
                    "--total-batch-size", "65536", "--num-iterations", "12"],
            "d24": ["--depth", "24", "--max-seq-len", "2048", "--device-batch-size", "16", "--total-batch-size",
                    "65536", "--num-iterations", "16"],
            "d12": ["--depth", "12", "--max-seq-len", "2048", "--device-batch-size", "32", "--total-batch-size",
                    "131072", "--num-iterations", "20", "--save-every", "10", "--eval-tokens", "524288"],
            "hang_step": 15, "resume_step": 10, "core_per_task": 16, "vocab": 8192,
            "ref": ["--depth=20", "--max-seq-len=2048", "--device-batch-size=32", "--total-batch-size=65536",
                    "--num-iterations=12"]}


RECIPE = ["--window-pattern", "SSSL", "--value-embeds", "--resid-scalars", "--weight-decay", "0", "--warmup-steps", "2"]
QUIET = ["--eval-every", "0", "--core-metric-every", "0", "--sample-every", "0"]
BENCH_RUN = ["--no-final-checkpoint"]


def with_flag(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    if name in out:
        out[out.index(name) + 1] = value
    else:
        out += [name, value]
    return out


def prepare_data(b: Bench, text: Path | None) -> bool:
    """Our tokenizer and shards from the benchmark text, once per base dir (a second call reuses them)."""
    if (b.base / "tokenizer" / "meta.json").exists() and (b.base / "base_data").is_dir():
        return True
    if text is None or not text.is_file():
        b.report.add(f"- no benchmark text ({text}): sections on real text skipped")
        return False
    rc = b.run([b.py, "-m", "nanochat.dataset", "prepare", "--input", str(text), "--force"], "prepare")
    rc = rc or b.run([b.py, "scripts/tok_train.py", "--input", str(text), "--vocab-size", str(sizes(b.cpu)["vocab"])],
                     "prepare")
    if rc:
        b.report.add(f"- data preparation failed (exit {rc}): see logs/prepare.log")
    return rc == 0


# ---------------------------------------------------------------------------------------------
# sections


def train_d20(b: Bench, tag: str, *extra: str) -> tuple[dict | None, dict | None]:
    """A depth-20 bench run (record recipe, synthetic tokens, no final checkpoint) with `extra` flags: its
    figures, and section 1's to compare with (None where missing)."""
    rc = b.train(tag, ["--synthetic-data", *sizes(b.cpu)["d20"], *RECIPE, *BENCH_RUN, *extra])
    return b.figures(tag, rc), b.results.get("d20")


def section_d20(b: Bench, args) -> None:
    b.report.add("", "## 1. depth 20, --attention auto, bf16, whole-model compile, record recipe (synthetic tokens)")
    fig, _ = train_d20(b, "d20", "--attention", "auto")
    if fig:
        b.results["d20"] = fig
        if fig["mfu"] is not None:
            b.report.add(f"- target MFU >= 50%: {'met' if fig['mfu'] >= 0.5 else 'not met'} ({100 * fig['mfu']:.1f}%)")


def reference_flops_per_token(depth: int, seq_len: int, vocab: int) -> tuple[float, float]:
    """(FLOPs per token of the reference's depth-`depth` model by our formula with its own windows -- its
    short window is half the context, ours a quarter --, the same for our recipe's windows)."""
    from nanochat import sizing

    cfg = sizing.model_config(depth, max_seq_len=seq_len, vocab_size=vocab, window_pattern="SSSL",
                              value_embeds=True, resid_scalars=True)
    dense = 6.0 * sizing.count_params(cfg)["scaling"]
    ours = sizing.flops_per_token(cfg)
    windows = [seq_len if w >= seq_len else seq_len // 2 for w in cfg.window_sizes()]
    theirs = dense + sum(12 * cfg.n_head * cfg.head_dim * w for w in windows)
    return theirs, ours


def section_ref(b: Bench, args) -> None:
    b.report.add("", "## 2. the reference implementation at depth 20, same GPU, sequence and batch")
    src = args.carry / "reference"
    if not (src / "scripts" / "base_train.py").is_file() or args.text is None or not args.text.is_file():
        b.report.add(f"- skipped: no carried reference ({src}: run benchmarks/device_prepare.sh) or no text")
        return
    rb, site = b.base / "reference_base", b.base / "reference_site"
    (rb / "base_data_climbmix").mkdir(parents=True, exist_ok=True)
    (site / "wandb").mkdir(parents=True, exist_ok=True)
    # the reference imports wandb at module level and never calls it with --run dummy
    (site / "wandb" / "__init__.py").write_text("# inert stand-in: the reference with --run dummy only imports wandb\n")
    wheels = sorted((args.carry / "whl_ref").glob("*.whl"))
    if wheels:
        b.run([b.py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
               *map(str, wheels)], "ref_setup")
    _reference_shards(args.text, rb / "base_data_climbmix")
    others = [p for p in os.environ.get("PYTHONPATH", "").split(":") if p and Path(p).resolve() != REPO]
    env = {"PYTHONPATH": ":".join([str(src), str(site), *others]), "NANOCHAT_BASE_DIR": str(rb)}
    if b.cpu:
        env["TORCHDYNAMO_DISABLE"] = "1"  # its unconditional torch.compile takes minutes on CPU
    flags = sizes(b.cpu)["ref"]
    if not (rb / "tokenizer").is_dir():
        b.run([b.py, "-m", "scripts.tok_train", f"--vocab-size={32768 if not b.cpu else 512}",
               "--max-chars=50000000"], "ref_tok", env, cwd=src)
    commit = (args.carry / "reference_commit").read_text().strip() if (args.carry / "reference_commit").exists() else "?"
    b.report.add(f"`reference scripts.base_train {' '.join(flags)} --window-pattern=SSSL` (commit {commit})", "")
    try:
        rc = b.run([b.py, "-m", "scripts.base_train", *flags, "--window-pattern=SSSL", "--run=dummy",
                    "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1", "--warmup-steps=2"],
                   "ref_d20", env, cwd=src)
    finally:
        b.report.add("```", *reference_figures(b, flags), "```")
        import shutil

        shutil.rmtree(rb / "base_checkpoints", ignore_errors=True)
    if rc:
        b.report.add(f"- reference run failed (exit {rc}): see ref_d20.log in logs.tar.gz")


def _reference_shards(text: Path, dst: Path) -> None:
    """Its data: parquet shards with a "text" column (the last shard is its validation split)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = text.read_text().splitlines()
    texts = [json.loads(ln)["text"] if ln.lstrip().startswith("{") else ln for ln in lines if ln.strip()]
    half = max(1, len(texts) - max(1, len(texts) // 10))
    pq.write_table(pa.table({"text": texts[:half] * 4}), dst / "shard_00000.parquet")
    pq.write_table(pa.table({"text": texts[half:]}), dst / "shard_00001.parquet")


def reference_figures(b: Bench, flags: list[str]) -> list[str]:
    log = b.base / "logs" / "ref_d20.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    kv = dict(f.lstrip("-").split("=", 1) for f in flags)
    out = [ln.strip() for ln in text.splitlines() if re.search(r"flash attention|fa3|sdpa|flex|vocab size", ln, re.I)][:4]
    tok = [float(m.replace(",", "")) for m in re.findall(r"tok/sec: ([\d,]+)", text)]
    mfu = [float(m) for m in re.findall(r"mfu: ([\d.]+)", text)]
    their_flops = re.search(r"Estimated FLOPs per token: ([\d.e+]+)", text)
    if len(tok) <= b.skip:
        return out + [f"reference: {len(tok)} steps logged, none after warm-up"]
    t = statistics.median(tok[b.skip:])
    vocab = re.search(r"[Vv]ocab size: ([\d,]+)", text)
    V = int(vocab.group(1).replace(",", "")) if vocab else 32768
    theirs, ours = reference_flops_per_token(int(kv["depth"]), int(kv["max-seq-len"]), V)
    peak = _peak_flops()
    mfu_ours = f"{100 * theirs * t / peak:.1f}%" if peak else "n/a"
    b.results["ref"] = {"tok_per_sec": t}
    line = (f"reference: {t:,.0f} tok/s (median after {b.skip} steps), its own MFU "
            f"{statistics.median(mfu[b.skip:]):.1f}% " if mfu[b.skip:] else f"reference: {t:,.0f} tok/s, its MFU n/a ")
    line += (f"(its FLOPs/token {float(their_flops.group(1)):.3g}; ours for its windows {theirs:.3g}, MFU {mfu_ours}; "
             f"our recipe's windows {ours:.3g})" if their_flops else f"(ours for its windows {theirs:.3g}, MFU {mfu_ours})")
    out.append(line)
    if "d20" in b.results:
        ratio = b.results["d20"]["tok_per_sec"] / t
        out.append(f"ours / reference tok/s: {ratio:.2f}x (target >= 1.0x; ours computes {ours / theirs:.2f}x the "
                   f"attention-inclusive FLOPs per token of theirs)")
    return out


def _peak_flops() -> float | None:
    try:
        import torch

        from nanochat.common import get_peak_flops

        return get_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001  (a figure, never a failure of the bench)
        return None


def section_fp8(b: Bench, args) -> None:
    b.report.add("", "## 3. depth 24: bf16 vs --fp8, same data and steps (real text, our tokenizer)")
    if not prepare_data(b, args.text):
        return
    d24 = [*sizes(b.cpu)["d24"], *RECIPE, *QUIET, *BENCH_RUN]
    figs = {}
    rc = b.train("d24_bf16", d24)
    figs["d24_bf16"] = b.figures("d24_bf16", rc)
    rc = b.train("d24_fp8", [*d24, "--fp8"])
    if b.cpu:  # no fp8 tensor cores: the refusal is what the CPU check checks
        b.report.add(f"- --fp8 on CPU: exit {rc} ({'refused, as it must be' if rc == 2 else 'NOT refused'})")
    else:
        figs["d24_fp8"] = b.figures("d24_fp8", rc)
    bf, f8 = figs.get("d24_bf16"), figs.get("d24_fp8")
    if bf:
        b.report.add(f"- bf16 loss {bf['last_loss']:.4f} after {bf['steps']} steps")
    if bf and f8:
        b.report.add(f"- fp8 loss {f8['last_loss']:.4f} ({100 * (f8['last_loss'] / bf['last_loss'] - 1):+.2f}% vs bf16); "
                     f"fp8 / bf16 tok/s {f8['tok_per_sec'] / bf['tok_per_sec']:.2f}x (target >= 1.15x)")
    for tag, fig in figs.items():
        if fig:
            b.report.add(f"- {tag}: {time_to_gpt2(b.checkpoints / tag, fig)}")


def time_to_gpt2(run_dir: Path, fig: dict, gpus: int = 8) -> str:
    """The record recipe (d24, 32K vocab, tokens:params 8) at the FLOP rate this run achieved on one GPU,
    times perfect scaling over `gpus`, no evaluation time: the time-to-GPT-2 estimate (target < 1.5 h)."""
    from nanochat import sizing
    from nanochat.run_dir import read_run_json

    target = sizing.model_config(24, vocab_size=32768, window_pattern="SSSL", value_embeds=True, resid_scalars=True)
    total = sizing.flops_per_token(target) * 8 * sizing.count_params(target)["scaling"]
    info = read_run_json(run_dir) or {}
    per_token = (info.get("sizing") or {}).get("flops_per_token")
    if not per_token:
        return "time-to-GPT-2 estimate n/a (no run.json sizing)"
    rate = per_token * fig["tok_per_sec"]
    return (f"time-to-GPT-2 estimate on {gpus} GPUs {total / (gpus * rate) / 3600:.2f} h ({total:.3g} FLOPs at "
            f"{gpus} x {rate / 1e12:.0f} TFLOP/s; linear scaling, no evaluations; target < 1.5 h)")


def section_tests(b: Bench, args) -> None:
    b.report.add("", "## 4. cuda-marked tests (tests/test_cuda.py)", "")
    try:
        rc = b.run([b.py, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider"], "tests")
    finally:
        log = b.base / "logs" / "tests.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
        b.report.add("```", *tail, "```")
    b.report.add(f"- pytest exit {rc}")


def section_backends(b: Bench, args) -> None:
    b.report.add("", "## 5. depth 20 with each other attention backend available here")
    from nanochat.attention import ATTENTION_CHOICES

    auto_name = _resolved_attention(b, "d20")
    for name in [n for n in ATTENTION_CHOICES if n != "auto"]:
        why = _unavailable(name, b.cpu)
        if why:
            b.report.add(f"- {name}: not available ({why})")
            continue
        if name == auto_name:
            b.report.add(f"- {name}: what auto chose (section 1)")
            continue
        train_d20(b, f"d20_{name.replace('-', '_')}", "--attention", name)


def _resolved_attention(b: Bench, tag: str) -> str | None:
    log = b.base / "logs" / f"{tag}.log"
    m = re.search(r"^\s+attention\s+(\S+)", log.read_text(errors="replace"), re.M) if log.exists() else None
    return m.group(1) if m else None


def _unavailable(name: str, cpu: bool) -> str | None:
    import torch

    from nanochat.attention import unavailable_reason

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    return unavailable_reason(name, device, torch.bfloat16 if device == "cuda" else torch.float32)


def section_auto(b: Bench, args) -> None:
    b.report.add("", "## 6. --device-batch-size auto, depth 20 (record recipe, --attention auto)")
    flags = with_flag(with_flag(sizes(b.cpu)["d20"], "--device-batch-size", "auto"), "--num-iterations", "5")
    rc = b.train("d20_auto", ["--synthetic-data", *flags, *RECIPE, *BENCH_RUN], env={"TORCH_LOGS": "recompiles"})
    b.figures("d20_auto", rc)
    log = (b.base / "logs" / "d20_auto.log").read_text(errors="replace")
    after = log.split("--device-batch-size auto:")[-1] if "--device-batch-size auto:" in log else ""
    b.report.add(f"- recompilations logged after the probe chose its size: {after.count('Recompiling')}"
                 " (0 expected: the probe's inputs are laid out as the loader's)")


def section_head(b: Bench, args) -> None:
    b.report.add("", "## 7. LM head at depth 20: --fused-loss on (chunked, eager) vs section 1's auto (plain, compiled)")
    fig, d20 = train_d20(b, "d20_fused", "--fused-loss", "on")
    if fig and d20:
        b.report.add(f"- fused / plain tok/s {fig['tok_per_sec'] / d20['tok_per_sec']:.2f}x, peak memory "
                     f"{fig['peak_mem_mb'] / 1024:.1f} vs {d20['peak_mem_mb'] / 1024:.1f} GiB")


def section_scope(b: Bench, args) -> None:
    b.report.add("", "## 8. depth 20, --compile-scope blocks vs section 1's whole-model compile")
    compile_flag = [] if b.cpu else ["--compile"]  # the CPU check stays eager: Inductor takes minutes there
    fig, d20 = train_d20(b, "d20_blocks", *compile_flag, "--compile-scope", "blocks")
    if fig and d20:
        b.report.add(f"- blocks / model tok/s {fig['tok_per_sec'] / d20['tok_per_sec']:.2f}x, compile "
                     f"{fig['compile_s']:.0f} vs {d20['compile_s']:.0f} s")


def section_resume(b: Bench, args) -> None:
    s = sizes(b.cpu)
    b.report.add("", f"## 9. depth 12: run A; run B SIGKILLed in step {s['hang_step'] + 1}, resumed from step "
                     f"{s['resume_step']} (real text)")
    if not prepare_data(b, args.text):
        return
    import shutil

    for tag in ("d12_a", "d12_b"):
        shutil.rmtree(b.checkpoints / tag, ignore_errors=True)
    d12 = [*s["d12"], *QUIET, "--warmup-steps", "2", "--weight-decay", "0"]
    rc = b.train("d12_a", d12)
    b.figures("d12_a", rc)
    b.train("d12_b", d12, env={"NANOCHAT_TEST_HANG_STEP": str(s["hang_step"])}, until=r"hanging at step")
    rc = b.train("d12_b", [*d12, "--resume", "latest"])
    out = subprocess.run([b.py, "benchmarks/smoke_report.py", "compare", str(b.checkpoints / "d12_a"),
                          str(b.checkpoints / "d12_b")], capture_output=True, text=True, cwd=REPO)
    resumed = [ln for ln in (b.base / "logs" / "d12_b.log").read_text().splitlines() if ln.startswith("resumed")]
    b.report.add("```", *(out.stdout.strip().splitlines() or [out.stderr.strip()]), *resumed, "```",
                 "- (CUDA resumes agree within float rounding, not bit for bit: docs/multinode.md)")


CORE_SCRIPT = r"""
import sys, time
import torch
from nanochat import checkpoint_manager as ckpt
from nanochat.core_eval import evaluate_core
from nanochat.tokenizer import get_tokenizer
folder, per_task = sys.argv[1], int(sys.argv[2])
device = "cuda" if torch.cuda.is_available() else "cpu"
step = ckpt.find_last_step(folder)
meta = ckpt.load_meta(folder, step)
model = ckpt.build_model(meta["model_config"], device)
state, _, _ = ckpt.load_checkpoint(folder, step, device=device)
ckpt.load_state_into(model, state)
model.eval()
model.before_compile()
compiled = torch.compile(model, dynamic=True) if device == "cuda" else model
t0 = time.time()
out = evaluate_core(compiled, get_tokenizer(), device, max_per_task=per_task, verbose=False)
print(f"CORE {out['core']:.4f} at step {step} ({per_task} per task, {'compiled' if device == 'cuda' else 'eager'}), "
      f"{time.time() - t0:.1f} s including compilation")
"""


def section_core(b: Bench, args) -> None:
    per_task = sizes(b.cpu)["core_per_task"]
    b.report.add("", f"## 10. CORE, {per_task} examples per task, through the compiled model (run d12_a)", "")
    bundle = os.environ.get("NANOCHAT_EVAL_BUNDLE")
    if not bundle or not (b.checkpoints / "d12_a").is_dir():
        b.report.add("- skipped: no eval bundle or no d12_a checkpoint (section resume makes it)")
        return
    try:
        rc = b.run([b.py, "-c", CORE_SCRIPT, str(b.checkpoints / "d12_a"), str(per_task)], "core")
    finally:
        log = b.base / "logs" / "core.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("CORE")] if log.exists() else []
        b.report.add("```", *(lines or ["no CORE result"]), "```")
    if rc:
        b.report.add(f"- exit {rc}: see core.log in logs.tar.gz")


SECTION_FUNCS = {"d20": section_d20, "ref": section_ref, "fp8": section_fp8, "tests": section_tests,
                 "backends": section_backends, "auto": section_auto, "head": section_head, "scope": section_scope,
                 "resume": section_resume, "core": section_core}


# ---------------------------------------------------------------------------------------------
# driver


def run_sections(b: Bench, names: list[str], args, funcs: dict | None = None) -> dict[str, str]:
    """Run the sections in order; each ends as done, failed, cut (at the budget) or skipped (no budget
    left to start). Returns {name: outcome}; the report and the logs archive are current after each."""
    funcs = funcs or SECTION_FUNCS
    outcomes = {}
    for name in names:
        if b.budget.left() < MIN_START_S:
            outcomes[name] = "skipped"
            b.report.add("", f"## {name}: skipped ({b.budget.left():.0f} s of the {b.budget.seconds:.0f} s budget left)")
            continue
        b.say(f"section {name} ({b.budget.left():.0f} s left)")
        t0 = time.monotonic()
        try:
            funcs[name](b, args)
            outcomes[name] = "done"
        except SectionCut as e:
            outcomes[name] = "cut"
            b.report.add(f"- **{name}: cut at the budget** ({e}); its figures above are what the run had logged")
            tag = {"d20": "d20", "auto": "d20_auto", "head": "d20_fused", "scope": "d20_blocks"}.get(name)
            if tag:
                fig = throughput(b.checkpoints / tag, b.skip)
                if fig:
                    b.report.add(f"- partial: {format_figures(tag, fig)}")
        except Exception as e:  # noqa: BLE001  (one section's failure must not cost the others' figures)
            outcomes[name] = "failed"
            b.report.add(f"- **{name}: failed** ({type(e).__name__}: {e})")
        b.report.add(f"- section {name}: {outcomes[name]} in {time.monotonic() - t0:.0f} s "
                     f"(bench at {b.budget.elapsed():.0f} s)")
        b.pack_logs()
    return outcomes


def header(b: Bench, argv: list[str]) -> list[str]:
    try:
        import torch

        machine = (f"torch {torch.__version__} | cuda {torch.version.cuda} | "
                   f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    except Exception as e:  # noqa: BLE001
        machine = f"torch not importable ({e})"
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip() if not b.cpu and _has("nvidia-smi") else "n/a"
    commit = os.environ.get("NANOCHAT_COMMIT") or _git_commit()
    return [f"# GPU benchmarks {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
            f"- machine: {machine} | driver {driver or 'n/a'}", f"- commit: {commit}",
            f"- command: python benchmarks/gpu_bench.py {' '.join(argv)}".rstrip(),
            f"- budget: {b.budget.seconds:.0f} s; base dir {b.base} (Inductor cache inside, reused by a later call)",
            "- MFU: FLOPs per token (6 x matmul params + attention over each layer's window) x tok/s / dense bf16 peak",
            *(["- --cpu: toy sizes on CPU, a check of the script only (no figures to quote)"] if b.cpu else []), ""]


def _has(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return out.stdout.strip() or "unknown"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sections", default=None, help=f"comma-separated, run in this order: {','.join(SECTIONS)}")
    p.add_argument("--call", type=int, choices=sorted(CALLS), help="the sections of documented call N (--calls)")
    p.add_argument("--calls", action="store_true", help="print the documented calls and exit")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_BENCH_BUDGET_S", 540)),
                   help="seconds for all sections together (default 540: a 600 s command limit keeps a margin)")
    p.add_argument("--cpu", action="store_true", default=bool(os.environ.get("GPU_BENCH_CPU")),
                   help="toy sizes on CPU: checks the script, measures nothing")
    p.add_argument("--base-dir", type=Path, default=Path(os.environ.get("NANOCHAT_BASE_DIR", DEFAULT_BASE)))
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="where gpu.md and logs.tar.gz go (default $OUT, else <base dir>/out)")
    p.add_argument("--carry", type=Path, default=REPO / ".device_carry")
    p.add_argument("--text", type=Path, default=None, help="benchmark text (default: shared or carried c4 sample)")
    args = p.parse_args(argv)
    if args.sections and args.call:
        p.error("give --sections or --call, not both")
    names = CALLS[args.call] if args.call else (args.sections.split(",") if args.sections else SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    args.names = [n for n in SECTIONS if n in names]  # always in value order
    if args.text is None:
        for cand in (REPO.parent / "shared/data/text/c4/c4_en_train_first1000.jsonl",
                     args.carry / "data/c4_en_train_first1000.jsonl"):
            if cand.is_file():
                args.text = cand
                break
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.calls:
        for n, names in CALLS.items():
            print(f"call {n}: --call {n}  = --sections {','.join(names)}  ({CALL_COST[n]})")
        return 0
    base = args.base_dir.resolve()
    out = (args.out or base / "out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    (base / "inductor_cache").mkdir(parents=True, exist_ok=True)
    env = {"NANOCHAT_BASE_DIR": str(base), "TORCHINDUCTOR_CACHE_DIR": str(base / "inductor_cache"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])}
    if args.cpu:
        env["OMP_NUM_THREADS"] = "1"
    for name in ("NANOCHAT_TEST_NAN_STEP", "NANOCHAT_TEST_HANG_STEP"):
        os.environ.pop(name, None)
    os.environ.update(env)  # for the figures computed in this process too (nanochat imports, CORE)
    b = Bench(Report(out / "gpu.md"), Budget(args.budget), base, out, args.cpu, env=env)
    b.report.add(*header(b, argv))
    b.say(f"sections {','.join(args.names)}; budget {args.budget:.0f} s; report {b.report.path}")
    outcomes = run_sections(b, args.names, args)
    b.report.add("", f"total wall time {b.budget.elapsed():.0f} s (budget {args.budget:.0f} s): "
                     + ", ".join(f"{k} {v}" for k, v in outcomes.items()))
    b.say(f"done: {b.report.path}")
    print(b.report.path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
