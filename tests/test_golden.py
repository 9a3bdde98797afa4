"""Golden-loss test: a fixed-seed CPU run whose per-step losses and final val bpb are pinned.

A depth-2 model trains for 30 steps on the embedded corpus (the first 600 KJV chapters) with a
512-token tokenizer trained on the same text, in fp32 on one thread. Any change to the numbers the
code computes (model, optimizer, schedules, data order, loss, bpb) shows here. The stored file was
written by the code *before* the structure refactor; refactors must reproduce it to 1e-6 relative.

The golden figures depend on the CPU's kernels (MKL picks AVX-512 or AVX2 code paths whose rounding
differs), so the file records the instruction set it was made on; on another one the comparison falls
back to 1e-3 relative, which still catches any real change of the computation.

Regenerate (only for a deliberate change of the numerics, in its own commit):
    python -m tests.test_golden --update
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parent / "golden" / "base_train_d2.json"
TAG = "golden"
FLAGS = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "64",
         "--device-batch-size", "4", "--total-batch-size", "512", "--num-iterations", "30",
         "--warmup-steps", "2", "--eval-every", "-1", "--eval-tokens", "4096", "--core-metric-every", "0",
         "--sample-every", "0", "--weight-decay", "0.01", "--device-type", "cpu", "--dtype", "float32",
         "--seed", "7", "--model-tag", TAG]


def cpu_isa() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else "other")


def build_base(base: Path) -> None:
    from nanochat.data_prep import embedded_documents, prepare
    from nanochat.tokenizer import Tokenizer

    docs = embedded_documents(install=False)[:600]
    tok = Tokenizer.train_from_iterator(docs, vocab_size=512)
    tok.save(base / "tokenizer")
    prepare(docs, data_dir=base / "base_data", val_fraction=0.1, rows_per_group=32, verbose=False)


def run_golden(base: Path) -> dict:
    import os

    from scripts.base_train import main

    old_env = os.environ.get("NANOCHAT_BASE_DIR")
    threads = torch.get_num_threads()
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    torch.set_num_threads(1)
    try:
        rc = main(list(FLAGS))
    finally:
        torch.set_num_threads(threads)
        if old_env is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old_env
    assert rc == 0
    records = [json.loads(line) for line in
               (base / "base_checkpoints" / TAG / "metrics.jsonl").read_text().splitlines()]
    return {"raw_loss": [r["raw_loss"] for r in records],
            "val_bpb": records[-1]["val_bpb"], "val_loss": records[-1]["val_loss"]}


def test_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    build_base(tmp_path)
    got = run_golden(tmp_path)
    rel = 1e-6 if golden["isa"] == cpu_isa() else 1e-3
    assert len(got["raw_loss"]) == len(golden["raw_loss"])
    for step, (a, b) in enumerate(zip(got["raw_loss"], golden["raw_loss"]), start=1):
        assert a == pytest.approx(b, rel=rel), f"step {step}: loss {a!r} != golden {b!r}"
    assert got["val_bpb"] == pytest.approx(golden["val_bpb"], rel=rel)
    assert got["val_loss"] == pytest.approx(golden["val_loss"], rel=rel)
    assert got["raw_loss"][-1] < got["raw_loss"][0] - 0.2  # it learns: not a run of constants


def _update() -> None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        build_base(Path(d))
        got = run_golden(Path(d))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=GOLDEN.parent).stdout.strip()
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"isa": cpu_isa(), "torch": torch.__version__, "commit": commit,
                                  "flags": FLAGS, **got}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {got}")


if __name__ == "__main__":
    if "--update" in sys.argv:
        _update()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
