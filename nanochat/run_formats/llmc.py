"""karpathy/llm.c: train_gpt2.cu console output.

Read from its printf0 calls: the parameter table (`| total batch size | 524288 |`, `| max_steps |`,
`| learning rate (LR) |`, `| warmup iterations |`, `| final LR fraction |`, `| LR scheduler |`,
`| device |`, `| peak TFlops |`, and the model's `| num_layers L |`, `| channels C |`,
`| padded_vocab_size Vp |`, `| max_sequence_length T |`, `| num_parameters |`), the step line
`step %4d/%d | loss %7.6f (%+.2fz)| norm %6.4f (%+.2fz)| lr %.2e | %.2f ms | %.1f%% bf16 MFU | %.0f tok/s`
(earlier versions: `| train loss %7.6f | norm %6.4f |`; the step's own mean loss, numbered step + 1: it reports the forward of the weights after `step`
updates) and `val loss %f`, printed at the top of iteration `step` (the weights after `step` updates)
before that iteration's step line. Its model is GPT-2 with biases and a padded, tied vocabulary;
`num_parameters` counts everything (position embeddings included).
"""

from __future__ import annotations

import re
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError
from nanochat.run_formats._text import NUM, num
from nanochat.run_formats.shapes import nanogpt_params

_ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([^|]*?)\s*\|$")
# both step lines of train_gpt2.cu's history: `| train loss %7.6f | norm` and `| loss %7.6f (%+.2fz)| norm`
_STEP = re.compile(r"^step\s+(\d+)/(\d+) \| (?:train )?loss (" + NUM + r")(?: \((?:z )?[-+\d.]+z?\))?\s*\| norm (" + NUM
                   + r").*?\| lr (" + NUM + r") \| (" + NUM + r") ms \| (" + NUM + r")% bf16 MFU \| (" + NUM + r") tok/s")
_VAL = re.compile(r"^val loss (" + NUM + ")")


def parse_llmc(path, config=None) -> Run:
    path = Path(path)
    rows, metrics = {}, {}
    last_step = 0  # steps done before the next step line: a `val loss` line belongs to it
    for line in path.read_text(errors="replace").splitlines():
        line = line.rstrip()
        if m := _ROW.match(line):
            rows.setdefault(m.group(1), m.group(2))
        elif m := _STEP.match(line):
            s = int(m.group(1))
            rec = metrics.setdefault(s, {"step": s})
            rec.update(raw_loss=num(m.group(3)), grad_norm=num(m.group(4)), lr_abs=num(m.group(5)),
                       dt=num(m.group(6)) / 1000, mfu=num(m.group(7)) / 100, tok_per_sec=num(m.group(8)))
            rows.setdefault("_N", m.group(2))
            last_step = s
        elif m := _VAL.match(line):
            metrics.setdefault(last_step, {"step": last_step})["val_loss"] = num(m.group(1))
    if not any("raw_loss" in r for r in metrics.values()):
        raise RunFormatError(f"{path}: no `step    1/18865 | loss ... | norm ... | lr ...` lines: is this llm.c train_gpt2 output?")

    def row_num(name):
        try:
            return num(rows[name])
        except (KeyError, ValueError):
            return None

    skipped = []
    tps = row_num("total batch size")
    n_iter = int(num(rows["_N"])) if "_N" in rows else None
    peak_lr = row_num("learning rate (LR)")
    lrs = [r["lr_abs"] for r in metrics.values() if "lr_abs" in r]
    peak_lr = peak_lr or (max(lrs) if lrs else None)
    for s, rec in metrics.items():
        if tps:
            rec["tokens"] = s * tps
        if "lr_abs" in rec and peak_lr:
            rec["lr"] = rec.pop("lr_abs") / peak_lr
    if not tps:
        skipped.append("tokens per step (no `| total batch size |` row)")
    dims = dict(n_layer=row_num("num_layers L"), n_head=row_num("num_heads NH"), n_embd=row_num("channels C"),
                vocab_size=row_num("padded_vocab_size Vp") or row_num("vocab_size V"),
                block_size=row_num("max_sequence_length T"), bias=True)
    counts = None
    if all(dims[k] for k in ("n_layer", "n_embd", "vocab_size", "block_size")):
        dims = {k: int(v) if isinstance(v, float) else v for k, v in dims.items()}
        counts = nanogpt_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"], dims["block_size"], True)
        counts["printed"] = counts["total"]  # llm.c prints every parameter
    else:
        skipped.append("the model table (num_layers, channels, vocab): no parameter count")
    peak_tf = row_num("peak TFlops")
    device = rows.get("device")
    info = dict(dims=dims if counts else None, counts=counts, family="gpt2", printed_params=row_num("num_parameters"),
                claims=[], dropout=0.0, gpu_name=device,
                sizing=dict(num_params=counts["total"] if counts else None, scaling_params=counts["scaling"] if counts else None,
                            tokens_per_step=tps, num_iterations=n_iter, total_tokens=n_iter * tps if n_iter and tps else None,
                            warmup_steps=row_num("warmup iterations"), schedule=rows.get("LR scheduler")))
    knows = Knows(params="total", printed_params="all parameters (position embeddings and the padded vocabulary included)",
                  loss_smoothing=None, lr_schedule=None, planned_steps=n_iter is not None, tokens_per_step=bool(tps),
                  eval_offset=1, mfu_peak_flops=peak_tf * 1e12 if peak_tf else None,
                  mfu_peak_note="llm.c's get_flops_promised for the device it ran on (mfu.h)")
    return Run(path, "llm.c train_gpt2 console log", [metrics[k] for k in sorted(metrics)], info, knows, [], skipped,
               source="llm.c")


def _looks_like(path: Path, text: str) -> bool:
    return path.is_file() and bool(re.search(r"^step\s+\d+/\d+ \| (?:train )?loss [\d.]+[^|]*\| norm ", text, re.M))


FORMAT = Format("llm.c", "an llm.c train_gpt2 log (`step    1/18865 | loss 11.0 (+0.00z)| norm ...`)", _looks_like, parse_llmc)
