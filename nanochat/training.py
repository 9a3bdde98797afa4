"""What every training phase shares: the loop state, one optimizer step, schedules, stop signals, and
saving / restoring a training checkpoint with everything exact resume needs.

Pretraining (nanochat/train_loop.py) and the chat phases (SFT, RL) are loops over `train_step`; a
checkpoint holds the weights, each rank's optimizer, data-loader and RNG state and the `LoopState`, so a
resumed run reproduces the uninterrupted one: bit for bit on CPU, within float rounding on CUDA (atomic-add
kernels such as Inductor's embedding backward are not deterministic; docs/multinode.md).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat import cpu_threads
from nanochat import run_dir as rd
from nanochat.common import RuntimeContext, init_runtime
from nanochat.config import ConfigError
from nanochat.optim import LayoutChanged
from nanochat.run_dir import RunLock, RunLockedError, clean_run_dir

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_OOM, EXIT_EVAL = 0, 2, 3, 4, 5
LOSS_EMA_BETA = 0.9  # the logged loss: an EMA of the raw loss, debiased by 1 - beta^n


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# state that a checkpoint carries


def rng_state(device_type: str) -> dict:
    py = random.getstate()
    npy = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device_type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().cpu().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))

    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


@dataclass
class LoopState:
    """The loop's own state, saved in every checkpoint as one object and restored on resume."""

    step: int = 0  # optimizer steps done
    smooth_ema: float = 0.0  # EMA of the raw loss (not yet debiased)
    smooth_n: int = 0  # losses in the EMA
    train_time: float = 0.0  # seconds of timed steps (the first step of every (re)start is not timed)
    val_bpb: float | None = None  # the latest validation bpb
    best_val_bpb: float | None = None
    core: float | None = None  # the latest CORE metric

    def update_loss(self, raw_loss: float) -> float:
        self.smooth_ema = LOSS_EMA_BETA * self.smooth_ema + (1 - LOSS_EMA_BETA) * raw_loss
        self.smooth_n += 1
        return self.smooth_loss

    @property
    def smooth_loss(self) -> float:
        return self.smooth_ema / (1 - LOSS_EMA_BETA ** self.smooth_n) if self.smooth_n else float("nan")

    def record_val(self, bpb: float) -> None:
        self.val_bpb = bpb
        self.best_val_bpb = bpb if self.best_val_bpb is None else min(self.best_val_bpb, bpb)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        if "smooth_loss" in d:  # checkpoints written before LoopState: {"smooth_loss": {ema, n}, "train_time"}
            d = {"smooth_ema": d["smooth_loss"]["ema"], "smooth_n": d["smooth_loss"]["n"],
                 "train_time": d.get("train_time", 0.0), "step": d.get("step", 0), "val_bpb": d.get("val_bpb")}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class StopSignal:
    """SIGTERM/SIGINT (preemption, Ctrl-C) set a flag; the loop skips that step's evaluations (a single
    process also abandons a validation pass under way), saves at the end of the step and exits."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TestHooks:
    """Fault injection for tests, from the environment (see the module docstring); off by default."""

    nan_step: int | None = None
    hang_step: int | None = None

    @classmethod
    def from_env(cls) -> "TestHooks":
        def read(name: str) -> int | None:
            value = os.environ.get(name)
            return int(value) if value not in (None, "", "-1") else None

        return cls(read("NANOCHAT_TEST_NAN_STEP"), read("NANOCHAT_TEST_HANG_STEP"))


@dataclass
class StepResult:
    loss: float  # mean training loss of the step over micro-batches and ranks
    stop_requested: bool  # a stop signal reached some rank (all ranks agree)


def apply_schedule(optimizer, lr_mult: float, wd_mult: float = 1.0, muon_momentum: float | None = None) -> None:
    """Set every group's LR and weight decay from its initial values, and Muon's momentum."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_mult
        group["weight_decay"] = group.setdefault("initial_weight_decay", group.get("weight_decay", 0.0)) * wd_mult
        if muon_momentum is not None and group["kind"] == "muon":
            group["momentum"] = muon_momentum


class _StepFlags:
    """The step's (mean loss, stop flag), summed over ranks and brought to the host without waiting for the
    gradient work queued after them: issued before the last micro-batch's backward, so the all-reduce is
    not queued behind the gradient reductions that backward starts, and (on CUDA) copied to pinned host
    memory on a side stream that waits only for that all-reduce, never for backward. Made without any
    host-to-device copy (the stop flag is a device fill, not a torch.tensor of a Python number)."""

    def __init__(self, loss_sum: torch.Tensor, grad_accum: int, stopped: bool, ctx: RuntimeContext):
        flags = torch.stack([loss_sum / grad_accum, loss_sum.new_full((), float(stopped))])  # (2,)
        self._work = dist.all_reduce(flags, async_op=True) if ctx.ddp else None
        self._event = None
        if flags.device.type == "cuda":
            side = torch.cuda.Stream(device=flags.device)
            side.wait_stream(torch.cuda.current_stream(flags.device))  # flags are computed
            with torch.cuda.stream(side):
                if self._work is not None:
                    self._work.wait()  # the side stream (not the host, not the compute stream) waits for it
                self._host = torch.empty(2, dtype=flags.dtype, pin_memory=True)
                self._host.copy_(flags, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(side)
            flags.record_stream(side)
        self._flags = flags

    def result(self) -> tuple[float, bool]:
        """(loss summed over ranks, stop flag): the step's one host read."""
        if self._event is not None:
            self._event.synchronize()
            values = self._host
        else:
            if self._work is not None:
                self._work.wait()
            values = self._flags
        loss_total, stop_flag = values.tolist()
        return loss_total, stop_flag > 0


def train_step(model, optimizer, batches, grad_accum: int, ctx: RuntimeContext, stop: StopSignal | None = None,
               step: int | None = None, hooks: TestHooks | None = None, overlap_reductions: bool = True) -> StepResult:
    """One optimizer step: `grad_accum` micro-batches (x, y) from `batches` (targets -1 are ignored),
    backward on each, one all-reduce of (loss, stop flag) across ranks, then the update.

    The host reads one value per step and never waits for backward or for gradient traffic: the flags are
    reduced right after the last micro-batch's forward, before its backward (`_StepFlags`), and under DDP
    that backward starts the optimizer's gradient reductions as the gradients become final
    (`overlap_backward`, unless `overlap_reductions` is off; `launch_reductions` starts whatever is left).
    So once the flags arrive the host queues the update behind backward while the device still runs it;
    there is no synchronize at the end. A non-finite loss raises NonFiniteLoss before the update, on every
    rank alike (the reductions already started are discarded)."""
    hooks = hooks or TestHooks()
    cpu_threads.tick()
    loss_sum = torch.zeros((), device=ctx.device)
    overlap = getattr(optimizer, "overlap_backward", None) if ctx.ddp and overlap_reductions else None
    flags = None
    for micro in range(grad_accum):
        x, y = next(batches)
        loss = model(x, y)
        if step is not None and step == hooks.nan_step:
            loss = loss * float("nan")
        loss_sum += loss.detach()
        if micro == grad_accum - 1:
            if step is not None and step == hooks.hang_step:  # test hook: stuck mid-step until a signal (or SIGKILL)
                print(f"hanging at step {step}", flush=True)
                while stop is not None and stop.received is None:
                    time.sleep(0.05)
            flags = _StepFlags(loss_sum, grad_accum, stop is not None and stop.received is not None, ctx)
            if overlap is not None:
                overlap()  # this backward starts the gradient reductions as the gradients become final
        (loss / grad_accum).backward()
    launch = getattr(optimizer, "launch_reductions", None)
    if launch is not None and ctx.ddp:  # any reduction the backward hooks did not start
        launch()
    loss_total, stop_flag = flags.result()
    loss_mean = loss_total / ctx.world_size
    if not math.isfinite(loss_mean):
        discard = getattr(optimizer, "discard_reductions", None)
        if discard is not None:
            discard()
        raise NonFiniteLoss(f"loss is {loss_mean} at step {step}")
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return StepResult(loss_mean, stop_flag)


def save_training_checkpoint(out_dir: Path, step: int, model, optimizer, loader, state: LoopState,
                             ctx: RuntimeContext, meta: dict, keep_last: int = -1, tokenizer=None) -> list[int]:
    """Checkpoint `step` (every rank calls it): weights (rank 0), each rank's optimizer, data-loader and RNG
    state, the loop state and `meta` (model_config, config, ...). Returns the steps pruned by keep_last.
    `tokenizer`: its identity goes into the meta and a copy of it into the run folder (checkpoint_manager)."""
    full = dict(meta, val_bpb=state.val_bpb, world_size=ctx.world_size, loop_state=state.to_dict(),
                dataloader_state=ctx.all_gather_object(loader.state_dict()),
                rng_state=ctx.all_gather_object(rng_state(ctx.device_type)))
    ckpt.save_checkpoint(out_dir, step, model.state_dict() if ctx.is_master else None, optimizer.state_dict(),
                         full, rank=ctx.rank, barrier=ctx.barrier, gather=ctx.all_gather_object,
                         tokenizer=tokenizer if ctx.is_master else None)
    return ckpt.prune_checkpoints(out_dir, keep_last) if ctx.is_master else []


def restore_training_checkpoint(out_dir: Path, which, ctx: RuntimeContext, model, optimizer, loader,
                                model_config: dict, tokenizer=None) -> tuple[int, LoopState, dict]:
    """Load checkpoint `which` (a step or "latest") into the model, optimizer, loader and RNGs.

    "latest" is the newest checkpoint whose files all open: a truncated newer one is reported by name and
    skipped. Another world size is fine (elastic): the optimizer state is re-sharded on load and the
    data-loader's logical streams are merged and re-dealt (nanochat/dataloader.py; a world size that does
    not divide their number is refused). Refuses another model config (ConfigError) and,
    given `tokenizer`, another tokenizer than the checkpoint's (TokenizerMismatch)."""
    step = ckpt.newest_readable_step(out_dir, log=ctx.print0) if which == "latest" else int(which)
    meta = ckpt.load_meta(out_dir, step)
    if tokenizer is not None:
        ckpt.check_tokenizer(meta, tokenizer, f"checkpoint {out_dir} step {step}")
    diff = ckpt.config_mismatch(meta["model_config"], model_config)
    if diff:
        raise ConfigError(f"checkpoint step {step} in {out_dir} is a different model: {'; '.join(diff)}. "
                          f"Use the same model flags, or another --model-tag for a new run")
    model_state, optim_state, _ = ckpt.load_checkpoint(out_dir, step, device=ctx.device, load_optimizer=True,
                                                       rank=ctx.rank, world_size=ctx.world_size)
    ckpt.load_state_into(model, model_state)
    try:
        optimizer.load_state_dict(optim_state)
    except LayoutChanged:  # same world size, other buckets (an older version): through the unsharded state
        optimizer.load_state_dict(ckpt.load_optimizer_state(out_dir, step, ctx.rank, ctx.world_size, merge=True))
    # logical streams: every rank's states merged, this rank takes its own (re-dealt); the global stream's
    # state is the same on every rank; a synthetic loader converts its count
    loader_states = meta["dataloader_state"]
    merge = getattr(loader, "merge_states", None)
    loader.load_state_dict(merge(loader_states) if merge else loader_states[ctx.rank % len(loader_states)])
    if getattr(loader, "notice", None):
        ctx.print0(loader.notice)
    rng_states = meta["rng_state"]  # nothing in the loop draws from them; a rank the saved run lacked takes rank 0's
    set_rng_state(rng_states[ctx.rank] if ctx.rank < len(rng_states) else rng_states[0])
    state = LoopState.from_dict(dict(meta["loop_state"], step=step, val_bpb=meta.get("val_bpb")))
    saved_world = meta.get("world_size")
    ctx.print0(f"resumed from {out_dir} step {step} (val bpb {meta.get('val_bpb')})"
               + (f" on {ctx.world_size} rank(s); it was written by {saved_world}" if saved_world != ctx.world_size else ""))
    return step, state, meta


def update_checkpoint_meta(out_dir: Path, step: int, state: LoopState) -> None:
    """After the evaluations of a step that was saved first: put their results into its meta file."""
    meta = ckpt.load_meta(out_dir, step)
    meta.update(val_bpb=state.val_bpb, loop_state=state.to_dict())
    ckpt.atomic_json_save(meta, ckpt.meta_path(out_dir, step))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_memory_mb(ctx: RuntimeContext) -> float:
    if ctx.device_type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB of peak RSS


def open_run_folder(out_dir: Path, resume, ctx: RuntimeContext, what: str) -> tuple[RunLock | None, int | str | None]:
    """Take a run folder for this run, the same way in every phase. Rank 0 locks it (one writer per folder)
    and removes what killed runs left there (temp files, uncommitted steps); `--resume auto` becomes
    "latest" when the folder has a checkpoint and None (fresh) when not; a fresh run over existing
    checkpoints is refused, since it would mix its checkpoints and metrics with theirs (and --keep-last
    would prune the new, lower steps first). Returns (the lock to release at the end, the checkpoint to
    resume: a step, "latest" or None). ConfigError naming the holder when another process has the folder."""
    lock, error = None, ""
    if ctx.is_master:
        try:
            lock = RunLock(out_dir, what=what).acquire()
            for p in clean_run_dir(out_dir):
                ctx.print0(f"removed {p.name} (left by an interrupted write)")
        except RunLockedError as e:
            error = str(e)
    if ctx.all_reduce_sum([1.0 if error else 0.0])[0] > 0:
        raise ConfigError(error or f"{out_dir} is in use by another process (see rank 0)")
    try:
        existing = ckpt.list_steps(out_dir)
        if resume == "auto":  # preemptible jobs: the same command for the first launch and requeues
            resume = "latest" if existing else None
            ctx.print0(f"--resume auto: resuming from step {existing[-1]}" if existing
                       else f"--resume auto: no checkpoint in {out_dir}, starting fresh")
        if resume is not None and not existing:
            raise ConfigError(f"--resume {resume}: no complete checkpoint in {out_dir} yet: drop --resume (or use "
                              f"--resume auto) to start a fresh run")
        if resume is None and existing:
            raise ConfigError(f"{out_dir} already holds checkpoints of an earlier run (steps {existing[-3:]}): pass "
                              f"--resume latest to continue it, choose another --model-tag, or delete the folder")
    except BaseException:
        if lock is not None:  # refused while holding the lock: a folder this call created goes again
            rd.remove_if_unused(out_dir)
            lock.release()
        raise
    if ctx.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)
    return lock, resume


@dataclass
class PhaseRun:
    """The frame of one training run, resolved once for every phase: the run folder (locked by
    `phase_run`), the checkpoint to resume (a step, "latest" or None), and for a fine-tuning phase the
    checkpoint it starts from (`source`: {"phase", "tag", "step"}, the step set once it is loaded).
    `write_record` writes run.json (run_dir.write_run_record) and keeps what every checkpoint meta repeats."""

    phase: str
    out_dir: Path
    resume: int | str | None
    ctx: RuntimeContext
    source: dict | None = None
    _record: dict = dataclasses.field(default_factory=dict)

    @property
    def source_tag(self) -> str | None:
        return self.source["tag"] if self.source else None

    def write_record(self, args: dict, model_config: dict, sizing: dict, resumed_from: int | None,
                     **env) -> None:
        self._record = {"phase": self.phase, "args": args, "model_config": model_config, "sizing": sizing,
                        "source": self.source}
        if self.ctx.is_master:
            rd.write_run_record(self.out_dir, **self._record, env=run_env(self.ctx, resumed_from, **env))

    def checkpoint_meta(self, **extra) -> dict:
        """What a checkpoint meta of this run holds: the run record's phase, args, model_config, sizing and
        source, and `extra` (the phase's own results)."""
        return {**self._record, **extra}

    def metrics(self, resume_step: int | None) -> rd.MetricsWriter:
        return rd.MetricsWriter(self.out_dir, resume_step if resume_step is not None else 0, self.ctx.is_master)


def run_env(ctx: RuntimeContext, resumed_from: int | None, **extra) -> dict:
    """run.json's "env": where and how the run ran."""
    return {"device_name": ctx.device_name, "peak_flops": ctx.peak_flops, "dtype": str(ctx.dtype).replace("torch.", ""),
            "threads": ctx.threads if ctx.device_type == "cpu" else None, "world_size": ctx.world_size,
            "torch": torch.__version__, "git_commit": git_commit(), "argv": sys.argv, "resumed_from": resumed_from,
            **extra}


@contextlib.contextmanager
def phase_run(phase: str, tag: str | None, resume, ctx: RuntimeContext, what: str, source_phase: str | None = None,
              source_tag: str | None = None):
    """Take the run folder <base>/<phase>_checkpoints/<tag> for one run (`open_run_folder`: lock, leftovers,
    --resume auto, refusals) and yield its `PhaseRun`. A fine-tuning phase names the phase it starts from:
    its tag defaults to that phase's most recent, and the run's own tag to the source's. A run that fails
    before writing anything of its own leaves no folder behind (`remove_if_unused`); the lock is released
    however it ends."""
    source = None
    if source_phase is not None:
        source = {"phase": source_phase, "tag": source_tag or ckpt.find_last_tag(rd.phase_dir(source_phase)),
                  "step": None}
    out_dir = rd.run_dir(phase, tag or (source["tag"] if source else None))
    lock, resume = open_run_folder(out_dir, resume, ctx, what)
    try:
        yield PhaseRun(phase, out_dir, resume, ctx, source)
    except BaseException:
        if ctx.is_master:
            rd.remove_if_unused(out_dir)
        raise
    finally:
        if lock is not None:
            lock.release()


def due(every: int, step: int, last: bool) -> bool:
    """Whether an every-N-steps action (evaluation, samples) is due at `step`: every > 0: every `every` steps
    and at the last; -1: at the last step only; 0: never."""
    return every != 0 and (last or (every > 0 and step % every == 0))


def exit_oom(ctx: RuntimeContext, message: str) -> int:
    """Report a CUDA OOM (autobatch.oom_message) on stderr, naming the rank; EXIT_OOM."""
    print(f"[rank {ctx.rank}] {message}", file=sys.stderr, flush=True)
    return EXIT_OOM


def run_chat_phase(cfg, ctx: RuntimeContext | None, phase: str, what: str,
                   body: Callable[[object, PhaseRun], int], errors: tuple = ()) -> int:
    """The frame of a fine-tuning phase (SFT, RL): the runtime unless `ctx` is given, the run folder taken by
    `phase_run` (tag: --model-tag, else the source's), then `body(cfg, run)`. Bad input (config,
    checkpoint, missing file, `errors`) is one line on stderr and EXIT_CONFIG; an own runtime is torn down
    either way."""
    own_ctx = ctx is None
    if own_ctx:
        ctx = init_runtime(cfg.device_type, cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    try:
        with phase_run(phase, cfg.model_tag, cfg.resume_from_step, ctx, what, cfg.source, cfg.source_tag) as run:
            return body(cfg, run)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError, *errors) as e:
        print(f"{what}: {e}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    finally:
        if own_ctx:
            ctx.teardown()
