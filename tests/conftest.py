"""Shared test fixtures.

`shared_data` points at the real data beside the checkout (`../shared/data`, or `NANOCHAT_SHARED_DATA`);
tests that use it skip cleanly when it is absent. `base_dir` isolates the artifact directory.
"""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The default compute dtype (`auto`) depends on the machine: bf16 on AMX / AVX512-BF16 CPUs (measured by
# nanochat.common.probe_cpu_dtype), fp32 elsewhere. Tests pin fp32 so that their numbers, and the exact
# comparisons between runs (resume, 1 rank vs 2), are the same on every CI box; subprocesses inherit it.
# tests/test_common.py and the bf16 tests unset it or pass --dtype where they test the policy itself.
os.environ.setdefault("NANOCHAT_DTYPE", "float32")
# Likewise the thread count: `auto` (nanochat/cpu_threads.py) would follow the CI box's load mid-run, and
# MKL's results depend (in the last bits) on the threads; pinned to torch's default, subprocesses inherit it.
os.environ.setdefault("NANOCHAT_THREADS", str(torch.get_num_threads()))


def _shared_data_dir() -> Path:
    env = os.environ.get("NANOCHAT_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set NANOCHAT_SHARED_DATA)")
    return path


@pytest.fixture
def base_dir(tmp_path, monkeypatch) -> Path:
    """A fresh NANOCHAT_BASE_DIR for one test."""
    d = tmp_path / "nanochat_base"
    d.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(d))
    return d


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def shared_data_optional() -> Path | None:
    """Like `shared_data`, but None instead of a skip (for tests that run either way)."""
    path = _shared_data_dir()
    return path if path.is_dir() else None
