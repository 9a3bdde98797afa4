"""Hugging Face Transformers `Trainer` output: an output_dir or a checkpoint-N folder (trainer_state.json,
config.json beside it), or the trainer_state.json itself.

trainer_state.json is `TrainerState` (transformers trainer_callback.py): global_step, max_steps,
logging_steps, train_batch_size (per device x GPUs, without accumulation or sequence length) and
`log_history`, the dicts `Trainer.log` received, each with `step` and `epoch`. Training entries carry
`loss` (trainer.py `_maybe_log_save_evaluate`: the summed step losses since the previous log divided by
the steps between, i.e. the mean of the last `logging_steps` step losses), `learning_rate`,
`grad_norm`, and `num_input_tokens_seen` when `include_num_input_tokens_seen` is on; evaluation entries
carry `eval_loss` (the weights after `step` updates); the last entry holds `train_loss`, the mean over
the whole run. config.json gives the shape: GPT-2 (`n_layer`, `n_embd`, `n_positions`, dropouts
`resid_pdrop` etc., 0.1 by default) or Llama-style (`num_hidden_layers`, `hidden_size`,
`intermediate_size`, `num_key_value_heads`, `tie_word_embeddings`).
"""

from __future__ import annotations

import json
from pathlib import Path

from nanochat.run_formats import Format, Knows, Run, RunFormatError, Smoothing
from nanochat.run_formats._text import size_claims
from nanochat.run_formats.shapes import llama_params, nanogpt_params

STATE = "trainer_state.json"
LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2", "smollm3"}


def _state_path(path: Path) -> Path | None:
    if path.is_file() and path.name == STATE:
        return path
    if path.is_dir():
        if (path / STATE).is_file():
            return path / STATE
        ckpts = sorted(path.glob(f"checkpoint-*/{STATE}"), key=lambda p: int(p.parent.name.split("-")[-1])
                       if p.parent.name.split("-")[-1].isdigit() else -1)
        if ckpts:
            return ckpts[-1]  # the latest checkpoint holds the whole log history
    return None


def model_shape(cfg: dict) -> tuple[str | None, dict | None, dict | None, float | None]:
    """(family, dims, counts, dropout) of a config.json; Nones for a type this module does not count."""
    mt = cfg.get("model_type")
    if mt == "gpt2" or all(k in cfg for k in ("n_layer", "n_embd", "vocab_size")):
        dims = dict(n_layer=cfg["n_layer"], n_head=cfg.get("n_head", 12), n_embd=cfg["n_embd"], vocab_size=cfg["vocab_size"],
                    block_size=cfg.get("n_positions", 1024), bias=True)
        counts = nanogpt_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"], dims["block_size"], True)
        counts["printed"] = counts["total"]
        drop = max((cfg.get(k) or 0.0) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop"))
        return "gpt2", dims, counts, drop
    if mt in LLAMA_TYPES or all(k in cfg for k in ("num_hidden_layers", "hidden_size", "intermediate_size")):
        dims = dict(n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"], n_embd=cfg["hidden_size"],
                    vocab_size=cfg["vocab_size"], n_kv_head=cfg.get("num_key_value_heads"),
                    intermediate_size=cfg.get("intermediate_size"), tie_word_embeddings=bool(cfg.get("tie_word_embeddings")))
        counts = llama_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"], dims["n_head"], dims["n_kv_head"],
                              dims["intermediate_size"], dims["tie_word_embeddings"])
        drop = max(float(cfg.get("attention_dropout") or 0.0), float(cfg.get("hidden_dropout") or 0.0))
        return "llama", dims, counts, drop
    return None, None, None, None


def parse_hf_trainer(path, config=None) -> Run:
    path = Path(path)
    sp = _state_path(path)
    if sp is None:
        raise RunFormatError(f"{path}: no {STATE} (in the folder or its checkpoint-N/ folders)")
    try:
        state = json.loads(sp.read_text())
    except json.JSONDecodeError as e:
        raise RunFormatError(f"{sp} is not valid JSON ({e})") from e
    hist = state.get("log_history")
    if not isinstance(hist, list):
        raise RunFormatError(f"{sp} has no log_history list: is it a Trainer state?")
    metrics, skipped, problems = {}, [], []
    for e in hist:
        if not isinstance(e, dict) or not isinstance(e.get("step"), (int, float)):
            continue
        s = int(e["step"])
        rec = metrics.setdefault(s, {"step": s})
        if isinstance(e.get("loss"), (int, float)):
            rec["loss"] = float(e["loss"])
        if isinstance(e.get("eval_loss"), (int, float)):
            rec["val_loss"] = float(e["eval_loss"])
        if isinstance(e.get("learning_rate"), (int, float)):
            rec["lr_abs"] = float(e["learning_rate"])
        if isinstance(e.get("num_input_tokens_seen"), (int, float)) and e["num_input_tokens_seen"] > 0:
            rec["tokens"] = float(e["num_input_tokens_seen"])
        if isinstance(e.get("grad_norm"), (int, float)):
            rec["grad_norm"] = float(e["grad_norm"])
    metrics = {s: r for s, r in metrics.items() if len(r) > 1}
    if not metrics:
        raise RunFormatError(f"{sp}: log_history has no loss or eval_loss entries")
    lrs = [r["lr_abs"] for r in metrics.values() if "lr_abs" in r]
    peak = max(lrs) if lrs else None
    for r in metrics.values():
        if "lr_abs" in r and peak:
            r["lr"] = r.pop("lr_abs") / peak
    tok = sorted((s, r["tokens"]) for s, r in metrics.items() if "tokens" in r)
    tps = (tok[-1][1] / tok[-1][0]) if tok and tok[-1][0] else None
    if tps is None:
        skipped.append("tokens per step (trainer_state.json has batch size per device, not accumulation or sequence "
                       "length; log with include_num_input_tokens_seen, or give --tokens-per-step N)")
    n_iter = state.get("max_steps") or None
    info = dict(claims=[], trainer_state=str(sp), sizing=dict(tokens_per_step=tps, num_iterations=n_iter,
                                                                total_tokens=n_iter * tps if n_iter and tps else None))
    cfg_path = next((p / "config.json" for p in (sp.parent, sp.parent.parent) if (p / "config.json").is_file()), None)
    family = None
    if cfg_path:
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            cfg = {}
            problems.append(f"{cfg_path} is not valid JSON; the model's shape is unknown")
        family, dims, counts, drop = model_shape(cfg)
        if family:
            info.update(family=family, dims=dims, counts=counts, dropout=drop, model_type=cfg.get("model_type"))
            info["sizing"].update(num_params=counts["total"], scaling_params=counts["scaling"])
        else:
            skipped.append(f"the parameter count (config.json model_type {cfg.get('model_type')!r} is not one the doctor counts)")
        for k in ("_name_or_path", "name_or_path"):
            if isinstance(cfg.get(k), str):
                info["claims"] += size_claims(Path(cfg[k]).name.replace("_", " "), f"{k} = {cfg[k]!r} in config.json")
    else:
        skipped.append("config.json (beside trainer_state.json): model shape and size")
    info["claims"] += size_claims(sp.parent.name.replace("_", " ") if not sp.parent.name.startswith("checkpoint-")
                                  else sp.parent.parent.name.replace("_", " "), "the output folder's name")
    window = int(state.get("logging_steps") or 1)
    knows = Knows(params="total", printed_params=None, lr_schedule=None, planned_steps=bool(n_iter),
                  tokens_per_step=tps is not None, eval_offset=1,
                  loss_smoothing=Smoothing("window", window=window) if window > 1 else None)
    if window > 1:
        skipped.append(f"the step losses (Trainer logs the mean of every {window} steps' losses): the spike check "
                       "sees spikes diluted by that window")
    run = Run(sp.parent, "Hugging Face Trainer state (trainer_state.json)", [metrics[k] for k in sorted(metrics)], info,
              knows, problems, skipped, source="hf-trainer")
    if window <= 1:  # one step per log line: the logged loss is the step's own
        for r in run.metrics:
            if "loss" in r:
                r["raw_loss"] = r["loss"]
    return run


def _looks_like(path: Path, head: str) -> bool:
    return _state_path(path) is not None


FORMAT = Format("hf-trainer", f"a Hugging Face Trainer folder ({STATE}, config.json) or its {STATE}", _looks_like,
                parse_hf_trainer)
