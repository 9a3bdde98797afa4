"""Runtime context: device and dtype policy, base dir, peak FLOPs, and a real 2-process gloo group."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat import common
from tests.helpers import free_port


def test_import_has_no_side_effects(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "never"), HOME=str(tmp_path / "home"))
    code = "import nanochat, nanochat.common, nanochat.gpt, nanochat.sizing, nanochat.engine"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=common.__file__.rsplit("/nanochat/", 1)[0])
    assert not (tmp_path / "never").exists() and not (tmp_path / "home").exists()


def test_base_dir_override(base_dir):
    assert common.get_base_dir() == base_dir


def test_base_dir_default(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == tmp_path / ".cache" / "nanochat"
    assert (tmp_path / ".cache" / "nanochat").is_dir()


def test_device_and_dtype_policy(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    monkeypatch.delenv("NANOCHAT_DEVICE", raising=False)
    assert common.autodetect_device_type() == ("cuda" if torch.cuda.is_available() else
                                               "mps" if torch.backends.mps.is_available() else "cpu")
    assert common.resolve_dtype("cpu", "fp32") == torch.float32
    assert common.resolve_dtype("cpu", "bf16") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    assert common.resolve_dtype("cpu") == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        common.resolve_dtype("cpu", "fp8")
    with pytest.raises(ValueError, match="unknown device"):
        common.autodetect_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            common.autodetect_device_type("cuda")


def test_context_single_process(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    ctx = common.init_runtime("cpu", "fp16", seed=5)
    assert (ctx.rank, ctx.world_size, ctx.ddp, ctx.is_master) == (0, 1, False, True)
    assert ctx.needs_grad_scaler and ctx.peak_flops is None
    a = torch.rand(3)
    common.set_seed(5)
    assert torch.equal(a, torch.rand(3))
    ctx.teardown()


def test_peak_flops_table():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.get_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.get_peak_flops("NVIDIA H200") == 989e12
    assert common.get_peak_flops("NVIDIA H200 NVL") == 835e12  # its datasheet: 1,671 sparse; not the H20 entry
    assert common.get_peak_flops("NVIDIA H20") == 148e12
    assert common.get_peak_flops("NVIDIA B200") == 2.25e15
    assert common.get_peak_flops("NVIDIA GB200") == 2.5e15
    assert common.get_peak_flops("NVIDIA L40S") == 362e12
    assert common.get_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert common.get_peak_flops("NVIDIA GeForce RTX 4080") == 97.5e12
    assert common.get_peak_flops("NVIDIA GeForce RTX 3090") == 71e12
    assert common.get_peak_flops("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores: unknown
    assert common.get_peak_flops("Some Future GPU") is None  # unknown, not 0
    assert common.get_peak_flops(None) is None


def test_two_process_gloo_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent("""
        import sys, torch, torch.distributed as dist
        from nanochat.common import init_runtime
        ctx = init_runtime("cpu")
        assert ctx.ddp and ctx.backend == "gloo" and ctx.world_size == 2
        t = torch.tensor([ctx.rank + 1.0])
        dist.all_reduce(t)
        ctx.barrier()
        print(f"rank={ctx.rank} local={ctx.local_rank} sum={t.item()}")
        # --dtype auto: each rank measures, all take rank 0's result (timings never agree on their own)
        auto = init_runtime("cpu", "auto", seed=None)
        seen = [None, None]
        dist.all_gather_object(seen, (auto.dtype, auto.dtype_probe.gflops))
        assert seen[0] == seen[1], seen
        ctx.teardown()
        assert not dist.is_initialized()
    """))
    repo = common.__file__.rsplit("/nanochat/", 1)[0]
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", NANOCHAT_BASE_DIR=str(tmp_path / "base"))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(script)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "rank=0 local=0 sum=3.0" in out.stdout and "rank=1 local=1 sum=3.0" in out.stdout


def test_cpu_dtype_probe_measures_once_and_is_cached(base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    shapes = common.matmul_probe_shapes(n_embd=64, tokens=128, vocab_size=1000)
    assert shapes == ((128, 64, 64), (128, 64, 256), (128, 256, 64), (1000, 64, 128))
    first = common.probe_cpu_dtype(shapes, budget_s=0.05)
    assert not first.cached and first.seconds > 0 and set(first.gflops) == {"float32", "bfloat16"}
    assert all(v > 0 for v in first.gflops.values())
    # the rule: bf16 only where its GEMMs are clearly faster
    assert (first.dtype == torch.bfloat16) == (first.gflops["bfloat16"] >= common.BF16_MIN_SPEEDUP * first.gflops["float32"])
    again = common.probe_cpu_dtype(shapes)
    assert again.cached and again.dtype == first.dtype and again.gflops == first.gflops
    cache = json.loads((base_dir / common.DTYPE_PROBE_FILE).read_text())
    (key,) = cache
    assert torch.__version__ in key and f"threads {torch.get_num_threads()}" in key
    # auto resolves through the probe (default shapes: a second entry), an explicit dtype never probes
    ctx = common.init_runtime("cpu", "auto", seed=None, probe_shapes=shapes)
    assert ctx.dtype == first.dtype and ctx.dtype_probe.cached and "GEMM probe" in ctx.dtype_summary()
    assert ctx.orth_dtype == (torch.bfloat16 if first.dtype == torch.bfloat16 else torch.float32)
    assert common.init_runtime("cpu", "float32", seed=None).dtype_probe is None
    assert common.init_runtime("cpu", "float32", seed=None).orth_dtype == torch.float32
    # a corrupt cache is measured again, not an error
    (base_dir / common.DTYPE_PROBE_FILE).write_text("{not json")
    assert not common.probe_cpu_dtype(shapes, budget_s=0.01).cached


def test_cpu_allocator_tuning_applies_once_and_yields_to_the_users_malloc_settings():
    import subprocess
    import sys

    code = "from nanochat.common import tune_cpu_allocator as t; print(t(), t())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    if sys.platform.startswith("linux"):
        assert out.stdout.split() == ["True", "True"]
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=dict(env, MALLOC_ARENA_MAX="2"))
    assert mine.stdout.split() == ["False", "False"]


def test_dtype_probe_cache_key_names_the_instruction_set(monkeypatch):
    """The same CPU limited to AVX2 (MKL / oneDNN / ATen variables) emulates bf16: a cached AMX result
    must not be reused there."""
    from nanochat.common import ISA_ENV, _probe_key

    for k in ISA_ENV:
        monkeypatch.delenv(k, raising=False)
    plain = _probe_key(((8, 8, 8),))
    assert "isa " in plain
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert _probe_key(((8, 8, 8),)) != plain and "MKL_ENABLE_INSTRUCTIONS=AVX2" in _probe_key(((8, 8, 8),))
