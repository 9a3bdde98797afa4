"""Supervised fine-tuning on conversations: the loop behind `scripts/chat_sft.py`.

Starts from a base (or earlier SFT) checkpoint, inherits its architecture and learning rates, and
trains on a task mix packed by nanochat/chat_data.py with the training machinery every phase shares
(nanochat/training.py: the phase_run frame and run record, train_step, LoopState, StopSignal, checkpoint
save / exact resume, exit codes). Sizing: sizing.FinetunePlan; schedules: sizing.sft_lr_multiplier and
sizing.sft_muon_momentum.

Reference schedule (REFERENCE section 11): every LR = the base run's LR x 0.8, no warmup, constant
then a linear warmdown over the last half to 0, no weight decay, Muon momentum 0.85 -> 0.95 over
the first 300 steps; one epoch of the mix. The horizon is one epoch unless `num_iterations` is set:
the schedule's progress is the packer's (all ranks take the furthest rank's), so it is a function of
the checkpointed loader state and a resumed run repeats the uninterrupted one step for step.

Metrics (metrics.jsonl, one record per step): step, loss (EMA), raw_loss, lr (multiplier),
progress (epochs), dt, tok_per_sec, tokens (cumulative token slots), target_tokens; val_loss (masked: nats per trained token) and
chatcore on evaluation steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat import sizing
from nanochat.autobatch import oom_message
from nanochat.chat_data import ChatPackingLoader
from nanochat.common import RuntimeContext
from nanochat.config import ConfigError, RunConfig
from nanochat.optim import build_optimizer
from nanochat.sizing import FinetunePlan
from nanochat.tasks import TaskDataError, build_mix
from nanochat.training import (EXIT_NONFINITE, EXIT_OK, LoopState, NonFiniteLoss, PhaseRun, StopSignal, TestHooks,
                               apply_schedule, due, exit_oom, restore_training_checkpoint, run_chat_phase,
                               save_training_checkpoint, train_step)


@dataclass
class SFTConfig(RunConfig):
    """Fine-tuning (scripts/chat_sft.py). `model_tag` names the output folder chatsft_checkpoints/<tag>
    (default: the source's tag); `compile` and `run` (wandb) are not used by this phase."""

    source: str = "base"  # phase of the starting checkpoint: base | sft
    source_tag: str | None = None  # the source's model tag (default: its most recent)
    source_step: int | None = None  # default: its last
    mix: str = "smoltalk,mmlu-aux*3,gsm8k*4"
    task_data: str | None = None
    train_size: int = -1  # > 0: only the first N conversations of the (shuffled) training mix
    val_size: int = -1  # > 0: only the first N validation conversations
    device_batch_size: int = 8
    max_seq_len: int = -1  # -1: the model's sequence_len
    grad_accum: int = 1
    num_epochs: float = 1.0
    num_iterations: int = -1  # > 0: a fixed number of steps instead of epochs
    init_lr_frac: float = 0.8
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    weight_decay: float = 0.0
    momentum_warmup_steps: int = 300
    overflow: str = "crop"
    eval_every: int = 100  # > 0 periodic + last step; -1 last only; 0 never
    eval_steps: int = 20  # validation batches per rank
    chatcore_every: int = 0
    chatcore_max_problems: int = 100
    chatcore_tasks: str = ""  # comma-separated eval tasks ("": the five ChatCORE tasks; e.g. EmbeddedChat offline)
    quiet: bool = False


@torch.no_grad()
def masked_val_loss(model, loader, steps: int, ctx: RuntimeContext | None = None) -> float:
    """Mean loss over the trained (assistant) tokens of up to `steps` batches, summed across ranks."""
    model.eval()
    try:
        device = model.get_device()
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for _, (x, y) in zip(range(steps), loader):
            loss = model(x, y, loss_reduction="sum")
            total += torch.stack([loss.double(), (y != -1).sum().double()])
        if ctx is not None:
            total = ctx.all_reduce_sum(total)
        return float(total[0] / total[1].clamp(min=1))
    finally:
        model.train()


def _max_across_ranks(ctx: RuntimeContext, value: float) -> float:
    if not ctx.ddp:
        return value
    t = torch.tensor([value], device=ctx.device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_sft(cfg: SFTConfig, ctx: RuntimeContext | None = None) -> int:
    """Train; returns an exit code (EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_OOM)."""
    return run_chat_phase(cfg, ctx, "sft", "chat_sft", _run, errors=(TaskDataError,))


def _check(cfg: SFTConfig) -> None:
    cfg.validate()
    for name in ("device_batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_iterations <= 0 and cfg.num_epochs <= 0:
        raise ConfigError("set --num-epochs > 0 or --num-iterations > 0")
    if cfg.source not in ("base", "sft"):
        raise ConfigError(f"--source must be base or sft, got {cfg.source!r}")


def _chatcore(cfg: SFTConfig, model, tokenizer, ctx: RuntimeContext) -> dict:
    from nanochat.chat_eval import run_chat_eval

    names = [t.strip() for t in cfg.chatcore_tasks.split(",") if t.strip()] or None
    out = run_chat_eval(model, tokenizer, ctx, tasks=names, task_data=cfg.task_data,
                        max_problems=cfg.chatcore_max_problems, quiet=True)
    model.train()
    return {"chatcore": out["chatcore"], "chat_accuracy": {k: v["accuracy"] for k, v in out["tasks"].items()}}


def _data(cfg: SFTConfig, tokenizer, T: int, ctx: RuntimeContext):
    """(training task, validation task, packer(task, loop) -> this rank's ChatPackingLoader over it)."""
    train_task, val_task = (build_mix(cfg.mix, split, cfg.task_data, seed=cfg.seed) for split in ("train", "val"))
    train_task = train_task[:cfg.train_size] if cfg.train_size > 0 else train_task
    val_task = val_task[:cfg.val_size] if cfg.val_size > 0 else val_task

    def packer(task, loop: bool) -> ChatPackingLoader:
        return ChatPackingLoader(tokenizer, task, cfg.device_batch_size, T, ctx.device, ctx.rank, ctx.world_size,
                                 overflow=cfg.overflow, loop=loop)

    return train_task, val_task, packer


def _run(cfg: SFTConfig, run: PhaseRun) -> int:
    ctx, out_dir = run.ctx, run.out_dir
    say = (lambda *a: None) if cfg.quiet else ctx.print0
    _check(cfg)
    model, tokenizer, src_meta = ckpt.load_model(cfg.source, ctx.device, run.source_tag, cfg.source_step,
                                                 compute_dtype=ctx.dtype)
    run.source["step"] = src_meta.get("step")
    model.train()
    model_config = model.config.to_dict()
    T = cfg.max_seq_len if cfg.max_seq_len > 0 else model.config.sequence_len
    if T > model.config.sequence_len:
        raise ConfigError(f"--max-seq-len {T} exceeds the model's context ({model.config.sequence_len})")
    train_task, val_task, packer = _data(cfg, tokenizer, T, ctx)
    loader = packer(train_task, True)
    src_run = rd.read_run_json(rd.run_dir(cfg.source, run.source_tag))  # older source checkpoints lack sizing
    plan = FinetunePlan(sizing.pretraining_lrs(src_meta, src_run), cfg.init_lr_frac, cfg.weight_decay,
                        ctx.world_size, cfg.device_batch_size, T, cfg.grad_accum,
                        cfg.num_iterations if cfg.num_iterations > 0 else None, cfg.num_epochs, len(train_task),
                        len(val_task))
    optimizer = build_optimizer(model, weight_decay=plan.weight_decay, **plan.lrs, orth_dtype=ctx.orth_dtype)
    state, evals, resume_step = LoopState(), {}, None  # evals: val_loss_start, val_loss, chatcore (in the metas)
    if run.resume is not None:
        resume_step, state, resumed_meta = restore_training_checkpoint(out_dir, run.resume, ctx, model, optimizer,
                                                                       loader, model_config)
        evals = dict(resumed_meta.get("sft_evals") or {})
    run.write_record(cfg.to_dict(), model_config, plan.to_dict(), resume_step)
    metrics = run.metrics(resume_step)
    say(f"SFT from {cfg.source}/{run.source_tag} step {run.source['step']}: mix {cfg.mix} ({len(train_task):,} "
        f"conversations), rows {cfg.device_batch_size} x {T}, accumulation {cfg.grad_accum}, {ctx.world_size} "
        f"rank(s), LRs {', '.join(f'{k} {v:.3g}' for k, v in plan.lrs.items())}")

    def progress() -> float:  # fraction of the horizon done, identical on every rank
        if plan.num_iterations:
            return state.step / plan.num_iterations
        return _max_across_ranks(ctx, loader.progress()) / cfg.num_epochs

    def save(reason: str) -> None:
        meta = run.checkpoint_meta(val_loss=evals.get("val_loss"), sft_evals=evals, finished=reason == "final")
        pruned = save_training_checkpoint(out_dir, state.step, model, optimizer, loader, state, ctx, meta,
                                          keep_last=cfg.keep_last)
        say(f"saved checkpoint step {state.step} ({reason}) to {out_dir}" + (f"; removed {pruned}" if pruned else ""))

    hooks, p = TestHooks.from_env(), progress()  # NANOCHAT_TEST_NAN_STEP / _HANG_STEP, as in base training
    with StopSignal() as stop, contextlib.closing(loader):
        if state.step == 0 and cfg.eval_every != 0:
            evals["val_loss_start"] = masked_val_loss(model, packer(val_task, False), cfg.eval_steps, ctx)
            say(f"step 0 | val loss {evals['val_loss_start']:.4f} (masked, before SFT)")
        while p < 1.0:
            t0, targets_before = time.time(), loader.counts["target_tokens"]
            lrm = sizing.sft_lr_multiplier(p, cfg.warmdown_ratio, cfg.final_lr_frac)
            apply_schedule(optimizer, lrm, 1.0, sizing.sft_muon_momentum(state.step, cfg.momentum_warmup_steps))
            try:
                result = train_step(model, optimizer, loader, cfg.grad_accum, ctx, stop, step=state.step, hooks=hooks)
            except torch.OutOfMemoryError:
                return exit_oom(ctx, oom_message(cfg.device_batch_size, T, where=f"step {state.step}",
                                                 remedy="lower --device-batch-size and raise --grad-accum as much"))
            except NonFiniteLoss as e:
                last = ckpt.list_steps(out_dir)
                say(f"stopping: {e}; no update was applied. Last good checkpoint: "
                    f"{f'step {last[-1]} in {out_dir}' if last else 'none'}. Try a lower --init-lr-frac")
                return EXIT_NONFINITE
            dt = time.time() - t0
            state.step += 1
            state.train_time += dt
            state.update_loss(result.loss)
            p = progress()
            last = p >= 1.0
            record = {"step": state.step, "loss": state.smooth_loss, "raw_loss": result.loss, "lr": lrm,
                      "progress": p * (1.0 if plan.num_iterations else cfg.num_epochs), "dt": dt,
                      "tok_per_sec": plan.tokens_per_step / dt, "tokens": state.step * plan.tokens_per_step,
                      "target_tokens": loader.counts["target_tokens"] - targets_before}
            stopping = result.stop_requested or stop.received is not None
            if not stopping and due(cfg.eval_every, state.step, last):
                record["val_loss"] = evals["val_loss"] = masked_val_loss(model, packer(val_task, False),
                                                                         cfg.eval_steps, ctx)
            if not stopping and due(cfg.chatcore_every, state.step, last):
                record.update(_chatcore(cfg, model, tokenizer, ctx))
                evals["chatcore"] = record["chatcore"]
            metrics.write(record)
            say(f"step {state.step:05d} | loss {state.smooth_loss:.4f} (raw {result.loss:.4f}) | lrm {lrm:.3f} | "
                f"epoch {record['progress']:.3f} | dt {dt * 1000:.0f}ms"
                + (f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else "")
                + (f" | ChatCORE {record['chatcore']:.4f}" if record.get("chatcore") is not None else ""))
            if stopping:
                save(f"signal {stop.received or 'on another rank'}")
                say(f"stopped by signal at step {state.step}; resume with --resume latest")
                return EXIT_OK
            if last or (cfg.save_every > 0 and state.step % cfg.save_every == 0):
                save("final" if last else "periodic")
    st = loader.stats()
    say(f"done: {state.step} steps, val loss {evals.get('val_loss_start', float('nan')):.4f} -> "
        f"{evals.get('val_loss', float('nan')):.4f}; conversations rendered: used {st['used']:,}, cropped "
        f"{st['cropped']:,}, skipped {st['skipped']:,}, padding {100 * st['pad_fraction']:.1f}%")
    return EXIT_OK
