"""Dense peak matmul FLOP/s of GPUs, the one table for the whole project: MFU in training
(`common.get_peak_flops`), the planner, and the run doctor's re-basing of other programs' MFU.

Peaks are dense (no 2:4 sparsity) bf16 tensor-core rates with fp32 accumulation, which is what
PyTorch's bf16 matmuls run at. Vendor datasheets usually print the sparse figure: halve it. GeForce
cards run fp32-accumulate at half their fp16-accumulate rate (NVIDIA's Ampere GA102, Ada and RTX
Blackwell whitepapers: "Peak FP16 Tensor TFLOPS with FP32 Accumulate"), so for them the dense bf16
peak is SMs x boost clock x 512 FLOP/clock (e.g. RTX 4090: 128 x 2.52 GHz x 512 = 165.2 TFLOP/s,
the whitepaper's figure); workstation and data-centre cards do not halve it. V100 and T4 have no
bf16 tensor cores: their fp16 peak is listed with `bf16=False` (the training loop, which trains in
bf16, treats them as unknown; the doctor can still re-base an fp16 run on them).

Names are matched forgivingly: "4070", "RTX 4070", "NVIDIA GeForce RTX 4070" and "rtx4070" all find
the RTX 4070 (and not the 4070 Ti); "NVIDIA H100 80GB HBM3" finds the H100 SXM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense, FLOP/s
    source: str  # where the figure comes from
    bf16: bool = True  # False: no bf16 tensor cores; peak_flops is the fp16 rate


_ADA = "NVIDIA Ada GPU architecture whitepaper / RTX 40 spec page: SMs x boost x 512 (fp32 accumulate)"
_AMPERE_GEFORCE = "NVIDIA Ampere GA102 whitepaper: SMs x boost x 512 (fp32 accumulate)"
_BLACKWELL_GEFORCE = "NVIDIA RTX Blackwell whitepaper (RTX 5090: 209.5 fp32-acc dense): SMs x boost x 512"
_PRO = "NVIDIA RTX workstation datasheet (sparse tensor TFLOPS / 2, or fp8 sparse / 4)"

GPUS: tuple[GPU, ...] = (
    # data centre, NVIDIA (datasheets print sparse figures; dense = half)
    GPU("H100 SXM", 989e12, "H100 datasheet: BF16 1,979 TFLOPS sparse"),
    GPU("H100 PCIe", 756e12, "H100 datasheet: BF16 1,513 TFLOPS sparse"),
    GPU("H100 NVL", 835e12, "H100 NVL datasheet: BF16 1,671 TFLOPS sparse"),
    GPU("H200 NVL", 835e12, "H200 datasheet: NVL BF16 1,671 TFLOPS sparse"),
    GPU("H200", 989e12, "H200 datasheet: SXM BF16 1,979 TFLOPS sparse (H100's tensor cores)"),
    GPU("H800", 989e12, "H800 SXM: H100 SXM's tensor cores"),
    GPU("GH200", 989e12, "GH200 datasheet: BF16 1,979 TFLOPS sparse"),
    GPU("H20", 148e12, "H20 datasheet: BF16 148 TFLOPS dense"),
    GPU("GB200", 2.5e15, "GB200 NVL72 datasheet: BF16 5 PFLOPS sparse per GPU"),
    GPU("B200", 2.25e15, "HGX B200 datasheet: BF16 4.5 PFLOPS sparse per GPU"),
    GPU("B100", 1.75e15, "HGX B100 datasheet: BF16 3.5 PFLOPS sparse per GPU"),
    GPU("A100", 312e12, "A100 datasheet: BF16 312 TFLOPS dense"),
    GPU("A800", 312e12, "A800: A100's tensor cores"),
    GPU("A40", 149.7e12, "A40 datasheet: BF16 149.7 TFLOPS dense (299.4 sparse)"),
    GPU("A30", 165e12, "A30 datasheet: BF16 165 TFLOPS dense"),
    GPU("A10G", 70e12, "AWS G5 (A10G): 70 TFLOPS dense bf16 as AWS states it"),
    GPU("A10", 125e12, "A10 datasheet: BF16 125 TFLOPS dense"),
    GPU("L40S", 362e12, "L40S datasheet: BF16 362.05 TFLOPS dense (733 sparse)"),
    GPU("L40", 181e12, "L40 datasheet: BF16 181.05 TFLOPS dense (362.1 sparse)"),
    GPU("L4", 121e12, "L4 datasheet: BF16 242 TFLOPS sparse"),
    GPU("V100", 125e12, "V100 datasheet: fp16 tensor 125 TFLOPS (SXM2); no bf16", bf16=False),
    GPU("T4", 65e12, "T4 datasheet: fp16 tensor 65 TFLOPS; no bf16", bf16=False),
    # data centre, AMD
    GPU("MI300X", 1307.4e12, "AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense"),
    GPU("MI325X", 1307.4e12, "AMD Instinct MI325X datasheet: BF16 1,307.4 TFLOPS dense"),
    GPU("MI300A", 980.6e12, "AMD Instinct MI300A datasheet: BF16 980.6 TFLOPS dense"),
    GPU("MI250X", 383e12, "AMD Instinct MI250X datasheet: BF16 383 TFLOPS"),
    # workstation (no fp32-accumulate halving)
    GPU("RTX 6000 Ada", 364.2e12, _PRO + ": RTX 6000 Ada FP8 1,457 sparse"),
    GPU("RTX 5000 Ada", 261.1e12, _PRO + ": RTX 5000 Ada FP8 1,044.4 sparse"),
    GPU("RTX 4500 Ada", 158.5e12, _PRO + ": RTX 4500 Ada FP8 634 sparse"),
    GPU("RTX 4000 Ada", 106.9e12, _PRO + ": RTX 4000 Ada FP8 427.6 sparse"),
    GPU("RTX 2000 Ada", 48.0e12, _PRO + ": RTX 2000 Ada FP8 191.9 sparse"),
    GPU("RTX A6000", 154.8e12, _PRO + ": RTX A6000 tensor 309.7 sparse"),
    GPU("RTX A5500", 136.4e12, _PRO + ": RTX A5500 tensor 272.8 sparse"),
    GPU("RTX A5000", 111.1e12, _PRO + ": RTX A5000 tensor 222.2 sparse"),
    GPU("RTX A4500", 94.6e12, _PRO + ": RTX A4500 tensor 189.2 sparse"),
    GPU("RTX A4000", 76.7e12, _PRO + ": RTX A4000 tensor 153.4 sparse"),
    GPU("RTX A2000", 31.9e12, _PRO + ": RTX A2000 tensor 63.9 sparse"),
    # GeForce RTX 50 (Blackwell): SMs x boost GHz x 512
    GPU("RTX 5090", 209.5e12, _BLACKWELL_GEFORCE + " (170 SMs, 2.407 GHz)"),
    GPU("RTX 5080", 112.6e12, _BLACKWELL_GEFORCE + " (84 SMs, 2.617 GHz)"),
    GPU("RTX 5070 Ti", 87.9e12, _BLACKWELL_GEFORCE + " (70 SMs, 2.452 GHz)"),
    GPU("RTX 5070", 61.7e12, _BLACKWELL_GEFORCE + " (48 SMs, 2.512 GHz)"),
    GPU("RTX 5060 Ti", 47.4e12, _BLACKWELL_GEFORCE + " (36 SMs, 2.572 GHz)"),
    GPU("RTX 5060", 38.4e12, _BLACKWELL_GEFORCE + " (30 SMs, 2.497 GHz)"),
    # GeForce RTX 40 (Ada)
    GPU("RTX 4090", 165e12, _ADA + " (128 SMs, 2.52 GHz: 165.2)"),
    GPU("RTX 4080 SUPER", 104.4e12, _ADA + " (80 SMs, 2.55 GHz)"),
    GPU("RTX 4080", 97.5e12, _ADA + " (76 SMs, 2.505 GHz)"),
    GPU("RTX 4070 Ti SUPER", 88.2e12, _ADA + " (66 SMs, 2.61 GHz)"),
    GPU("RTX 4070 Ti", 80.2e12, _ADA + " (60 SMs, 2.61 GHz)"),
    GPU("RTX 4070 SUPER", 71.0e12, _ADA + " (56 SMs, 2.475 GHz)"),
    GPU("RTX 4070", 58.3e12, _ADA + " (46 SMs, 2.475 GHz; 466 AI TOPS = fp8 sparse = 8x)"),
    GPU("RTX 4060 Ti", 44.1e12, _ADA + " (34 SMs, 2.535 GHz)"),
    GPU("RTX 4060", 30.2e12, _ADA + " (24 SMs, 2.46 GHz)"),
    # GeForce RTX 30 (Ampere)
    GPU("RTX 3090 Ti", 80e12, _AMPERE_GEFORCE + " (84 SMs, 1.86 GHz)"),
    GPU("RTX 3090", 71e12, _AMPERE_GEFORCE + " (82 SMs, 1.695 GHz)"),
    GPU("RTX 3080 Ti", 68.2e12, _AMPERE_GEFORCE + " (80 SMs, 1.665 GHz)"),
    GPU("RTX 3080", 59.5e12, _AMPERE_GEFORCE + " (68 SMs, 1.71 GHz)"),
    GPU("RTX 3070 Ti", 43.5e12, _AMPERE_GEFORCE + " (48 SMs, 1.77 GHz)"),
    GPU("RTX 3070", 40.6e12, _AMPERE_GEFORCE + " (46 SMs, 1.725 GHz)"),
    GPU("RTX 3060 Ti", 32.4e12, _AMPERE_GEFORCE + " (38 SMs, 1.665 GHz)"),
    GPU("RTX 3060", 25.5e12, _AMPERE_GEFORCE + " (28 SMs, 1.777 GHz)"),
)

# words in device names that say nothing about which card it is
_NOISE = {"nvidia", "geforce", "amd", "instinct", "tesla", "radeon", "quadro", "gpu", "graphics", "card"}
# name tokens that a plain "H100" stands for (torch reports the SXM part as "NVIDIA H100 80GB HBM3")
_IMPLIED = {"h100 sxm": ("h100",)}


def _tokens(name: str) -> list[str]:
    s = name.lower().replace("-", " ").replace("_", " ")
    s = re.sub(r"\brtx(?=\d)", "rtx ", s)  # "rtx4070" -> "rtx 4070"
    s = re.sub(r"(\d)(ti|super)\b", r"\1 \2", s)  # "4070ti" -> "4070 ti"
    return [t for t in re.split(r"[\s,()/]+", s) if t and t not in _NOISE]


def _label_tokens(gpu: GPU) -> tuple[str, ...]:
    key = gpu.name.lower()
    if key in _IMPLIED:
        return _IMPLIED[key]
    return tuple(t for t in _tokens(gpu.name) if t != "rtx")


def _contains(seq: list[str], sub: tuple[str, ...]) -> bool:
    n = len(sub)
    return any(tuple(seq[i:i + n]) == sub for i in range(len(seq) - n + 1))


def find_gpu(name: str | None) -> GPU | None:
    """The table entry a device name means (None when unknown). All of the entry's words must appear in
    order in the name; the most specific entry (most words) wins, so "RTX 4070 Ti" is not the 4070 and
    "H100 PCIe" is not the SXM part."""
    if not name:
        return None
    toks = [t for t in _tokens(name) if t != "rtx"]
    best, best_len = None, 0
    for gpu in GPUS:
        lab = _label_tokens(gpu)
        if lab and _contains(toks, lab) and len(lab) > best_len:
            best, best_len = gpu, len(lab)
    return best


def peak_flops(name: str | None, bf16_only: bool = True) -> float | None:
    """Dense peak FLOP/s of a GPU by name; None when unknown (or, with `bf16_only`, without bf16)."""
    gpu = find_gpu(name)
    if gpu is None or (bf16_only and not gpu.bf16):
        return None
    return gpu.peak_flops
