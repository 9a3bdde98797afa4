"""The one GPU peak table (nanochat/gpus.py): forgiving names, the most specific entry, and GeForce figures
that follow the whitepapers' rule (SMs x boost clock x 512 FLOP/clock at fp32 accumulate)."""

import re

import pytest

from nanochat.gpus import GPUS, find_gpu, peak_flops


@pytest.mark.parametrize("name, expect", [
    ("4070", "RTX 4070"), ("RTX 4070", "RTX 4070"), ("NVIDIA GeForce RTX 4070", "RTX 4070"), ("rtx4070", "RTX 4070"),
    ("RTX 4070 Ti", "RTX 4070 Ti"), ("rtx4070ti", "RTX 4070 Ti"), ("NVIDIA GeForce RTX 4070 Ti SUPER", "RTX 4070 Ti SUPER"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("h100", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA H20", "H20"), ("NVIDIA GB200", "GB200"),
    ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"), ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"), ("NVIDIA RTX A6000", "RTX A6000"),
    ("AMD Instinct MI300X", "MI300X"), ("NVIDIA GeForce RTX 5090", "RTX 5090"), ("Tesla V100-SXM2-16GB", "V100"),
])
def test_names_match_forgivingly(name, expect):
    assert find_gpu(name).name == expect


def test_unknown_is_none_never_a_guess():
    for name in ("voodoo5", "Quadro RTX 6000", "RTX 6000", "", None, "NVIDIA GeForce GTX 1080"):
        assert find_gpu(name) is None, name
    assert peak_flops("Tesla V100-SXM2-16GB") is None and peak_flops("V100", bf16_only=False) == 125e12


def test_geforce_figures_follow_the_whitepaper_rule():
    """Each GeForce entry's source names its SM count and boost clock; its peak must be SMs x GHz x 512."""
    checked = 0
    for gpu in GPUS:
        m = re.search(r"\((\d+) SMs, ([\d.]+) GHz", gpu.source)
        if m:
            assert gpu.peak_flops == pytest.approx(int(m[1]) * float(m[2]) * 1e9 * 512, rel=0.006), gpu.name
            checked += 1
    assert checked >= 20


def test_every_entry_names_its_source_and_is_unique():
    names = [g.name for g in GPUS]
    assert len(names) == len(set(names))
    for g in GPUS:
        assert g.source and 1e13 < g.peak_flops < 1e16 and find_gpu(g.name) is g
