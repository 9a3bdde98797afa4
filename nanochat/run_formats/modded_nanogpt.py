"""KellerJordan/modded-nanogpt: train_gpt.py output (the console, or the logs/<run id>.txt it writes,
which opens with the script's own source).

Read from its print0 calls: `step:{step}/{train_steps} val_loss:{:.4f} train_time:{:.0f}ms
step_avg:{:.2f}ms` (at the top of iteration `step`: the weights after `step` updates) and the step
line `step:{step+1}/{train_steps} [train_loss:{:.4f} ]train_time:... step_avg:...` (records up to
late 2024 print the step's training loss; later ones print only the time). The model's size and the
tokens per step live in the logged source, in forms that change from record to record, so they are
read only from the old `batch_size` x `sequence_length` hyperparameters; otherwise the doctor says what
is missing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError
from nanochat.run_formats._text import NUM, num
from nanochat.run_formats.nanogpt import _safe_eval

_STEP = re.compile(r"^step:(\d+)/(\d+)(?: train_loss:(" + NUM + r"))?(?: val_loss:(" + NUM + r"))? train_time:(" + NUM
                   + r")ms step_avg:(" + NUM + r")ms")


def _hyper(source: str, name: str):
    m = re.search(rf"^\s+{name}\s*:\s*int\s*=\s*([0-9*+ ]+)", source, re.M)
    if not m:
        return None
    try:
        return int(_safe_eval(ast.parse(m.group(1).strip(), mode="eval").body, {}))
    except (SyntaxError, ValueError, TypeError):
        return None


def parse_modded_nanogpt(path, config=None) -> Run:
    path = Path(path)
    text = path.read_text(errors="replace")
    metrics, n_iter, prev_time = {}, None, None
    for line in text.splitlines():
        m = _STEP.match(line.strip())
        if not m:
            continue
        s, n_iter = int(m.group(1)), int(m.group(2))
        rec = metrics.setdefault(s, {"step": s})
        if m.group(3):
            rec["raw_loss"] = num(m.group(3))
        if m.group(4):
            rec["val_loss"] = num(m.group(4))
        elif prev_time is not None and s == prev_time[0] + 1:
            rec["dt"] = (num(m.group(5)) - prev_time[1]) / 1000
        if not m.group(4):
            prev_time = (s, num(m.group(5)))
    if not metrics:
        raise RunFormatError(f"{path}: no `step:100/1750 val_loss:... train_time:...` lines: is this modded-nanogpt output?")
    skipped = []
    batch, seq = _hyper(text, "batch_size"), _hyper(text, "sequence_length")
    tps = batch * seq if batch and seq else None
    if tps:
        for s, rec in metrics.items():
            rec["tokens"] = s * tps
    else:
        skipped.append("tokens per step (the logged source has no plain `batch_size` x `sequence_length`; "
                       "give --tokens-per-step N)")
    if not any("raw_loss" in r for r in metrics.values()):
        skipped.append("the training loss (this version of train_gpt.py prints only val_loss): the loss curve is "
                       "fitted on val_loss")
    skipped.append("the model's parameter count (not printed)")
    skipped.append("the LR schedule (not printed)")
    info = dict(sizing=dict(tokens_per_step=tps, num_iterations=n_iter,
                            total_tokens=n_iter * tps if n_iter and tps else None), claims=[], dropout=0.0)
    knows = Knows(params="total", loss_smoothing=None, lr_schedule=None, planned_steps=n_iter is not None,
                  tokens_per_step=bool(tps), eval_offset=1)
    return Run(path, "modded-nanogpt train_gpt.py log", [metrics[k] for k in sorted(metrics)], info, knows, [], skipped,
               source="modded-nanogpt")


def _looks_like(path: Path, text: str) -> bool:
    return path.is_file() and bool(re.search(r"^step:\d+/\d+ (?:train_loss:\S+ |val_loss:\S+ )?train_time:", text, re.M))


FORMAT = Format("modded-nanogpt", "a modded-nanogpt log (`step:125/1750 val_loss:4.2 train_time:...`)", _looks_like,
                parse_modded_nanogpt)
