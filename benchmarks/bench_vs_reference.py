"""Our training step against the reference implementation's (karpathy/nanochat), side by side.

    python benchmarks/bench_vs_reference.py --reference-dir /tmp/refnc            # d4 / seq 256 / 2,048-token steps / 32K
    python benchmarks/bench_vs_reference.py --reference-dir /tmp/refnc --rounds 3 --configs ours-auto,ref,ours-fp32

`--reference-dir` is a folder holding the reference's `nanochat/` package (a checkout made outside
this repository; nothing of it is copied here). The first run prepares, in `--work-dir`, a 32K
tokenizer trained on `--text` (default ../shared/data/text), the text as shards, and a file of its
token ids for the reference. Then it runs the configurations in interleaved rounds (the order
rotates each round) so that a machine shared with other work slows them alike, and prints the
median tok/s of each with the load average and the CPU's matrix features:

- ours-auto / ours-fp32 / ours-bf16: `benchmarks/bench_train.py --real-data` (the real loop, real
  tokenizer and data loader) with `--dtype auto|float32|bfloat16`; ours-auto-synth: synthetic tokens
  (what the data loader costs); ours-auto-compile: with `--compile`.
- ref: `benchmarks/reference_step.py` (its model compiled as its base_train does, its fp32 CPU
  dtype, its optimizer) on the same real-text tokens; ref-eager: its model uncompiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "ours-auto": ["--dtype", "auto"],
    "ours-fp32": ["--dtype", "float32"],
    "ours-bf16": ["--dtype", "bfloat16"],
    "ours-auto-synth": ["--dtype", "auto", "SYNTH"],
    "ours-auto-compile": ["--dtype", "auto", "--compile"],
    "ref": [],
    "ref-eager": ["--no-compile"],
}


def cpu_summary() -> str:
    model, flags = "?", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    feats = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {' '.join(feats) or 'no AVX2'}"


def prepare(work: Path, text: Path, vocab_size: int, env: dict) -> Path:
    """tokenizer/, base_data/ and tokens.npy in `work` (made once)."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "tokenizer" / "meta.json").is_file():
        print(f"training a {vocab_size:,}-token tokenizer on {text} ...", flush=True)
        subprocess.run([sys.executable, "-m", "scripts.tok_train", "--input", str(text), "--vocab-size", str(vocab_size),
                        "--out-dir", str(work / "tokenizer")], check=True, cwd=ROOT, env=env)
    if not (work / "base_data").is_dir():
        print(f"preparing shards of {text} ...", flush=True)
        subprocess.run([sys.executable, "-m", "nanochat.dataset", "prepare", "--input", str(text), "--data-dir",
                        str(work / "base_data")], check=True, cwd=ROOT, env=env)
    tokens = work / "tokens.npy"
    if not tokens.is_file():
        import numpy as np

        sys.path.insert(0, str(ROOT))
        from nanochat import dataset
        from nanochat.tokenizer import Tokenizer

        tok = Tokenizer.from_directory(work / "tokenizer")
        ids: list[int] = []
        for doc in dataset.iter_documents("train", work / "base_data"):
            ids += [tok.get_bos_token_id()] + tok.encode(doc)
            if len(ids) >= 400_000:
                break
        np.save(tokens, np.array(ids, dtype=np.int32))
    return work


def run_one(name: str, args, work: Path, env: dict) -> dict:
    extra = CONFIGS[name]
    common = ["--depth", str(args.depth), "--max-seq-len", str(args.max_seq_len),
              "--device-batch-size", str(args.device_batch_size), "--steps", str(args.steps), "--skip", str(args.skip)]
    if name.startswith("ref"):
        cmd = [sys.executable, str(ROOT / "benchmarks" / "reference_step.py"), "--reference-dir", str(args.reference_dir),
               "--tokens", str(work / "tokens.npy"), "--vocab-size", str(args.vocab_size)] + common + extra
        run_env = dict(env, PYTHONPATH=str(args.reference_dir))
        cwd = args.reference_dir
    else:
        data = ["--vocab-size", str(args.vocab_size)] if "SYNTH" in extra else ["--real-data", str(work)]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--no-breakdown", "--json",
               "--total-batch-size", str(args.device_batch_size * args.max_seq_len)] + common + data + \
              [e for e in extra if e != "SYNTH"]
        run_env = dict(env, PYTHONPATH=str(ROOT))
        cwd = ROOT
    load0 = os.getloadavg()[0]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=run_env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(name=name, wall=time.time() - t0, load=(load0 + os.getloadavg()[0]) / 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/nanochat_vs_reference"))
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "text")
    p.add_argument("--configs", default="ours-auto,ref,ours-fp32")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args()
    names = args.configs.split(",")
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        p.error(f"unknown configs {bad}: choose from {sorted(CONFIGS)}")
    if any(n.startswith("ref") for n in names) and not (args.reference_dir / "nanochat" / "gpt.py").is_file():
        p.error(f"{args.reference_dir} has no nanochat/gpt.py: point --reference-dir at a checkout of the reference")
    env = {k: v for k, v in os.environ.items() if k not in ("NANOCHAT_DTYPE", "PYTHONPATH")}
    env["NANOCHAT_BASE_DIR"] = str(args.work_dir)  # the dtype probe's cache lives here too
    work = prepare(args.work_dir, args.text, args.vocab_size, dict(env, PYTHONPATH=str(ROOT)))
    print(f"CPU: {cpu_summary()}; load average at start {os.getloadavg()}", flush=True)
    results: list[dict] = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            res = run_one(name, args, work, env)
            results.append(res)
            print(f"round {r + 1} {name:18s} {res['tok_per_sec']:8,.0f} tok/s  step {res['step_s'] * 1000:6.0f} ms  "
                  f"first {res['first_step_s']:6.1f} s  dtype {res.get('dtype')}  load {res['load']:.1f}", flush=True)
    print("\n| config | median tok/s | runs (tok/s) | median step | first step | mean load |\n|---|---|---|---|---|---|")
    med = {}
    for name in names:
        rs = [x for x in results if x["name"] == name]
        med[name] = statistics.median(x["tok_per_sec"] for x in rs)
        runs = ", ".join(f"{x['tok_per_sec']:,.0f}" for x in rs)
        print(f"| {name} | **{med[name]:,.0f}** | {runs} | "
              f"{statistics.median(x['step_s'] for x in rs) * 1000:.0f} ms | "
              f"{statistics.median(x['first_step_s'] for x in rs):.1f} s | {statistics.mean(x['load'] for x in rs):.1f} |")
    if "ref" in med:
        for name in names:
            if name.startswith("ours"):
                print(f"{name} / ref: {med[name] / med['ref']:.2f}x")
    print(f"CPU: {cpu_summary()}; load average at end {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"cpu": cpu_summary(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
