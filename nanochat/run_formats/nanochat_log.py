"""This project's own runs: the run folder (run.json + metrics.jsonl), and the console output saved to a
file: base_train's (the sizing table and the lines nanochat/train_loop.py prints) or chat_sft's (its step
line, nanochat/chat_sft.py, with the epoch fraction and the val loss on eval steps; phase "sft")."""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.run_dir import METRICS, PHASE_DIRS, RUN_JSON, read_metrics, read_run_json
from nanochat.run_formats import Format, Knows, Run, RunFormatError, Smoothing
from nanochat.run_formats._text import NUM, num

# base_train: `loss` is an EMA (0.9) of the step losses with Adam's bias correction (train_loop.LoopState)
LOSS_EMA = Smoothing("ema", beta=0.9)


def _phase(path: Path, info: dict) -> str:
    if isinstance(info.get("phase"), str):
        return info["phase"]
    by_dir = {d: p for p, d in PHASE_DIRS.items()}
    if path.parent.name in by_dir:
        return "sft" if by_dir[path.parent.name] == "mid" else by_dir[path.parent.name]
    return "sft" if isinstance(info.get("source"), dict) else "base"


def schedule_of(sizing: dict):
    """The planned LR multiplier per step from run.json's sizing (None when it lacks the schedule)."""
    keys = ("num_iterations", "warmup_steps", "warmdown_ratio", "final_lr_frac")
    if not all(isinstance(sizing.get(k), (int, float)) for k in keys):
        return None
    from nanochat.sizing import lr_multiplier

    n, w, wd, f = int(sizing["num_iterations"]), int(sizing["warmup_steps"]), sizing["warmdown_ratio"], sizing["final_lr_frac"]
    return lambda s: lr_multiplier(int(s), n, w, wd, f)


def parse_run_folder(path, config=None) -> Run:
    path = Path(path)
    if path.is_file():
        path = path.parent
    problems = []
    metrics = read_metrics(path, problems)
    try:
        info = read_run_json(path)
    except ValueError as e:
        problems.append(f"{e}; metadata checks skipped")
        info = {}
    if not (path / METRICS).is_file():
        problems.append(f"no {METRICS}")
    if info is None:
        problems.append(f"no {RUN_JSON}")
        info = {}
    if not (path / METRICS).is_file() and not (path / RUN_JSON).is_file():
        raise FileNotFoundError(f"{path} holds neither {METRICS} nor {RUN_JSON}: is it a run folder?")
    metrics.sort(key=lambda m: m.get("step", 0) if isinstance(m.get("step"), (int, float)) else 0)
    sz = info.get("sizing") or {}
    env = info.get("env") or {}
    knows = Knows(params="scaling", printed_params=None, loss_smoothing=LOSS_EMA, lr_schedule=schedule_of(sz),
                  planned_steps=isinstance(sz.get("num_iterations"), (int, float)),
                  tokens_per_step=isinstance(sz.get("tokens_per_step"), (int, float)), eval_offset=1,
                  mfu_peak_flops=env.get("peak_flops"), mfu_peak_note="the detected GPU's dense bf16 peak (nanochat.gpus)",
                  phase=_phase(path, info), builds_model=isinstance(info.get("model_config"), dict))
    return Run(path, "nanochat run folder", metrics, info, knows, problems, [], source="nanochat")


def _is_run_folder(path: Path, head: str) -> bool:
    if path.is_dir():
        return (path / METRICS).is_file() or (path / RUN_JSON).is_file()
    return path.name in (METRICS, RUN_JSON) and (path.parent / RUN_JSON).is_file()


RUN_FOLDER = Format("nanochat", f"a nanochat run folder ({RUN_JSON} + {METRICS})", _is_run_folder, parse_run_folder)


# ---------------------------------------------------------------------------------------------
# base_train console output (nanochat/train_loop.py: sizing_table and the step / eval lines)

_STEP = re.compile(r"^step (\d+)/(\d+) \| loss (" + NUM + r") \(raw (" + NUM + r")\) \| lrm (" + NUM + r")"
                   r" \| dt (" + NUM + r")ms \| tok/s (" + NUM + r") \| mfu (?:(" + NUM + r")%|n/a)")
# chat_sft's step line: no planned total, an epoch fraction, the val loss on eval steps
_SFT_STEP = re.compile(r"^step (\d+) \| loss (" + NUM + r") \(raw (" + NUM + r")\) \| lrm (" + NUM + r") \| epoch ("
                       + NUM + r") \| dt (" + NUM + r")ms(?: \| val loss (" + NUM + "))?")
_VAL = re.compile(r"^step (\d+) \| val bpb (" + NUM + r") \| val loss (" + NUM + ")")
_CORE = re.compile(r"^step (\d+) \| CORE (" + NUM + ")")
_ROW = re.compile(r"^ {2,}(\S.*?)\s{2,}(\S.*)$")


def _table_int(v: str) -> int | None:
    m = re.match(NUM, v)
    return int(num(m.group(0))) if m else None


def parse_console(path, config=None) -> Run:
    path = Path(path)
    text = path.read_text(errors="replace")
    rows, metrics, in_table, phase = {}, {}, False, "base"
    for line in text.splitlines():
        line = line.rstrip()
        if line == "sizing":
            in_table = True
            continue
        if in_table:
            if m := _ROW.match(line):
                rows[m.group(1).strip()] = m.group(2).strip()
                continue
            in_table = False
        if m := _STEP.match(line):
            s = int(m.group(1))
            rec = metrics.setdefault(s, {"step": s})
            rec.update(loss=num(m.group(3)), raw_loss=num(m.group(4)), lr=num(m.group(5)), dt=num(m.group(6)) / 1000,
                       tok_per_sec=num(m.group(7)))
            if m.group(8):
                rec["mfu"] = num(m.group(8)) / 100
            rows.setdefault("_N", m.group(2))
        elif m := _SFT_STEP.match(line):
            s = int(m.group(1))
            rec = metrics.setdefault(s, {"step": s})
            rec.update(loss=num(m.group(2)), raw_loss=num(m.group(3)), lr=num(m.group(4)), progress=num(m.group(5)),
                       dt=num(m.group(6)) / 1000)
            if m.group(7):
                rec["val_loss"] = num(m.group(7))
            phase = "sft"
        elif m := _VAL.match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s}).update(val_bpb=num(m.group(2)), val_loss=num(m.group(3)))
        elif m := _CORE.match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s})["core"] = num(m.group(2))
    if not metrics:
        raise RunFormatError(f"{path}: no `step 00012/460 | loss ... (raw ...)` lines: is this nanochat base_train or "
                             "chat_sft output?")
    skipped = []
    sz = {}
    for key, row in (("num_params", "parameters (total)"), ("scaling_params", "scaling (block matrices + head)"),
                     ("embedding_params", "embeddings (token + value)"), ("tokens_per_step", "tokens per step"),
                     ("num_iterations", "steps"), ("total_tokens", "total tokens")):
        if row in rows and (v := _table_int(rows[row])) is not None:
            sz[key] = v
    if "FLOPs per token" in rows:
        sz["flops_per_token"] = num(rows["FLOPs per token"])
    if m := re.match(r"warmup (\d+), warmdown (" + NUM + r"), final (" + NUM + ")", rows.get("schedule", "")):
        sz.update(warmup_steps=int(m.group(1)), warmdown_ratio=num(m.group(2)), final_lr_frac=num(m.group(3)))
    if "num_iterations" not in sz and "_N" in rows:
        sz["num_iterations"] = int(rows["_N"])
    if "sizing" not in text:
        skipped.append("the sizing table (parameters, tokens per step, schedule): the log starts after it")
    if "tokens_per_step" in sz:
        for s, rec in metrics.items():
            rec["tokens"] = s * sz["tokens_per_step"]
    peak = None
    if m := re.match(r"(" + NUM + ") dense bf16", rows.get("peak FLOP/s (MFU)", "")):
        peak = num(m.group(1))
    device = re.search(r"\((.*)\)$", rows.get("world size", ""))
    info = dict(sizing=sz, env={"device_name": device.group(1) if device else None, "peak_flops": peak})
    knows = Knows(params="scaling", loss_smoothing=LOSS_EMA, lr_schedule=schedule_of(sz),
                  planned_steps="num_iterations" in sz, tokens_per_step="tokens_per_step" in sz, eval_offset=1,
                  mfu_peak_flops=peak, mfu_peak_note="the detected GPU's dense bf16 peak (nanochat.gpus)", phase=phase)
    if phase == "sft":
        skipped = [x for x in skipped if not x.startswith("the sizing table")]
    return Run(path, f"nanochat {'chat_sft' if phase == 'sft' else 'base_train'} console log", [metrics[k] for k in sorted(metrics)], info, knows, [], skipped,
               source="nanochat-console")


def _is_console(path: Path, head: str) -> bool:
    return path.is_file() and bool(re.search(r"^step \d{5}(?:/\d+)? \| loss " + NUM + r" \(raw ", head, re.M))


CONSOLE = Format("nanochat-console", "this project's base_train / chat_sft console output (`step 00012/460 | loss 3.1 (raw 3.2) | ...`)",
                 _is_console, parse_console)
