"""Speed: MFU re-based on the dense bf16 peak of the GPU that ran (nanochat.gpus)."""

from __future__ import annotations

import numpy as np

from nanochat.doctor import Finding, num
from nanochat.gpus import find_gpu
from nanochat.run_formats import Run

# what a well-tuned bf16 run of this architecture reaches on H100-class GPUs (REFERENCE section 9:
# reference d12 ~41%, d18 ~46%, d24 ~50%); below WARN_MFU something is leaving the GPU idle
EXPECTED_MFU = (0.40, 0.50)
WARN_MFU = 0.30


def check_mfu(run: Run, gpu: str | None = None, peak_tflops: float | None = None) -> Finding:
    """Median MFU, renormalised from the peak the run divided by to the dense bf16 peak of the GPU that ran.

    nanoGPT divides by an A100's 312 TFLOP/s whatever GPU ran; nanochat (ours and karpathy's) and llm.c by
    the detected GPU's peak (the format declares it). The GPU: `peak_tflops` if given, else `gpu` looked
    up in nanochat.gpus, else the device the run recorded. MFU_true = MFU_logged x peak_logged / peak_gpu.
    An unknown GPU name is a line in the finding, never a refusal."""
    name = "mfu"
    device = str(run.env.get("device_name") or run.info.get("gpu_name") or run.args.get("device_type") or "")
    steps, mfu = run.series("mfu")
    mfu = mfu[np.isfinite(mfu) & (mfu > 0)] if len(mfu) else mfu
    if device.lower().startswith(("cpu", "mps")) and not (gpu or peak_tflops):
        return Finding(name, "skip", f"MFU is not measured on {device} (no known peak FLOP/s); judge CPU speed by tok/s")
    if len(mfu) == 0:
        return Finding(name, "skip", "no MFU values logged" + (f" on {device}" if device else ""), {"device": device})
    skip = max(5, len(mfu) // 10)  # compile and warm-up steps are not representative
    body = mfu[skip:] if len(mfu) > skip + 5 else mfu
    logged = float(np.median(body))
    peak_logged = num(run.knows.mfu_peak_flops) or num(run.env.get("peak_flops"))
    nums = dict(device=device, median_mfu_logged=logged, logged_peak_flops=peak_logged, steps_used=len(body))
    unknown = ""
    if peak_tflops:
        target = (f"given {peak_tflops:g} TFLOP/s GPU", peak_tflops * 1e12)
    else:
        entry = find_gpu(gpu) if gpu else (find_gpu(device) if device else None)
        target = (entry.name, entry.peak_flops) if entry else None
        if gpu and entry is None:
            unknown = (f"--gpu {gpu!r} is not in the peak table (nanochat/gpus.py; scripts/diagnose.py --gpu list): "
                       "give --peak-tflops N (dense bf16) to re-base")
            nums["unknown_gpu"] = gpu
    if peak_logged is None:
        return Finding(name, "skip" if target is None else "info",
                       f"median logged MFU {logged:.1%}, but the run does not say which peak it divides by; "
                       "cannot renormalise" + (f"; {unknown}" if unknown else ""), nums)
    if target is None:
        note = run.knows.mfu_peak_note or f"relative to {peak_logged / 1e12:.0f} TFLOP/s"
        return Finding(name, "info", f"median logged MFU {logged:.1%} ({note}); "
                       + (unknown or "give --gpu NAME (or --peak-tflops N) to re-base it on the GPU that ran"), nums,
                       "e.g. --gpu h100, --gpu 4090, --peak-tflops 165")
    label, peak = target
    true = logged * peak_logged / peak
    nums.update(gpu=label, gpu_peak_flops=peak, median_mfu=true, achieved_flops=logged * peak_logged,
                expected_low=EXPECTED_MFU[0], expected_high=EXPECTED_MFU[1])
    rebased = abs(peak_logged - peak) > 0.01 * peak
    what = (f"median MFU {true:.1%} of the {label}'s {peak / 1e12:.0f} TFLOP/s dense bf16 peak"
            + (f" (logged {logged:.1%} of {peak_logged / 1e12:.0f} TFLOP/s: {logged * peak_logged / 1e12:.0f} TFLOP/s achieved)"
               if rebased else ""))
    if true > 0.95:
        return Finding(name, "warn", f"{what}: above what any GPU reaches", nums,
                       f"The run cannot have used a {label}: check --gpu (and the program's own FLOP count).", severity=20)
    if true < WARN_MFU:
        dtype = str(run.env.get("dtype", ""))
        hint = "the run is in fp32: use bf16 on SM80+ GPUs; " if "32" in dtype else ""
        return Finding(name, "warn", f"{what}: the GPU is underused (bf16 runs of this kind reach "
                       f"~{EXPECTED_MFU[0]:.0%}-{EXPECTED_MFU[1]:.0%})", nums,
                       hint + "turn on torch.compile, raise the micro-batch to fill memory (fewer gradient-accumulation "
                       "passes), check the data loader keeps up (dt spikes) and evaluate less often; small models "
                       "(width < 1024) cannot fill a large GPU: use a smaller card or a bigger model.",
                       severity=10 * (WARN_MFU - true) / WARN_MFU + 1)
    return Finding(name, "ok", what + ("; the logged figure understates it" if rebased and true > logged else ""), nums)
