"""karpathy/nanoGPT: a train.py console log, with the config .py it read (parsed with `ast` and
`tokenize`, never executed; comments are kept, since that is where people write the size they think
they train). The prints parsed are train.py's own: `Overriding: k = v` (configurator.py), `tokens per
iteration will be:`, `number of parameters: X.XXM` (model.py get_num_params, position embeddings
excluded), `step N: train loss X, val loss Y` (estimate_loss, eval mode on both splits) and
`iter N: loss X, time Yms, mfu Z%` (the step's own loss; MFU of an A100's 312 TFLOP/s whatever GPU ran).
"""

from __future__ import annotations

import ast
import io
import math
import re
import tokenize
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError
from nanochat.run_formats._text import NUM as _NUM
from nanochat.run_formats._text import num as _n
from nanochat.run_formats._text import size_claims
from nanochat.run_formats.shapes import GPT2_SHAPES, nanogpt_params

A100_BF16 = 312e12  # nanoGPT's estimate_mfu divides by this, whatever GPU ran the job

# nanoGPT train.py's defaults (the values a config file and `--key=value` override)
NANOGPT_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=False, dropout=0.0,
                        batch_size=12, gradient_accumulation_steps=40, learning_rate=6e-4, max_iters=600000,
                        lr_decay_iters=600000, warmup_iters=2000, min_lr=6e-5, decay_lr=True, init_from="scratch",
                        eval_interval=2000, eval_iters=200, log_interval=1)


def _safe_eval(node, names: dict):
    """Value of a literal expression: numbers, strings, bools, None, + - * / // ** %, names bound above."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise ValueError(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _safe_eval(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else (v if isinstance(node.op, ast.UAdd) else not v)
    if isinstance(node, ast.BinOp):
        a, b = _safe_eval(node.left, names), _safe_eval(node.right, names)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b,
               ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b,
               ast.Pow: lambda: a ** b if abs(b) < 64 else math.inf}
        if type(node.op) in ops:
            return ops[type(node.op)]()
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_safe_eval(e, names) for e in node.elts]
    raise ValueError(ast.dump(node)[:40])


def read_config_py(path) -> dict:
    """A nanoGPT-style config file: top-level `name = value` lines, evaluated as literals (never run).

    Returns {"values": {name: value}, "comments": [{line, text, name}], "unreadable": [names]}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config file not found: {path}")
    src = path.read_text(errors="replace")
    try:
        tree = ast.parse(src, filename=str(path))
    except SyntaxError as e:
        raise RunFormatError(f"{path} is not valid Python ({e.msg}, line {e.lineno}): pass the config .py that train.py read")
    values, unreadable, line_name = {}, [], {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            line_name[node.lineno] = name
            try:
                values[name] = _safe_eval(node.value, values)
            except (ValueError, TypeError, ZeroDivisionError, OverflowError):
                unreadable.append(name)
    comments = []
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments.append(dict(line=tok.start[0], text=tok.string.lstrip("#").strip(),
                                 name=line_name.get(tok.start[0])))
    return dict(values=values, comments=comments, unreadable=unreadable, path=str(path))



# ---------------------------------------------------------------------------------------------
# the console log

_NG = dict(
    tokens_per_iter=re.compile(r"tokens per iteration will be:\s*(" + _NUM + ")"),
    params=re.compile(r"number of parameters:\s*(" + _NUM + r")M"),
    vocab_meta=re.compile(r"found vocab_size = (\d+)"),
    vocab_default=re.compile(r"defaulting to vocab_size of GPT-2 to (\d+)"),
    eval=re.compile(r"^step (\d+): train loss (" + _NUM + r"), val loss (" + _NUM + ")"),
    iter=re.compile(r"^iter (\d+): loss (" + _NUM + r"), time (" + _NUM + r")ms, mfu (" + _NUM + ")%"),
    override=re.compile(r"^Overriding: (\w+) = (.+)$"),
    config_file=re.compile(r"^Overriding config with (\S+?):?$"),
    init=re.compile(r"^(Initializing a new model from scratch|Resuming training from|initializing from OpenAI GPT-2 weights: (\S+))"),
)


def looks_like_nanogpt(path: Path, text: str) -> bool:
    return path.is_file() and bool(re.search(r"^iter \d+: loss .*mfu", text, re.M) or "number of parameters:" in text
                and re.search(r"^step \d+: train loss", text, re.M))


def parse_nanogpt(path, config=None) -> Run:
    path = Path(path)
    text = path.read_text(errors="replace")
    cfg = dict(NANOGPT_DEFAULTS)
    set_by = {k: "train.py default" for k in cfg}
    claims, problems, skipped = [], [], []
    conf = None
    if config:
        conf = read_config_py(config)
        for k, v in conf["values"].items():
            cfg[k], set_by[k] = v, f"{Path(config).name}"
        for c in conf["comments"]:
            claims += size_claims(c["text"], f"comment in {Path(config).name} line {c['line']}")
        for k, v in conf["values"].items():
            if isinstance(v, str) and k in ("wandb_run_name", "out_dir", "wandb_project"):
                claims += size_claims(v, f"{k} = {v!r} in {Path(config).name}")
        claims += size_claims(Path(config).stem.replace("_", " "), f"the config's file name {Path(config).name}")
        if conf["unreadable"]:
            problems.append(f"{Path(config).name}: not a literal, not read: {', '.join(conf['unreadable'])}")
    metrics, evals = {}, 0
    printed = tokens_per_iter = vocab = None
    for line in text.splitlines():
        line = line.rstrip()
        if m := _NG["override"].match(line):
            k, raw = m.group(1), m.group(2)
            try:
                cfg[k] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                cfg[k] = raw
            set_by[k] = "the command line (log)"
        elif m := _NG["config_file"].match(line):
            if not config:
                claims += size_claims(Path(m.group(1)).stem.replace("_", " "), f"the config file name in the log ({m.group(1)})")
        elif m := _NG["tokens_per_iter"].search(line):
            tokens_per_iter = _n(m.group(1))
        elif m := _NG["params"].search(line):
            printed = _n(m.group(1)) * 1e6
        elif m := (_NG["vocab_meta"].search(line) or _NG["vocab_default"].search(line)):
            vocab = int(m.group(1))
        elif (m := _NG["init"].match(line)) and m.group(2):
            cfg["init_from"] = m.group(2)
        elif m := _NG["eval"].match(line):
            s = int(m.group(1))
            rec = metrics.setdefault(s, {"step": s})
            rec.update(eval_train_loss=_n(m.group(2)), val_loss=_n(m.group(3)))
            evals += 1
        elif m := _NG["iter"].match(line):
            s = int(m.group(1))
            rec = metrics.setdefault(s, {"step": s})
            mfu = _n(m.group(4))
            rec.update(raw_loss=_n(m.group(2)), dt=_n(m.group(3)) / 1000)
            if mfu >= 0:  # train.py prints -100.00% until its 5th iteration
                rec["mfu"] = mfu / 100
    if not metrics:
        raise RunFormatError(f"{path}: no `iter N: loss ...` or `step N: train loss ...` lines: is this a nanoGPT train.py log?")
    init = str(cfg.get("init_from", "scratch"))
    if init.startswith("gpt2") and init in GPT2_SHAPES:
        cfg.update(GPT2_SHAPES[init])
        vocab = vocab or 50257
        for k in GPT2_SHAPES[init]:
            set_by[k] = f"init_from={init!r}"
    if vocab is None:
        vocab = cfg.get("vocab_size")
        if vocab is None:
            skipped.append("vocab size (the log has no `found vocab_size` / `defaulting to vocab_size` line)")
    cfg["vocab_size"] = vocab
    if tokens_per_iter is None:
        skipped.append("tokens per iteration (no `tokens per iteration will be:` line)")
    if not config:
        skipped.append("the config file (pass --config FILE): model shape, schedule and claims are train.py's defaults "
                       "plus the log's `Overriding:` lines")
    for s, rec in metrics.items():
        if tokens_per_iter:
            rec["tokens"] = s * tokens_per_iter  # iter s has trained s iterations' worth before its update
        if cfg.get("decay_lr", True) and all(isinstance(cfg.get(k), (int, float)) for k in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters")):
            rec["lr"] = nanogpt_lr(s, cfg) / cfg["learning_rate"]
    dims = {k: cfg.get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    dims["vocab_size"] = vocab
    counts = nanogpt_params(dims["n_layer"], dims["n_embd"], vocab, dims["block_size"], bool(dims["bias"])) if vocab else None
    max_iters = cfg.get("max_iters")
    schedule_known = all(isinstance(cfg.get(k), (int, float)) for k in ("learning_rate", "min_lr", "warmup_iters", "lr_decay_iters"))
    info = dict(
        config=cfg, config_set_by=set_by, config_file=str(config) if config else None,
        comments=conf["comments"] if conf else [], family="gpt2",
        dims=dims, counts=counts, printed_params=printed, claims=claims, dropout=cfg.get("dropout"),
        sizing=dict(num_params=counts["total"] if counts else None, scaling_params=counts["scaling"] if counts else None,
                    tokens_per_step=tokens_per_iter, num_iterations=max_iters,
                    total_tokens=max_iters * tokens_per_iter if tokens_per_iter and max_iters else None,
                    warmup_steps=cfg.get("warmup_iters"), schedule="cosine" if cfg.get("decay_lr", True) else "constant"),
    )
    if not evals:
        skipped.append("validation loss (no `step N: train loss X, val loss Y` lines)")
    if not cfg.get("decay_lr", True):
        lr_schedule = lambda s: 1.0  # noqa: E731
    elif schedule_known:
        lr_schedule = lambda s: nanogpt_lr(int(s), cfg) / cfg["learning_rate"]  # noqa: E731
    else:
        lr_schedule = None
    # iter N logs the loss of the weights after N updates, and the eval at the top of iter N scores the same weights
    knows = Knows(params="total", printed_params="non-embedding: model.py get_num_params() subtracts the position "
                  "embeddings (block_size x n_embd); the tied token embedding stays", loss_smoothing=None,
                  lr_schedule=lr_schedule, planned_steps=isinstance(max_iters, (int, float)),
                  tokens_per_step=tokens_per_iter is not None, eval_offset=0, mfu_peak_flops=A100_BF16,
                  mfu_peak_note="nanoGPT's estimate_mfu divides by an A100's 312 TFLOP/s (bf16), whatever GPU ran")
    return Run(path, "nanoGPT train.py console log", [metrics[k] for k in sorted(metrics)], info, knows, problems,
               skipped, source="nanogpt")


def nanogpt_lr(it: int, cfg: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters, min_lr after."""
    lr, min_lr, warm, decay = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"]
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    if it > decay:
        return min_lr
    ratio = (it - warm) / max(1, decay - warm)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)




FORMAT = Format("nanogpt", "a nanoGPT train.py log (`iter 100: loss 3.2, time 400ms, mfu 30%`; pass its --config FILE)",
                looks_like_nanogpt, parse_nanogpt)
