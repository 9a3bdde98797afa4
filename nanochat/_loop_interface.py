"""TEMPORARY stand-in for the training-loop pieces the structure refactor (issue 13) adds to
nanochat/train_loop.py, with the names and signatures it announced. The chat phases import from
train_loop when those names exist and from here until then; this file is deleted once they land."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat.train_loop import (EXIT_CONFIG, EXIT_NONFINITE, EXIT_OK, EXIT_OOM, ConfigError, NonFiniteLoss,  # noqa: F401
                                 StopSignal, gather_to_all, rng_state, set_rng_state)


@dataclass
class LoopState:
    step: int = 0
    smooth_ema: float = 0.0
    smooth_n: int = 0
    train_time: float = 0.0
    val_bpb: float | None = None
    extra: dict = field(default_factory=dict)

    def update_loss(self, raw: float, beta: float = 0.9) -> None:
        self.smooth_ema = beta * self.smooth_ema + (1 - beta) * raw
        self.smooth_n += 1

    @property
    def smooth_loss(self) -> float:
        return self.smooth_ema / (1 - 0.9 ** self.smooth_n) if self.smooth_n else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        return cls(**d)


@dataclass
class StepResult:
    loss: float
    stop_requested: bool


def apply_schedule(optimizer, lr_mult: float, wd_mult: float = 1.0, muon_momentum: float | None = None) -> None:
    for group in optimizer.param_groups:
        group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0))
        group["lr"] = group["initial_lr"] * lr_mult
        group["weight_decay"] = group["initial_weight_decay"] * wd_mult
        if muon_momentum is not None and group["kind"] == "muon":
            group["momentum"] = muon_momentum


def train_step(model, optimizer, batches, grad_accum: int, ctx, stop=None) -> StepResult:
    device = ctx.device
    loss_sum = torch.zeros((), device=device)
    it = iter(batches)
    for _ in range(grad_accum):
        x, y = next(it)
        loss = model(x, y)
        loss_sum += loss.detach()
        (loss / grad_accum).backward()
    flags = torch.stack([loss_sum / grad_accum,
                         torch.tensor(float(stop is not None and stop.received is not None), device=device)])
    if ctx.ddp:
        dist.all_reduce(flags)
    total, stop_flag = flags.tolist()
    raw = total / ctx.world_size
    if not math.isfinite(raw):
        model.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"loss is {raw}")
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return StepResult(raw, stop_flag > 0)


def save_training_checkpoint(out_dir, step: int, model, optimizer, loader, state: LoopState, ctx, meta: dict,
                             keep_last: int = -1) -> list[int]:
    loader_states = gather_to_all(ctx, loader.state_dict() if loader is not None else None)
    rngs = gather_to_all(ctx, rng_state(ctx.device_type))
    meta = dict(meta, loop_state=state.to_dict(), dataloader_state=loader_states, rng_state=rngs,
                world_size=ctx.world_size)
    ckpt.save_checkpoint(out_dir, step, model.state_dict() if ctx.is_master else None, optimizer.state_dict(),
                         meta, rank=ctx.rank, barrier=ctx.barrier)
    return ckpt.prune_checkpoints(out_dir, keep_last) if ctx.is_master else []


def restore_training_checkpoint(out_dir, which, ctx, model, optimizer, loader, model_config: dict):
    out_dir = Path(out_dir)
    step = ckpt.find_last_step(out_dir) if which == "latest" else int(which)
    meta = ckpt.load_meta(out_dir, step)
    if meta.get("world_size") != ctx.world_size:
        raise ConfigError(f"checkpoint {step} in {out_dir} was written by {meta.get('world_size')} rank(s); "
                          f"resume it with the same number")
    diff = ckpt.config_mismatch(meta["model_config"], model_config)
    if diff:
        raise ConfigError(f"checkpoint {step} in {out_dir} has another model config: {'; '.join(diff[:3])}")
    model_state, optim_state, meta = ckpt.load_checkpoint(out_dir, step, device=ctx.device, load_optimizer=True,
                                                          rank=ctx.rank)
    ckpt.load_state_into(model, model_state)
    optimizer.load_state_dict(optim_state)
    if loader is not None:
        loader.load_state_dict(meta["dataloader_state"][ctx.rank])
    set_rng_state(meta["rng_state"][ctx.rank])
    return step, LoopState.from_dict(meta["loop_state"]), meta
