"""TensorBoard event files (a log folder, or one events.out.tfevents.* file), read with TensorBoard's own
EventAccumulator. Scalar tags are mapped to ours by the names the common trainers write:

  Hugging Face Trainer (TensorBoardCallback, `rewrite_logs`): train/loss, eval/loss, train/learning_rate,
      train/num_input_tokens_seen; train/loss is the mean of the `logging_steps` step losses since the last log
  Megatron-LM (training_log, evaluate_and_print_results): `lm loss` (the logged iteration's loss; the
      console line is the one averaged over the log interval), `lm loss validation`, `learning-rate`
  torchtitan (MetricsProcessor): loss_metrics/global_avg_loss (the step's loss over ranks),
      validation_metrics/loss, lr
  others: loss / train_loss / val_loss / Loss/train / Loss/Validation / lr

Only scalars are read. The model's shape is not in event files: give the run's config (not read here),
or read the findings that need it as skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nanochat.run_formats import Format, Knows, Run, RunFormatError, Smoothing

# ours <- tags, first present wins; `window`: the trainer logs the mean over its log interval
TAGS = {
    "loss": (("train/loss", True), ("lm loss", False), ("loss_metrics/global_avg_loss", False), ("train_loss", False),
             ("Loss/train", False), ("loss", False), ("train/loss_step", False)),
    "val_loss": (("eval/loss", None), ("lm loss validation", None), ("validation_metrics/loss", None), ("val/loss", None), ("validation/loss", None),
                 ("val_loss", None), ("Loss/Validation", None), ("eval_loss", None)),
    "lr": (("train/learning_rate", None), ("learning-rate", None), ("lr", None), ("train/lr", None), ("learning_rate", None)),
    "tokens": (("train/num_input_tokens_seen", None), ("num_input_tokens_seen", None), ("tokens", None)),
}


def _event_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if "tfevents" in path.name else []
    return sorted(p for p in path.rglob("*tfevents*") if p.is_file())


def parse_tensorboard(path, config=None) -> Run:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise RunFormatError(f"{path} holds TensorBoard event files; reading them needs the tensorboard package: "
                             "pip install tensorboard (or the project's `doctor` extra)") from e
    path = Path(path)
    files = _event_files(path)
    if not files:
        raise RunFormatError(f"{path}: no events.out.tfevents.* files")
    scalars: dict[str, dict[int, float]] = {}
    for f in files:  # one accumulator per file: runs resumed into the same folder write several
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                scalars.setdefault(tag, {})[int(ev.step)] = float(ev.value)
    mapping = {ours: next(((t, w) for t, w in tags if t in scalars), None) for ours, tags in TAGS.items()}
    if mapping["loss"] is None and mapping["val_loss"] is None:
        raise RunFormatError(f"{path}: event files hold no loss tag (looked for "
                             + ", ".join(t for t, _ in TAGS["loss"] + TAGS["val_loss"]) + f"); tags: {sorted(scalars)[:12]}")
    metrics: dict[int, dict] = {}
    for ours, hit in mapping.items():
        if hit is None:
            continue
        for s, v in scalars[hit[0]].items():
            if np.isfinite(v):
                metrics.setdefault(s, {"step": s})[ours] = v
    lrs = [r["lr"] for r in metrics.values() if "lr" in r]
    if lrs and max(lrs) > 0:
        for r in metrics.values():
            if "lr" in r:
                r["lr"] /= max(lrs)
    skipped = []
    smoothing = None
    if mapping["loss"]:
        tag, window = mapping["loss"]
        steps = np.array(sorted(scalars[tag]))
        gap = int(np.median(np.diff(steps))) if len(steps) > 1 else 1
        if window and gap > 1:
            smoothing = Smoothing("window", window=gap)
            skipped.append(f"the step losses ({tag!r} is the mean over each {gap}-step log interval): spikes are diluted")
        elif not window:
            for r in metrics.values():
                if "loss" in r:
                    r["raw_loss"] = r.pop("loss")
    tok = sorted((s, r["tokens"]) for s, r in metrics.items() if "tokens" in r and s > 0)
    tps = tok[-1][1] / tok[-1][0] if tok else None
    if tps is None:
        skipped.append("tokens per step (no tokens tag; give --tokens-per-step N)")
    skipped.append("the model's shape (event files hold scalars only)")
    info = dict(claims=[], tags={k: v[0] for k, v in mapping.items() if v}, sizing=dict(tokens_per_step=tps))
    knows = Knows(params="total", loss_smoothing=smoothing, lr_schedule=None, planned_steps=False,
                  tokens_per_step=tps is not None, eval_offset=1)
    return Run(path, f"TensorBoard event files ({len(files)})", [metrics[k] for k in sorted(metrics)], info, knows, [],
               skipped, source="tensorboard")


def _looks_like(path: Path, head: str) -> bool:
    if path.is_file():
        return "tfevents" in path.name
    return path.is_dir() and next(path.rglob("*tfevents*"), None) is not None


FORMAT = Format("tensorboard", "TensorBoard event files (a log folder or an events.out.tfevents.* file)", _looks_like,
                parse_tensorboard)
