"""Read training runs that other programs produced, into the run doctor's shape.

Formats (auto-detected by `detect`):
  nanochat      our own run folder (run.json + metrics.jsonl; read through nanochat.run_dir)
  nanogpt       a karpathy/nanoGPT `train.py` console log, with its config `.py` (read with `ast` and
                `tokenize`, never executed; comments are kept, since that is where people write the size
                they think they train)
  karpathy-nanochat  a karpathy/nanochat `scripts/base_train.py` console log
  wandb         a wandb run-history export: CSV, or JSON lines, of the logged keys

Each parser returns a `ParsedRun`: `metrics` (one dict per logged step; the keys the doctor reads are
step, tokens, raw_loss (training-mode loss of a step), loss (smoothed), val_loss (nats/token), val_bpb,
eval_train_loss (eval-mode loss on the training split), lr (multiplier of the peak), mfu (fraction of
`info["mfu_peak_flops"]`), dt, core) and `info` (sizes, plan, schedule, claims). What a format does not
carry is listed in `skipped`, never filled in with a guess.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from nanochat.run_dir import METRICS, RUN_JSON, read_metrics, read_run_json

A100_BF16 = 312e12  # nanoGPT's estimate_mfu divides by this, whatever GPU ran the job

# nanoGPT train.py's defaults (the values a config file and `--key=value` override)
NANOGPT_DEFAULTS = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=False, dropout=0.0,
                        batch_size=12, gradient_accumulation_steps=40, learning_rate=6e-4, max_iters=600000,
                        lr_decay_iters=600000, warmup_iters=2000, min_lr=6e-5, decay_lr=True, init_from="scratch",
                        eval_interval=2000, eval_iters=200, log_interval=1)
# the shapes `init_from='gpt2*'` loads (nanoGPT model.py from_pretrained)
GPT2_SHAPES = {"gpt2": dict(n_layer=12, n_head=12, n_embd=768), "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
               "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280), "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600)}
GPT2_SIZES = {"gpt2": 124e6, "gpt2-medium": 350e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6}


@dataclass
class ParsedRun:
    source: str
    path: Path
    metrics: list[dict]
    info: dict
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # what the format lacks (checks skip on these)


class RunFormatError(ValueError):
    """The path is not a run this module can read (the message says what it expected)."""


# ---------------------------------------------------------------------------------------------
# numbers in text

_NUM = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"
_SIZE_RE = re.compile(r"(?<![a-z0-9.])~?\s?(\d+(?:\.\d+)?)\s?([kmb])(?![a-z])", re.IGNORECASE)


def _n(s: str) -> float:
    return float(s.replace(",", ""))


def size_claims(text: str, where: str) -> list[dict]:
    """Parameter sizes written in free text ("~125M", "1.3B params", "gpt2-medium")."""
    out = []
    for m in _SIZE_RE.finditer(text):
        v = float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
        if v >= 1e5:  # "8k context", "4k vocab" are not model sizes
            out.append(dict(value=v, text=m.group(0).strip(), where=where))
    for name in sorted(GPT2_SIZES, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE) and not out:
            out.append(dict(value=GPT2_SIZES[name], text=name, where=where))
            break
    return out


# ---------------------------------------------------------------------------------------------
# nanoGPT: parameter count and config file


def nanogpt_params(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = False) -> dict:
    """Closed-form parameter counts of nanoGPT's GPT (tied wte/lm_head, LayerNorm, 4x MLP).

    `printed` is what train.py prints (`get_num_params()`, non_embedding=True: the position embeddings
    are subtracted, the tied token embedding stays). `scaling` is nanochat's convention (transformer
    matrices + the LM head, i.e. the tied embedding counted once)."""
    C, L = n_embd, n_layer
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # qkv, proj, fc, proj (+ biases) and two LayerNorms
    ln_f = 2 * C if bias else C
    wte, wpe = vocab_size * C, block_size * C
    total = wte + wpe + L * per_layer + ln_f
    return dict(total=total, printed=total - wpe, wpe=wpe, wte=wte, blocks=L * per_layer,
                matrices=12 * C * C * L, scaling=12 * C * C * L + wte)


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


def explain_size_gap(dims: dict, target: float, convention: str = "total") -> list[dict]:
    """For each dimension alone, the value that brings the `convention` count nearest `target`.

    Candidates are ranked by how close the rounded value lands (a typo in one number explains a gap
    exactly); n_embd is kept a multiple of n_head (and of 64 when the config's is)."""
    def count(**kw):
        d = {**dims, **kw}
        return nanogpt_params(d["n_layer"], d["n_embd"], d["vocab_size"], d["block_size"], d["bias"])[convention]

    out = []
    # n_layer: count is linear in it
    per_layer = count(n_layer=1) - count(n_layer=0)
    L = max(1, round((target - count(n_layer=0)) / per_layer)) if per_layer else None
    if L and L != dims["n_layer"]:
        out.append(dict(dim="n_layer", value=L, count=count(n_layer=L)))
    # n_embd: quadratic; search the grid of allowed widths
    step = dims["n_head"] * (64 // math.gcd(64, dims["n_head"])) if dims["n_embd"] % 64 == 0 else dims["n_head"]
    best = min(range(step, 16385, step), key=lambda c: abs(count(n_embd=c) - target))
    if best != dims["n_embd"]:
        out.append(dict(dim="n_embd", value=best, count=count(n_embd=best)))
    per_tok = count(vocab_size=1) - count(vocab_size=0)
    V = round((target - count(vocab_size=0)) / per_tok)
    if V > 0 and V != dims["vocab_size"]:
        out.append(dict(dim="vocab_size", value=V, count=count(vocab_size=V)))
    for c in out:
        c["relative_error"] = abs(c["count"] - target) / target
        c["relative_change"] = abs(math.log(c["value"] / dims[c["dim"]]))
    out.sort(key=lambda c: (round(c["relative_error"], 2), c["relative_change"]))
    return out


# ---------------------------------------------------------------------------------------------
# nanoGPT console log

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


def looks_like_nanogpt(text: str) -> bool:
    return bool(re.search(r"^iter \d+: loss .*mfu", text, re.M) or "number of parameters:" in text
                and re.search(r"^step \d+: train loss", text, re.M))


def parse_nanogpt(path, config=None) -> ParsedRun:
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
    info = dict(
        source="nanogpt", format="nanoGPT train.py console log", config=cfg, config_set_by=set_by,
        config_file=str(config) if config else None, comments=conf["comments"] if conf else [],
        dims=dims, counts=counts, printed_params=printed, claims=claims,
        mfu_peak_flops=A100_BF16, mfu_peak_note="nanoGPT's estimate_mfu divides by an A100's 312 TFLOP/s (bf16), whatever GPU ran",
        dropout=cfg.get("dropout"),
        sizing=dict(num_params=counts["total"] if counts else None, scaling_params=counts["scaling"] if counts else None,
                    tokens_per_step=tokens_per_iter, num_iterations=max_iters,
                    total_tokens=max_iters * tokens_per_iter if tokens_per_iter and max_iters else None,
                    warmup_steps=cfg.get("warmup_iters"), schedule="cosine" if cfg.get("decay_lr", True) else "constant",
                    lr_decay_iters=cfg.get("lr_decay_iters"), min_lr_frac=(cfg["min_lr"] / cfg["learning_rate"])
                    if isinstance(cfg.get("min_lr"), (int, float)) and cfg.get("learning_rate") else None),
    )
    if not evals:
        skipped.append("validation loss (no `step N: train loss X, val loss Y` lines)")
    return ParsedRun("nanogpt", path, [metrics[k] for k in sorted(metrics)], info, problems, skipped)


def nanogpt_lr(it: int, cfg: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters, min_lr after."""
    lr, min_lr, warm, decay = cfg["learning_rate"], cfg["min_lr"], cfg["warmup_iters"], cfg["lr_decay_iters"]
    if it < warm:
        return lr * (it + 1) / (warm + 1)
    if it > decay:
        return min_lr
    ratio = (it - warm) / max(1, decay - warm)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


# ---------------------------------------------------------------------------------------------
# karpathy/nanochat base_train console log

_KN = dict(
    step=re.compile(r"^step (\d+)/(\d+) \(([\d.]+)%\) \| loss: (" + _NUM + r") \| lrm: (" + _NUM + r")"
                    r"(?: \| dt: (" + _NUM + r")ms)?(?: \| tok/sec: (" + _NUM + r"))?(?: \| (?:bf16_)?mfu: (" + _NUM + "))?"),
    val=re.compile(r"^Step (\d+) \| Validation bpb: (" + _NUM + ")"),
    core=re.compile(r"^Step (\d+) \| CORE metric: (" + _NUM + ")"),
    gpu=re.compile(r"^GPU: (.+?) \| Peak FLOPS \(BF16\): (" + _NUM + ")"),
    vocab=re.compile(r"^Vocab size: (" + _NUM + ")"),
    count=re.compile(r"^(\w+)\s*: (" + _NUM + r")$"),
    flops_tok=re.compile(r"^Estimated FLOPs per token: (" + _NUM + ")"),
    total_tokens=re.compile(r"^Total number of training tokens: (" + _NUM + ")"),
    ratio=re.compile(r"^Tokens : (?:Scaling params|Params) ratio: (" + _NUM + ")"),
    batch=re.compile(r"^Total batch size (" + _NUM + r") => gradient accumulation steps: (\d+)"),
    auto_batch=re.compile(r"^Auto-computed optimal batch size: (" + _NUM + ")"),
    iters=re.compile(r"^(?:Using user-provided number of iterations|Calculated number of iterations from [^:]+): (" + _NUM + ")"),
)


def looks_like_karpathy_nanochat(text: str) -> bool:
    return bool(re.search(r"^step \d{5}/\d{5} \(", text, re.M) or "Tokens : Scaling params ratio" in text
                or re.search(r"^Step \d{5} \| Validation bpb", text, re.M))


def parse_karpathy_nanochat(path) -> ParsedRun:
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
            if m := _KN["count"].match(line):
                counts[m.group(1)] = int(_n(m.group(2)))
                continue
            in_counts = False
        if m := _KN["step"].match(line):
            s = int(m.group(1))
            n_iter = n_iter or int(m.group(2))
            rec = metrics.setdefault(s + 1, {"step": s + 1})  # the line after update `s`: s + 1 steps done
            rec.update(loss=_n(m.group(4)), lr=_n(m.group(5)))
            if m.group(6):
                rec["dt"] = _n(m.group(6)) / 1000
            if m.group(7):
                rec["tok_per_sec"] = _n(m.group(7))
            if m.group(8):
                rec["mfu"] = _n(m.group(8)) / 100
        elif m := _KN["val"].match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s})["val_bpb"] = _n(m.group(2))
        elif m := _KN["core"].match(line):
            s = int(m.group(1))
            metrics.setdefault(s, {"step": s})["core"] = _n(m.group(2))
        elif m := _KN["gpu"].match(line):
            info["gpu_name"], info["mfu_peak_flops"] = m.group(1), _n(m.group(2))
        elif m := _KN["vocab"].match(line):
            info["vocab_size"] = int(_n(m.group(1)))
        elif m := _KN["flops_tok"].match(line):
            info["flops_per_token"] = _n(m.group(1))
        elif m := _KN["total_tokens"].match(line):
            info["total_tokens"] = _n(m.group(1))
        elif m := _KN["ratio"].match(line):
            info["printed_ratio"] = _n(m.group(1))
        elif m := _KN["batch"].match(line):
            batch = _n(m.group(1))
        elif (m := _KN["auto_batch"].match(line)) and batch is None:
            batch = _n(m.group(1))
        elif m := _KN["iters"].match(line):
            n_iter = int(_n(m.group(1)))
    if not metrics:
        raise RunFormatError(f"{path}: no `step 00100/21400 (...) | loss: ...` lines: is this a nanochat base_train log?")
    # `loss:` is a debiased EMA (beta 0.9) of the step losses: invert it where consecutive steps are logged,
    # x_t = (ema_t - 0.9 ema_{t-1}) / 0.1 with ema_t = loss_t (1 - 0.9^(t+1)) -- the doctor's fits want the raw losses
    for s, rec in metrics.items():
        prev = metrics.get(s - 1)
        if "loss" in rec and prev is not None and "loss" in prev:
            t = s - 1  # the step index of the update this line reports
            ema, ema_prev = rec["loss"] * (1 - 0.9 ** (t + 1)), prev["loss"] * (1 - 0.9 ** t)
            rec["raw_loss"] = (ema - 0.9 * ema_prev) / 0.1
        elif "loss" in rec and s == 1:
            rec["raw_loss"] = rec["loss"]
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
    info.update(source="karpathy-nanochat", format="karpathy/nanochat base_train console log", counts_table=counts,
                claims=[], dropout=0.0,
                sizing=dict(num_params=counts.get("total"), scaling_params=scaling, tokens_per_step=batch,
                            num_iterations=n_iter, total_tokens=info.get("total_tokens") or (n_iter * batch if n_iter and batch else None),
                            schedule="trapezoid", flops_per_token=info.get("flops_per_token")))
    skipped.append("warmup steps and warmdown ratio (not printed; read from the logged lrm)")
    return ParsedRun("karpathy-nanochat", path, [metrics[k] for k in sorted(metrics)], info, [], skipped)


# ---------------------------------------------------------------------------------------------
# wandb history export

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


def parse_wandb(path, config=None) -> ParsedRun:
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
    info = dict(source="wandb", format=f"wandb history export ({path.suffix.lstrip('.').upper()})", mapping=mapping,
                config_set_by={},
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
    return ParsedRun("wandb", path, metrics, info, [], skipped)


# ---------------------------------------------------------------------------------------------
# our own run folder, and detection


def parse_nanochat_dir(path) -> ParsedRun:
    path = Path(path)
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
    info = {**info, "source": "nanochat"}
    return ParsedRun("nanochat", path, metrics, info, problems, [])


def detect(path) -> str:
    """'nanochat' | 'nanogpt' | 'karpathy-nanochat' | 'wandb'; RunFormatError naming what was expected."""
    path = Path(path)
    if path.is_dir():
        return "nanochat"
    if not path.is_file():
        raise FileNotFoundError(f"no such run folder or log file: {path}")
    if path.name == METRICS and (path.parent / RUN_JSON).is_file():
        return "nanochat"
    if path.suffix.lower() == ".csv":
        return "wandb"
    head = path.read_text(errors="replace")[:2_000_000]
    first = head.lstrip()[:1]
    if first == "{" and path.suffix.lower() in (".jsonl", ".json", ".ndjson", ".log", ".txt", ""):
        return "wandb"
    if looks_like_karpathy_nanochat(head):
        return "karpathy-nanochat"
    if looks_like_nanogpt(head):
        return "nanogpt"
    raise RunFormatError(f"{path}: not a run folder, a nanoGPT train.py log, a nanochat base_train log, or a wandb "
                         "history export (.csv / .jsonl); pass one of those")


def parse(path, config=None) -> ParsedRun:
    """Read any supported run (see `detect`); `config` is the run's config .py (nanoGPT, wandb)."""
    kind = detect(path)
    path = Path(path)
    if kind == "nanochat":
        return parse_nanochat_dir(path if path.is_dir() else path.parent)
    if kind == "nanogpt":
        return parse_nanogpt(path, config)
    if kind == "karpathy-nanochat":
        return parse_karpathy_nanochat(path)
    return parse_wandb(path, config)
