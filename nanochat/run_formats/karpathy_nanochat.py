"""karpathy/nanochat: scripts/base_train.py console output.

Its step line, `step 00012/21400 (0.06%) | loss: 3.123456 | lrm: 1.00 | dt: ... | tok/sec: ... |
bf16_mfu: ... | ...`, prints `debiased_smooth_loss`: an EMA (beta 0.9) of the step losses divided by
1 - 0.9^(step+1). Versions differ in the fields between the bars (`grad norm:`, `mfu:` before
`bf16_mfu:`, `epoch:`, `eta:`), so the fields are read by name. Where every step is logged the EMA is
inverted exactly into the step losses (`raw_loss`); where lines are missing it cannot be, and the
checks read the smoothed loss with its known lag instead. Also read: `Step 00100 | Validation bpb:`,
`Step 00100 | CORE metric:`, the `Parameter counts:` table, `Model config:` JSON, `GPU: ... | Peak
FLOPS (BF16):` (the peak its bf16_mfu divides by, per GPU), batch size and iteration plan.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError, Smoothing
from nanochat.run_formats._text import NUM, num

EMA = Smoothing("ema", beta=0.9, debiased=True)

_HEAD = re.compile(r"^step (\d+)/(\d+) \(([\d.]+)%\)\s*\|(.*)$")
_FIELD = re.compile(r"^\s*([A-Za-z][\w/ ]*?):\s*(" + NUM + r")")
_LINES = dict(
    val=re.compile(r"^Step (\d+) \| Validation bpb: (" + NUM + ")"),
    core=re.compile(r"^Step (\d+) \| CORE metric: (" + NUM + ")"),
    gpu=re.compile(r"^GPU: (.+?) \| Peak FLOPS \(BF16\): (" + NUM + ")"),
    vocab=re.compile(r"^Vocab size: (" + NUM + ")"),
    count=re.compile(r"^(\w+)\s*: (" + NUM + r")$"),
    flops_tok=re.compile(r"^Estimated FLOPs per token: (" + NUM + ")"),
    total_tokens=re.compile(r"^Total number of training tokens: (" + NUM + ")"),
    ratio=re.compile(r"^Tokens : (?:Scaling params|Params) ratio: (" + NUM + ")"),
    batch=re.compile(r"^Total batch size (" + NUM + r") => gradient accumulation steps: (\d+)"),
    auto_batch=re.compile(r"^Auto-computed optimal batch size: (" + NUM + ")"),
    iters=re.compile(r"^(?:Using user-provided number of iterations|Calculated number of iterations from [^:]+): (" + NUM + ")"),
)


def _step_fields(rest: str) -> dict:
    out = {}
    for part in rest.split("|"):
        if m := _FIELD.match(part):
            out[m.group(1).strip()] = num(m.group(2))
    return out


def invert_ema(metrics: dict, beta: float = 0.9) -> bool:
    """Step losses from consecutive debiased-EMA values: with e_t = loss_t (1 - beta^(t+1)) the raw EMA,
    x_t = (e_t - beta e_{t-1}) / (1 - beta). Only when every logged step has its predecessor (a gap
    makes every later value unrecoverable); returns whether it inverted."""
    steps = sorted(s for s, r in metrics.items() if "loss" in r)
    if not steps or steps[0] != 1 or any(b - a != 1 for a, b in zip(steps, steps[1:])):
        return False
    prev = None
    for s in steps:
        t = s - 1  # the 0-based index of the update this line reports
        e = metrics[s]["loss"] * (1 - beta ** (t + 1))
        metrics[s]["raw_loss"] = metrics[s]["loss"] if prev is None else (e - beta * prev) / (1 - beta)
        prev = e
    return True


def parse_karpathy_nanochat(path, config=None) -> Run:
    path = Path(path)
    text = path.read_text(errors="replace")
    metrics, counts, info, skipped = {}, {}, {}, []
    in_counts, mc_lines, in_mc = False, [], False
    n_iter = batch = None
    for line in text.splitlines():
        line = line.rstrip()
        if line.startswith("Model config:"):
            in_mc, mc_lines = True, []
            continue
        if in_mc:
            mc_lines.append(line)
            if line.startswith("}"):
                in_mc = False
                try:
                    info["model_config"] = json.loads("\n".join(mc_lines))
                except json.JSONDecodeError:
                    pass
            continue
        if line.startswith("Parameter counts"):
            in_counts = True
            continue
        if in_counts:
            if m := _LINES["count"].match(line):
                counts[m.group(1)] = int(num(m.group(2)))
                continue
            in_counts = False
        if m := _HEAD.match(line):
            f = _step_fields(m.group(4))
            if "loss" not in f:
                continue
            s = int(m.group(1))
            n_iter = n_iter or int(m.group(2))
            rec = metrics.setdefault(s + 1, {"step": s + 1})  # the line after update `s`: s + 1 steps done
            rec["loss"] = f["loss"]
            if "lrm" in f:
                rec["lr"] = f["lrm"]
            if "dt" in f:
                rec["dt"] = f["dt"] / 1000
            if "tok/sec" in f:
                rec["tok_per_sec"] = f["tok/sec"]
            mfu = f.get("bf16_mfu", f.get("mfu"))
            if mfu is not None:
                rec["mfu"] = mfu / 100
        elif m := _LINES["val"].match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s})["val_bpb"] = num(m.group(2))
        elif m := _LINES["core"].match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s})["core"] = num(m.group(2))
        elif m := _LINES["gpu"].match(line):
            info["gpu_name"], info["mfu_peak_flops"] = m.group(1), num(m.group(2))
        elif m := _LINES["vocab"].match(line):
            info["vocab_size"] = int(num(m.group(1)))
        elif m := _LINES["flops_tok"].match(line):
            info["flops_per_token"] = num(m.group(1))
        elif m := _LINES["total_tokens"].match(line):
            info["total_tokens"] = num(m.group(1))
        elif m := _LINES["ratio"].match(line):
            info["printed_ratio"] = num(m.group(1))
        elif m := _LINES["batch"].match(line):
            batch = num(m.group(1))
        elif (m := _LINES["auto_batch"].match(line)) and batch is None:
            batch = num(m.group(1))
        elif m := _LINES["iters"].match(line):
            n_iter = int(num(m.group(1)))
    if not metrics:
        raise RunFormatError(f"{path}: no `step 00100/21400 (...) | loss: ...` lines: is this a nanochat base_train log?")
    if not invert_ema(metrics):
        skipped.append("the step losses: the log prints a debiased EMA (beta 0.9) of them and skips lines, so it "
                       "cannot be inverted; fits use the smoothed loss at its known lag, the spike check is off")
    if batch is None and info.get("total_tokens") and n_iter:
        batch = info["total_tokens"] / n_iter
    if batch:
        for s, rec in metrics.items():
            rec["tokens"] = s * batch
    else:
        skipped.append("tokens per step (no `Total batch size` line): the data-curve fit needs it")
    scaling = counts.get("transformer_matrices", 0) + counts.get("lm_head", 0) if "transformer_matrices" in counts else None
    if not counts:
        skipped.append("the parameter-count table (no `Parameter counts:` block)")
    if "mfu_peak_flops" not in info:
        skipped.append("which peak the logged bf16_mfu divides by (no `GPU: ... | Peak FLOPS (BF16)` line)")
    info.update(counts_table=counts, claims=[], dropout=0.0,
                sizing=dict(num_params=counts.get("total"), scaling_params=scaling, tokens_per_step=batch,
                            num_iterations=n_iter,
                            total_tokens=info.get("total_tokens") or (n_iter * batch if n_iter and batch else None),
                            schedule="trapezoid", flops_per_token=info.get("flops_per_token")))
    skipped.append("warmup steps and warmdown ratio (not printed; read from the logged lrm)")
    knows = Knows(params="scaling", printed_params="the `Parameter counts:` table (total = the sum of its parts)",
                  loss_smoothing=EMA, lr_schedule=None, planned_steps=n_iter is not None, tokens_per_step=bool(batch),
                  eval_offset=1, mfu_peak_flops=info.get("mfu_peak_flops"),
                  mfu_peak_note="base_train divides by the detected GPU's bf16 peak (its `GPU:` line)")
    return Run(path, "karpathy/nanochat base_train console log", [metrics[k] for k in sorted(metrics)], info, knows,
               [], skipped, source="karpathy-nanochat")


def _looks_like(path: Path, text: str) -> bool:
    return path.is_file() and bool(re.search(r"^step \d{5}/\d{5} \(", text, re.M) or "Tokens : Scaling params ratio" in text
                                   or re.search(r"^Step \d{5} \| Validation bpb", text, re.M))


FORMAT = Format("karpathy-nanochat", "a karpathy/nanochat base_train log (`step 00100/21400 (0.47%) | loss: ...`)",
                _looks_like, parse_karpathy_nanochat)
