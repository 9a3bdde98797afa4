"""Checkpoints: atomic save, load, resume bookkeeping, keep-last-N, and `load_model` for the later phases.

A run folder (`<base dir>/base_checkpoints/<model tag>/` for pretraining) holds, per saved step S:

    model_<S:06d>.pt            model state dict (rank 0; `_orig_mod.` prefixes of torch.compile stripped)
    optim_<S:06d>_rank<r>.pt    optimizer state of rank r (the optimizer state is sharded across ranks)
    meta_<S:06d>.json           step, model config, flags, val bpb, loop / data-loader / RNG state

Every file is written to a temporary name, fsync'ed and renamed over its final name (`os.replace` is
atomic on POSIX), and the meta JSON is written last, after all ranks have written theirs: a
checkpoint exists if and only if its meta file exists, so a kill at any point of a save leaves the
previous checkpoint whole and the half-written one invisible.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from nanochat.common import resolve_dtype
from nanochat.gpt import GPT, GPTConfig
from nanochat.run_dir import phase_dir
from nanochat.tokenizer import get_tokenizer

_META_RE = re.compile(r"^meta_(\d+)\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model / run asking for it."""


def model_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir: Path, step: int) -> Path:
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir: Path, step: int, rank: int) -> Path:
    return Path(checkpoint_dir) / f"optim_{step:06d}_rank{rank}.pt"


def strip_compile_prefix(state_dict: dict) -> dict:
    """Remove torch.compile's `_orig_mod.` from parameter names (so checkpoints load into a plain GPT)."""
    return {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# atomic writes


def _atomic_write(path: Path, write_fn) -> None:
    """Write via `write_fn(file)` to `<path>.tmp<pid>`, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj, path: Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_json_save(obj, path: Path) -> None:
    data = json.dumps(obj, indent=1).encode()
    _atomic_write(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# save / find / load


def save_checkpoint(checkpoint_dir, step: int, model_state: dict | None, optim_state: dict | None, meta: dict,
                    rank: int = 0, barrier=None) -> None:
    """Save one checkpoint. Call on every rank (each passes its own `optim_state`).

    `model_state` and `meta` are written by rank 0 only (others may pass None). `barrier` is called
    between the data files and the meta file so that the meta (the commit mark) is written only once
    every rank's optimizer file is in place; pass `ctx.barrier` when distributed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if model_state is None:
            raise ValueError("rank 0 must pass the model state")
        atomic_torch_save(strip_compile_prefix(model_state), model_path(checkpoint_dir, step))
    if optim_state is not None:
        atomic_torch_save(optim_state, optim_path(checkpoint_dir, step, rank))
    if barrier is not None:
        barrier()
    if rank == 0:
        atomic_json_save(dict(meta, step=step), meta_path(checkpoint_dir, step))
    if barrier is not None:
        barrier()


def list_steps(checkpoint_dir) -> list[int]:
    """Steps with a complete checkpoint (its meta and model files both present), ascending."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = []
    for p in checkpoint_dir.iterdir():
        m = _META_RE.match(p.name)
        if m and model_path(checkpoint_dir, int(m.group(1))).exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def find_last_step(checkpoint_dir) -> int:
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint (meta_*.json + model_*.pt) in {checkpoint_dir}")
    return steps[-1]


def find_last_tag(phase_dir) -> str:
    """The model tag (sub-folder) whose checkpoints were written most recently."""
    phase_dir = Path(phase_dir)
    tags = [d for d in phase_dir.iterdir() if d.is_dir() and list_steps(d)] if phase_dir.is_dir() else []
    if not tags:
        raise CheckpointError(f"no checkpoints found under {phase_dir}: train a model first "
                              f"(e.g. `python -m scripts.base_train`)")
    def newest(d: Path) -> float:
        return meta_path(d, list_steps(d)[-1]).stat().st_mtime
    return max(tags, key=newest).name


def load_meta(checkpoint_dir, step: int) -> dict:
    path = meta_path(checkpoint_dir, step)
    if not path.exists():
        raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir} (missing {path.name}); "
                              f"complete steps there: {list_steps(checkpoint_dir)}")
    with open(path) as f:
        return json.load(f)


def load_checkpoint(checkpoint_dir, step: int, device="cpu", load_optimizer: bool = False,
                    rank: int = 0) -> tuple[dict, dict | None, dict]:
    """(model_state, optim_state or None, meta) of one step; tensors mapped to `device`."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = load_meta(checkpoint_dir, step)
    model_state = torch.load(model_path(checkpoint_dir, step), map_location=device, weights_only=True)
    optim_state = None
    if load_optimizer:
        path = optim_path(checkpoint_dir, step, rank)
        if not path.exists():
            raise CheckpointError(f"{path} is missing: this checkpoint was written by "
                                  f"{meta.get('world_size', '?')} rank(s); resume with the same number of ranks")
        optim_state = torch.load(path, map_location=device, weights_only=True)
    return model_state, optim_state, meta


def delete_checkpoint(checkpoint_dir, step: int) -> None:
    """Remove one step, meta first (so it stops counting as a checkpoint before its data goes)."""
    checkpoint_dir = Path(checkpoint_dir)
    meta_path(checkpoint_dir, step).unlink(missing_ok=True)
    model_path(checkpoint_dir, step).unlink(missing_ok=True)
    for p in checkpoint_dir.glob(f"optim_{step:06d}_rank*.pt"):
        p.unlink(missing_ok=True)


def prune_checkpoints(checkpoint_dir, keep_last: int) -> list[int]:
    """Keep the newest `keep_last` checkpoints (<= 0 keeps all); returns the deleted steps."""
    if keep_last <= 0:
        return []
    old = list_steps(checkpoint_dir)[:-keep_last]
    for step in old:
        delete_checkpoint(checkpoint_dir, step)
    return old


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two model-config dicts (empty when they agree)."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


# ---------------------------------------------------------------------------------------------
# load a trained model for evaluation, chat, fine-tuning


def build_model(model_config: dict, device, compute_dtype: torch.dtype | None = None):
    """An uninitialised GPT of `model_config` on `device` (weights to be loaded)."""
    device = torch.device(device)
    config = GPTConfig(**model_config)
    dtype = compute_dtype if compute_dtype is not None else resolve_dtype(device.type)
    with torch.device("meta"):
        model = GPT(config, compute_dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()  # rebuilds the rotary buffers; the weights are overwritten next
    return model


def load_state_into(model, state_dict: dict, where: str = "checkpoint") -> None:
    state_dict = strip_compile_prefix(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"the {where} does not fit this model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    model.load_state_dict(state_dict, strict=True)


def load_model(phase: str, device, model_tag: str | None = None, step: int | None = None,
               base_dir=None, compute_dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer, meta) of a saved checkpoint.

    Defaults: the most recently written model tag of the phase, and its last step.
    """
    folder = phase_dir(phase, base_dir)
    if model_tag is None:
        model_tag = find_last_tag(folder)
    checkpoint_dir = folder / model_tag
    if step is None:
        step = find_last_step(checkpoint_dir)
    model_state, _, meta = load_checkpoint(checkpoint_dir, step, device=device)
    model = build_model(meta["model_config"], device, compute_dtype)
    load_state_into(model, model_state, where=f"checkpoint {checkpoint_dir}/model_{step:06d}.pt")
    model.eval()
    tokenizer = get_tokenizer(base_dir)
    vocab = meta["model_config"]["vocab_size"]
    if tokenizer.get_vocab_size() != vocab:
        raise CheckpointError(f"tokenizer vocab size {tokenizer.get_vocab_size():,} does not match the model's "
                              f"{vocab:,} (checkpoint {checkpoint_dir}, step {step}): use the tokenizer the model "
                              f"was trained with (same NANOCHAT_BASE_DIR)")
    return model, tokenizer, meta
