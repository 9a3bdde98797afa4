"""wandb run-history exports: the CSV the web UI downloads, or JSON lines (`run.history()` /
`wandb-history.jsonl`), one row per logged step with the keys the program logged. The keys of
nanoGPT, nanochat and the common HF names are mapped to ours (first match wins); with the run's
nanoGPT-style --config the model shape and the plan are read from it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError
from nanochat.run_formats._text import size_claims
from nanochat.run_formats.nanogpt import NANOGPT_DEFAULTS, read_config_py
from nanochat.run_formats.shapes import nanogpt_params

_WANDB_KEYS = {  # our key <- wandb keys, first match wins
    "step": ("_step", "step", "iter", "trainer/global_step"),
    "raw_loss": ("train/loss_raw", "train_loss", "loss"),
    "loss": ("train/loss",),
    "eval_train_loss": ("eval/train_loss",),
    "val_loss": ("val/loss", "val_loss", "eval/loss", "validation/loss"),
    "val_bpb": ("val/bpb", "val_bpb"),
    "lr": ("train/lrm", "lrm", "lr"),
    "mfu_pct": ("train/mfu", "mfu"),
    "tokens": ("tokens", "train/tokens", "total_tokens"),
    "flops": ("total_training_flops", "flops"),
    "dt": ("train/dt", "dt"),
    "tok_per_sec": ("train/tok_per_sec", "tok_per_sec"),
    "core": ("core_metric", "core"),
}


def _rows_to_metrics(rows: list[dict], path: Path) -> tuple[list[dict], dict, list[str]]:
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    mapping = {ours: next((k for k in theirs if k in keys), None) for ours, theirs in _WANDB_KEYS.items()}
    if mapping["step"] is None:
        raise RunFormatError(f"{path}: no step column (_step, step or iter); columns: {sorted(keys)[:12]}")
    by_step = {}
    for r in rows:
        try:
            s = int(float(r[mapping["step"]]))
        except (TypeError, ValueError, KeyError):
            continue
        rec = by_step.setdefault(s, {"step": s})
        for ours, theirs in mapping.items():
            if ours == "step" or theirs is None:
                continue
            v = r.get(theirs)
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(v):
                continue
            if ours == "mfu_pct":
                rec["mfu"] = v / 100
            else:
                rec[ours] = v
    lr_key = mapping["lr"]
    lr_vals = [rec["lr"] for rec in by_step.values() if "lr" in rec]
    if lr_key == "lr" and lr_vals and max(lr_vals) > 0:  # an absolute LR: express as a multiplier of its peak
        peak = max(lr_vals)
        for rec in by_step.values():
            if "lr" in rec:
                rec["lr"] /= peak
    skipped = [f"{ours} (none of {', '.join(theirs)})" for ours, theirs in _WANDB_KEYS.items()
               if mapping[ours] is None and ours in ("tokens", "val_loss", "mfu_pct")]
    return [by_step[k] for k in sorted(by_step)], mapping, skipped


def parse_wandb(path, config=None) -> Run:
    path = Path(path)
    text = path.read_text(errors="replace")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        rows, bad = [], 0
        for line in text.splitlines():
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(obj, dict):
                    rows.append(obj)
        if not rows:
            raise RunFormatError(f"{path}: no JSON objects, one per line: expected a wandb history export")
    metrics, mapping, skipped = _rows_to_metrics(rows, path)
    info = dict(mapping=mapping, config_set_by={}, family="gpt2",
                claims=size_claims(path.stem.replace("_", " "), f"the file name {path.name}"), sizing={})
    if mapping["mfu_pct"]:
        skipped.append("which peak the logged mfu divides by (wandb does not record it; nanoGPT and nanochat log percent "
                       "of A100 312 / the detected GPU's peak): give --gpu and the run's own program to renormalise")
    if config:
        conf = read_config_py(config)
        v = conf["values"]
        info["config"], info["comments"] = v, conf["comments"]
        info["config_set_by"] = {k: Path(config).name for k in v}
        for c in conf["comments"]:
            info["claims"] += size_claims(c["text"], f"comment in {Path(config).name} line {c['line']}")
        if all(k in v for k in ("n_layer", "n_embd")):
            dims = {**{k: NANOGPT_DEFAULTS[k] for k in ("n_head", "block_size", "bias")}, **{k: v[k] for k in v if k in
                    ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size")}}
            dims.setdefault("vocab_size", 50304)
            info["dims"], info["counts"] = dims, nanogpt_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"],
                                                                 dims["block_size"], bool(dims["bias"]))
            info["sizing"].update(num_params=info["counts"]["total"], scaling_params=info["counts"]["scaling"])
        info["dropout"] = v.get("dropout")
        tpi = None
        if all(isinstance(v.get(k), (int, float)) for k in ("batch_size", "block_size", "gradient_accumulation_steps")):
            tpi = v["batch_size"] * v["block_size"] * v["gradient_accumulation_steps"]
            info["sizing"].update(tokens_per_step=tpi)
            if isinstance(v.get("max_iters"), (int, float)):
                info["sizing"].update(num_iterations=v["max_iters"], total_tokens=v["max_iters"] * tpi)
        if tpi and not mapping["tokens"]:
            for rec in metrics:
                rec["tokens"] = rec["step"] * tpi
            skipped = [s for s in skipped if not s.startswith("tokens")]
    else:
        skipped.append("model shape and plan (pass --config FILE with the run's config .py)")
    sz = info["sizing"]
    knows = Knows(params="total", printed_params=None, loss_smoothing=None, lr_schedule=None,
                  planned_steps="num_iterations" in sz, tokens_per_step="tokens_per_step" in sz or bool(mapping["tokens"]),
                  eval_offset=0, mfu_peak_flops=None)
    return Run(path, f"wandb history export ({path.suffix.lstrip('.').upper()})", metrics, info, knows, [], skipped,
               source="wandb")


def _looks_like(path: Path, text: str) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".csv":
        return True
    first = text.lstrip()[:1]
    return first == "{" and path.suffix.lower() in (".jsonl", ".json", ".ndjson", ".log", ".txt", "") \
        and path.name != "trainer_state.json"


FORMAT = Format("wandb", "a wandb history export (.csv, or .jsonl with one JSON object per line)", _looks_like, parse_wandb)


