"""The run doctor: read a training run -- ours or another program's -- and say, ranked and with
numbers, what is off and what to change.

Runs are read by nanochat/run_formats (our run folder and console output, Hugging Face Trainer,
TensorBoard, wandb exports, nanoGPT, karpathy/nanochat, llm.c, modded-nanogpt). Each format declares
what it knows (`Run.knows`); the checks read those declarations, and what a format lacks makes the
checks that need it skip (and say so), never guess.

Each check returns a `Finding` with a status:
  ok    nothing to change          warn  something to change (the advice says what)
  info  worth knowing, not wrong   skip  the run lacks what the check needs (the summary says what)

The checks, by topic, one module each under nanochat/doctor/ (`CHECKS` below lists them in report order):
  size      param_count: recomputed vs printed vs claimed in comments and names, the likeliest typo;
            tokens_ratio: tokens per parameter in both conventions vs the compute-optimal ratio, now and
            at the planned end, and what the same compute buys as a compute-optimal model
  speed     mfu: renormalised to the dense bf16 peak of the GPU that ran (nanochat.gpus)
  loss      val_vs_train (phase-aware: pretraining vs fine-tuning), spikes, loss_curve (a fitted
            L(D) = E + B D^-beta - C S2 with bootstrap intervals, predictions at the planned end / 2x /
            10x, from smoothed logs at their known lag)
  schedule  where the run is in its LR schedule, and whether the logged LR follows the plan
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np

from nanochat.doctor import Finding, num
from nanochat.doctor.loss import check_loss_curve, check_spikes, check_val_vs_train
from nanochat.doctor.schedule import check_schedule
from nanochat.doctor.size import check_param_count, check_tokens_ratio, params, tokens_trained
from nanochat.doctor.speed import check_mfu
from nanochat.run_formats import Run
from nanochat.run_formats import parse as parse_run


def load_run(path, config=None, tokens_per_step: float | None = None) -> Run:
    """Any supported run (auto-detected); `config`: the run's config .py (nanoGPT, wandb exports);
    `tokens_per_step`: for formats that do not record it (HF Trainer, TensorBoard, modded-nanogpt)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"run folder or log not found: {path} (expected <base>/base_checkpoints/<model_tag>/, "
                                "a training log, a Trainer or TensorBoard folder, or a wandb history .csv/.jsonl)")
    run = parse_run(path, config)
    if tokens_per_step and not run.knows.tokens_per_step:
        run.info.setdefault("sizing", {})["tokens_per_step"] = tokens_per_step
        n = run.sizing.get("num_iterations")
        if n:
            run.info["sizing"]["total_tokens"] = n * tokens_per_step
        for m in run.metrics:
            if isinstance(m.get("step"), (int, float)):
                m["tokens"] = m["step"] * tokens_per_step
        run.knows.tokens_per_step = True
        run.skipped = [s for s in run.skipped if not s.startswith("tokens per step")]
    return run


CHECKS = (
    check_param_count,   # size: recomputed vs printed vs claimed, the likeliest cause of a gap
    check_tokens_ratio,  # size: tokens per parameter vs compute-optimal, and what the compute buys instead
    check_mfu,           # speed: MFU on the peak of the GPU that ran
    check_val_vs_train,  # loss: validation vs training, by phase
    check_spikes,        # loss: spikes in the step losses
    check_loss_curve,    # loss: the fitted curve and its predictions
    check_schedule,      # schedule: position in the LR schedule, logged vs planned LR
)
_STATUS_RANK = {"warn": 0, "info": 1, "ok": 2, "skip": 3}


def diagnose(run: Run, law=None, gpu: str | None = None, peak_tflops: float | None = None) -> list[Finding]:
    """All checks, ranked: warnings by severity (the most consequential first), then info, ok, skip.
    `law` (a fitted scaling.LossLaw) sets the compute-optimal ratio; `gpu` / `peak_tflops` re-base MFU."""
    out = []
    for check in CHECKS:
        try:
            if check is check_tokens_ratio:
                out.append(check(run, law=law))
            elif check is check_mfu:
                out.append(check(run, gpu=gpu, peak_tflops=peak_tflops))
            else:
                out.append(check(run))
        except Exception as e:  # noqa: BLE001 -- one broken check must not hide the others
            out.append(Finding(check.__name__.removeprefix("check_"), "skip", f"check failed: {type(e).__name__}: {e}"))
    order = {c.__name__.removeprefix("check_"): i for i, c in enumerate(CHECKS)}
    return sorted(out, key=lambda f: (_STATUS_RANK.get(f.status, 9), -f.severity, order.get(f.check, 99)))


def report(run: Run, findings: list[Finding]) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "info": "info", "skip": "skip"}
    fmt = run.format
    lines = [f"run: {run.path} ({fmt})"] + [f"  note: {p}" for p in run.problems]
    lines += [f"  not in this format: {s}" for s in run.skipped]
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. [{mark.get(f.status, f.status)}] {f.check}: {f.summary}")
        if f.advice and f.status in ("warn", "info"):
            lines.append(f"       -> {f.advice}")
    return "\n".join(lines)


def to_json(run: Run, findings: list[Finding]) -> dict:
    return {"run": str(run.path), "source": run.source, "problems": run.problems, "skipped": run.skipped,
            "findings": [asdict(f) for f in findings]}


# ---------------------------------------------------------------------------------------------
# one row of a scaling sweep


def run_summary(run: Run) -> dict:
    """The sweep CSV row of one run: final val bpb, parameter counts, tokens, FLOPs."""
    scaling, total = params(run)
    mc = run.info.get("model_config") or {}
    steps, bpb = run.series("val_bpb")
    final = run.info.get("final") or {}
    val = num(final.get("val_bpb")) if final else None
    if val is None and len(bpb):
        val = float(bpb[-1])
    n_iter = num(run.sizing.get("num_iterations"))
    all_steps = run.series("step")[1]
    done_steps = int(all_steps[-1]) + (1 if all_steps[0] == 0 else 0) if len(all_steps) else None
    raw = run.series("raw_loss")[1]
    train_loss = float(np.mean(raw[-max(1, len(raw) // 20):])) if len(raw) else None  # last 5% of steps
    tokens = tokens_trained(run)
    flops = num(run.last("flops"))
    if flops is None and tokens and num(run.sizing.get("flops_per_token")):
        flops = tokens * run.sizing["flops_per_token"]
    return dict(model_tag=run.args.get("model_tag") or run.path.name, depth=run.args.get("depth") or mc.get("n_layer"),
                target_flops=num(run.args.get("target_flops")), val_bpb=val, train_loss=train_loss,
                val_step=int(steps[-1]) if len(steps) else None,
                scaling_params=scaling, total_params=total, tokens=tokens, flops=flops,
                flops_6ND=6 * scaling * tokens if scaling and tokens else None,
                steps=done_steps, num_iterations=n_iter,
                complete=bool(done_steps is not None and n_iter and done_steps >= n_iter))
