"""Supervised fine-tuning on conversations: the loop behind `scripts/chat_sft.py`.

Starts from a base (or earlier SFT) checkpoint, inherits its architecture and learning rates, and
trains on a task mix packed by nanochat/chat_data.py with the training machinery of base training
(train_loop: train_step, LoopState, StopSignal, checkpoint save / exact resume, exit codes).

Reference schedule (REFERENCE section 11): every LR = the base run's LR x 0.8, no warmup, constant
then a linear warmdown over the last half to 0, no weight decay, Muon momentum 0.85 -> 0.95 over
the first 300 steps; one epoch of the mix. The horizon is one epoch unless `num_iterations` is set:
the schedule's progress is the packer's (all ranks take the furthest rank's), so it is a function of
the checkpointed loader state and a resumed run repeats the uninterrupted one step for step.

Metrics (metrics.jsonl, one record per step): step, loss (EMA), raw_loss, lr (multiplier),
progress (epochs), dt, tok_per_sec, target_tokens; val_loss (masked: nats per trained token) and
chatcore on evaluation steps.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat.chat_data import ChatPackingLoader
from nanochat.common import RuntimeContext
from nanochat.config import ConfigError, RunConfig
from nanochat.optim import build_optimizer
from nanochat.tasks import TaskDataError, build_mix
from nanochat.training import (EXIT_NONFINITE, EXIT_OK, EXIT_OOM, LoopState, NonFiniteLoss, StopSignal,
                               TestHooks, apply_schedule, restore_training_checkpoint, run_in_run_folder,
                               save_training_checkpoint, train_step)

LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")
DEFAULT_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}


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


def lr_multiplier(progress: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """1 until 1 - warmdown_ratio of the horizon, then linear to final_lr_frac at the end."""
    if warmdown_ratio <= 0 or progress < 1 - warmdown_ratio:
        return 1.0
    left = max(0.0, (1 - progress) / warmdown_ratio)
    return left + (1 - left) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def base_learning_rates(meta: dict) -> dict:
    """The LRs the source run trained with (its sizing record), the defaults where absent."""
    sizing = meta.get("sizing") or {}
    return {k: float(sizing.get(k, DEFAULT_LRS[k])) for k in LR_KEYS}


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
    return run_in_run_folder(cfg, ctx, "sft", "chat_sft", _run, errors=(TaskDataError,))


def _run(cfg: SFTConfig, ctx: RuntimeContext) -> int:
    say = (lambda *a: None) if cfg.quiet else ctx.print0
    cfg.validate()
    for name in ("device_batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_iterations <= 0 and cfg.num_epochs <= 0:
        raise ConfigError("set --num-epochs > 0 or --num-iterations > 0")
    if cfg.source not in ("base", "sft"):
        raise ConfigError(f"--source must be base or sft, got {cfg.source!r}")

    # --- the starting model -------------------------------------------------------------------
    src_tag = cfg.source_tag or ckpt.find_last_tag(rd.phase_dir(cfg.source))
    model, tokenizer, src_meta = ckpt.load_model(cfg.source, ctx.device, src_tag, cfg.source_step,
                                                 compute_dtype=ctx.dtype)
    model.train()
    model_config = model.config.to_dict()
    T = cfg.max_seq_len if cfg.max_seq_len > 0 else model.config.sequence_len
    if T > model.config.sequence_len:
        raise ConfigError(f"--max-seq-len {T} exceeds the model's context ({model.config.sequence_len})")
    out_dir = rd.run_dir("sft", cfg.model_tag or src_tag)  # taken by run_sft (lock, --resume auto, refusals)

    # --- data ---------------------------------------------------------------------------------------
    train_task = build_mix(cfg.mix, "train", cfg.task_data, seed=cfg.seed)
    val_task = build_mix(cfg.mix, "val", cfg.task_data, seed=cfg.seed)
    if cfg.train_size > 0:
        train_task = train_task[:cfg.train_size]
    if cfg.val_size > 0:
        val_task = val_task[:cfg.val_size]
    loader = ChatPackingLoader(tokenizer, train_task, cfg.device_batch_size, T, ctx.device, ctx.rank,
                               ctx.world_size, overflow=cfg.overflow, loop=True)

    def val_loader():
        return ChatPackingLoader(tokenizer, val_task, cfg.device_batch_size, T, ctx.device, ctx.rank, ctx.world_size,
                                 overflow=cfg.overflow, loop=False)

    # --- optimizer: the source's LRs x init_lr_frac, no weight decay ----------------------------
    lrs = {k: v * cfg.init_lr_frac for k, v in base_learning_rates(src_meta).items()}
    extra = {"orth_dtype": ctx.orth_dtype}
    optimizer = build_optimizer(model, weight_decay=cfg.weight_decay, **lrs, **extra)
    for group in optimizer.param_groups:
        group["initial_weight_decay"] = group.get("weight_decay", 0.0)

    state = LoopState()
    evals: dict = {}  # val_loss_start, val_loss: travel in the checkpoint meta
    resume_step = None
    if cfg.resume_from_step is not None:
        if not ckpt.list_steps(out_dir):
            raise ConfigError(f"--resume {cfg.resume_from_step}: no checkpoint in {out_dir} yet")
        resume_step, state, resumed_meta = restore_training_checkpoint(out_dir, cfg.resume_from_step, ctx, model,
                                                                       optimizer, loader, model_config)
        evals = dict(resumed_meta.get("sft_evals") or {})
        say(f"resumed from step {resume_step} ({out_dir})")
    run_info = {"config": cfg.to_dict(), "model_config": model_config,
                "source": {"phase": cfg.source, "tag": src_tag, "step": src_meta.get("step")},
                "sizing": {**lrs, "base_lrs": base_learning_rates(src_meta), "device_batch_size": cfg.device_batch_size,
                           "max_seq_len": T, "grad_accum_steps": cfg.grad_accum, "world_size": ctx.world_size,
                           "conversations": len(train_task), "val_conversations": len(val_task),
                           "tokens_per_step": cfg.device_batch_size * T * cfg.grad_accum * ctx.world_size},
                "resumed_from": resume_step}
    if ctx.is_master:
        rd.write_run_json(out_dir, run_info)
    metrics = rd.MetricsWriter(out_dir, resume_step if resume_step is not None else 0, ctx.is_master)
    say(f"SFT from {cfg.source}/{src_tag} step {src_meta.get('step')}: mix {cfg.mix} ({len(train_task):,} "
        f"conversations), rows {cfg.device_batch_size} x {T}, accumulation {cfg.grad_accum}, "
        f"{ctx.world_size} rank(s), LRs {', '.join(f'{k} {v:.3g}' for k, v in lrs.items())}")

    fixed = cfg.num_iterations > 0

    def progress() -> float:  # fraction of the horizon done, identical on every rank
        if fixed:
            return state.step / cfg.num_iterations
        return _max_across_ranks(ctx, loader.progress()) / cfg.num_epochs

    def due(every: int, last: bool) -> bool:
        return every != 0 and (last or (every > 0 and state.step % every == 0))

    def save(reason: str) -> None:
        meta = {"model_config": model_config, "config": cfg.to_dict(), "phase": "sft",
                "source": run_info["source"], "val_loss": evals.get("val_loss"), "sft_evals": evals,
                "finished": reason == "final"}
        pruned = save_training_checkpoint(out_dir, state.step, model, optimizer, loader, state, ctx, meta,
                                          keep_last=cfg.keep_last)
        say(f"saved checkpoint step {state.step} ({reason}) to {out_dir}" + (f"; removed {pruned}" if pruned else ""))

    def batches():
        while True:
            yield next(loader)

    hooks = TestHooks.from_env()  # NANOCHAT_TEST_NAN_STEP / NANOCHAT_TEST_HANG_STEP, as in base training
    p = progress()
    with StopSignal() as stop, contextlib.closing(loader):
        if state.step == 0 and cfg.eval_every != 0:
            evals["val_loss_start"] = masked_val_loss(model, val_loader(), cfg.eval_steps, ctx)
            say(f"step 0 | val loss {evals['val_loss_start']:.4f} (masked, before SFT)")
        while p < 1.0:
            t0 = time.time()
            lrm = lr_multiplier(p, cfg.warmdown_ratio, cfg.final_lr_frac)
            apply_schedule(optimizer, lrm, 1.0, muon_momentum(state.step, cfg.momentum_warmup_steps))
            targets_before = loader.counts["target_tokens"]
            try:
                result = train_step(model, optimizer, batches(), cfg.grad_accum, ctx, stop, step=state.step,
                                    hooks=hooks)
            except torch.OutOfMemoryError:
                print(f"[rank {ctx.rank}] CUDA out of memory at step {state.step} with --device-batch-size="
                      f"{cfg.device_batch_size} (x {T} tokens): lower --device-batch-size and raise --grad-accum",
                      file=sys.stderr, flush=True)
                return EXIT_OOM
            except NonFiniteLoss as e:
                last = ckpt.list_steps(out_dir)
                say(f"stopping: {e} at step {state.step}; no update was applied. Last good checkpoint: "
                    f"{f'step {last[-1]} in {out_dir}' if last else 'none'}. Try a lower --init-lr-frac")
                return EXIT_NONFINITE
            ctx.synchronize()
            dt = time.time() - t0
            state.step += 1
            state.train_time += dt
            state.update_loss(result.loss)
            p = progress()
            last = p >= 1.0
            record = {"step": state.step, "loss": state.smooth_loss, "raw_loss": result.loss, "lr": lrm,
                      "progress": p * (cfg.num_epochs if not fixed else 1.0), "dt": dt,
                      "tok_per_sec": cfg.device_batch_size * T * cfg.grad_accum * ctx.world_size / dt,
                      "target_tokens": loader.counts["target_tokens"] - targets_before}
            stopping = result.stop_requested or stop.received is not None
            if not stopping and due(cfg.eval_every, last):
                record["val_loss"] = evals["val_loss"] = masked_val_loss(model, val_loader(), cfg.eval_steps, ctx)
            if not stopping and due(cfg.chatcore_every, last):
                from nanochat.chat_eval import run_chat_eval

                names = [t.strip() for t in cfg.chatcore_tasks.split(",") if t.strip()] or None
                out = run_chat_eval(model, tokenizer, ctx, tasks=names, task_data=cfg.task_data,
                                    max_problems=cfg.chatcore_max_problems, quiet=True)
                record["chatcore"] = evals["chatcore"] = out["chatcore"]
                record["chat_accuracy"] = {k: v["accuracy"] for k, v in out["tasks"].items()}
                model.train()
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
