"""The pretraining loop behind `scripts/base_train.py`: sizing, the step, evaluation, checkpoints, resume.

One process per device (plain `python` or torchrun, one or many nodes). No DDP wrapper: every rank
runs backward on its own `grad_accum_steps` micro-batches and `MuonAdamW.step()` averages the
gradients across ranks (see nanochat/optim.py), so one optimizer step always sees `total_batch_size`
tokens however they are split between ranks and accumulation.

Loop, for step s = start .. N-1 (s counts completed optimizer steps; checkpoint S = S steps done):
    micro-batches -> loss, backward; schedules set lr / momentum / weight decay from s alone;
    one all-reduce of (loss, stop flag) across ranks; non-finite loss -> stop before the update;
    optimizer step; s += 1; metrics record `step = s`; evals due at s; checkpoint due at s.
Everything a step depends on is a function of s, the weights, the optimizer state and the data
loader position, all of which a checkpoint holds: resuming reproduces the uninterrupted run bit for
bit (tested on CPU, including after SIGKILL).

Test hooks (environment): `NANOCHAT_TEST_NAN_STEP=k` multiplies the loss of step k by NaN (to test the
non-finite-loss stop without a diverging run); `NANOCHAT_TEST_HANG_STEP=k` stops in the middle of
step k (after backward, before the update), prints "hanging at step k" and waits for a signal, so a
test can SIGKILL or SIGTERM a run at a known point.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nanochat import checkpoint_manager as ckpt
from nanochat import sizing
from nanochat.common import RuntimeContext, get_base_dir, init_runtime

EXIT_OK, EXIT_CONFIG, EXIT_NONFINITE, EXIT_OOM = 0, 2, 3, 4
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


class ConfigError(ValueError):
    """Inconsistent flags: reported as a one-line error before any work starts."""


class NonFiniteLoss(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# sizing


@dataclass
class Plan:
    config: object  # GPTConfig
    params: dict
    flops_per_token: float
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    horizon_source: str
    lrs: dict
    weight_decay: float

    @property
    def total_tokens(self) -> int:
        return self.total_batch_size * self.num_iterations


def plan_run(args, vocab_size: int, world_size: int) -> Plan:
    """Everything the flags imply: model config, batch, accumulation, horizon, LRs, weight decay."""
    for name in ("depth", "device_batch_size", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.keep_remainder < 0:
        raise ConfigError(f"--keep-remainder must be >= 0 (0: discard cropped tails), got {args.keep_remainder}")
    try:
        config = sizing.model_config(args.depth, aspect_ratio=args.aspect_ratio, head_dim=args.head_dim,
                                     max_seq_len=args.max_seq_len, vocab_size=vocab_size, n_kv_head=args.n_kv_head,
                                     window_pattern=args.window_pattern, value_embeds=args.value_embeds,
                                     resid_scalars=args.resid_scalars)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    params = sizing.count_params(config)
    fpt = sizing.flops_per_token(config)
    ratio = args.target_param_data_ratio if args.target_param_data_ratio > 0 else sizing.COMPUTE_OPTIMAL_RATIO
    ref_tokens = sizing.reference_tokens(config, ratio)
    if args.total_batch_size > 0:
        total_batch_size = args.total_batch_size
    else:
        horizon_tokens = args.target_flops / fpt if args.target_flops > 0 else ratio * params["scaling"]
        total_batch_size = sizing.auto_total_batch_size(horizon_tokens, ref_tokens)
    try:
        accum = sizing.grad_accum_steps(total_batch_size, args.device_batch_size, args.max_seq_len, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    steps, source = sizing.resolve_horizon(total_batch_size, params["scaling"], fpt, args.num_iterations,
                                           args.target_flops, ratio)
    lrs = sizing.learning_rates(total_batch_size, config.n_embd, matrix_lr=args.matrix_lr,
                                embedding_lr=args.embedding_lr, unembedding_lr=args.unembedding_lr,
                                scalar_lr=args.scalar_lr)
    wd = args.weight_decay if args.weight_decay >= 0 else sizing.weight_decay(
        total_batch_size, steps * total_batch_size, ref_tokens, matrix_lr=args.matrix_lr)
    return Plan(config, params, fpt, total_batch_size, accum, steps, source, lrs, wd)


def sizing_dict(plan: Plan, args, world_size: int) -> dict:
    p = plan.params
    return {"num_params": p["total"], "scaling_params": p["scaling"], "embedding_params": p["embedding"],
            "scalar_params": p["scalar"], "flops_per_token": plan.flops_per_token,
            "tokens_per_step": plan.total_batch_size, "num_iterations": plan.num_iterations,
            "horizon_source": plan.horizon_source, "total_tokens": plan.total_tokens,
            "total_flops": plan.flops_per_token * plan.total_tokens,
            "tokens_per_scaling_param": plan.total_tokens / p["scaling"],
            "target_param_data_ratio": args.target_param_data_ratio, **plan.lrs,
            "weight_decay": plan.weight_decay, "warmup_steps": args.warmup_steps, "warmdown_ratio": args.warmdown_ratio,
            "final_lr_frac": args.final_lr_frac, "world_size": world_size, "device_batch_size": args.device_batch_size,
            "max_seq_len": args.max_seq_len, "grad_accum_steps": plan.grad_accum_steps}


def sizing_table(s: dict, ctx: RuntimeContext, model) -> str:
    rows = [
        ("parameters (total)", f"{s['num_params']:,}"),
        ("  scaling (block matrices + head)", f"{s['scaling_params']:,}"),
        ("  embeddings (token + value)", f"{s['embedding_params']:,}"),
        ("  scalars", f"{s['scalar_params']:,}"),
        ("FLOPs per token", f"{s['flops_per_token']:.4g}"),
        ("tokens per step", (f"{s['tokens_per_step']:,} = {s['device_batch_size']} x {s['max_seq_len']} x "
                             f"{s['world_size']} ranks x {s['grad_accum_steps']} accumulation")),
        ("steps", f"{s['num_iterations']:,} (from {s['horizon_source']})"),
        ("total tokens", f"{s['total_tokens']:,}"),
        ("tokens : scaling params", f"{s['tokens_per_scaling_param']:.2f}"),
        ("total FLOPs", f"{s['total_flops']:.4g}"),
        ("learning rates", (f"matrix {s['matrix_lr']:.4g}, embedding {s['embedding_lr']:.4g}, "
                            f"unembedding {s['unembedding_lr']:.4g}, scalar {s['scalar_lr']:.4g}")),
        ("schedule", f"warmup {s['warmup_steps']}, warmdown {s['warmdown_ratio']:g}, final {s['final_lr_frac']:g}"),
        ("weight decay (Muon)", f"{s['weight_decay']:.4g}"),
        ("world size", f"{ctx.world_size} ({ctx.device_name})"),
        ("dtype", str(ctx.dtype).replace("torch.", "")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["=" * 80, "sizing"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["model:", str(model), "=" * 80]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# data


class SyntheticLoader:
    """Uniform random tokens, for benchmarks and for testing the distributed arithmetic.

    Micro-batch c of rank r (of W) is drawn from a generator seeded by its *global* index
    `step * A * W + micro * W + r` (A = accumulation steps): every optimizer step sees the same set of
    batches whatever the split between ranks and accumulation, so a 2-rank run and a 1-rank run with
    twice the accumulation must give the same losses up to float rounding.
    """

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, grad_accum: int, device, rank: int = 0,
                 world_size: int = 1, seed: int = 0):
        self.vocab_size, self.B, self.T, self.A = vocab_size, batch_size, seq_len, grad_accum
        self.device, self.rank, self.W, self.seed = device, rank, world_size, seed
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        step, micro = divmod(self.count, self.A)
        index = step * self.A * self.W + micro * self.W + self.rank
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        row = torch.randint(0, self.vocab_size, (self.B, self.T + 1), generator=gen)
        self.count += 1
        row = row.to(self.device)
        return row[:, :-1], row[:, 1:]

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]

    def close(self) -> None:
        pass


def make_loader(args, tokenizer, split: str, ctx: RuntimeContext, grad_accum: int, vocab_size: int):
    if args.synthetic_data:
        return SyntheticLoader(vocab_size, args.device_batch_size, args.max_seq_len, grad_accum, ctx.device,
                               ctx.rank, ctx.world_size, seed=args.seed + (0 if split == "train" else 7919))
    from nanochat.dataloader import DataLoader

    # the validation rows stay the reference's (tails discarded) whatever the training flag, so val bpb
    # remains comparable across runs
    return DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, split=split, device=ctx.device,
                      rank=ctx.rank, world_size=ctx.world_size, data_dir=args.data_dir,
                      keep_remainder=args.keep_remainder if split == "train" else 0)


# ---------------------------------------------------------------------------------------------
# RNG state <-> JSON


def rng_state(device_type: str) -> dict:
    import numpy as np

    py = random.getstate()
    npy = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [npy[0], npy[1].tolist(), int(npy[2]), int(npy[3]), float(npy[4])],
             "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if device_type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().cpu().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))

    def tensor(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


def gather_to_all(ctx: RuntimeContext, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one when not distributed)."""
    if not ctx.ddp:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# run-folder files


class MetricsWriter:
    """Appends one JSON record per optimizer step to metrics.jsonl (rank 0); on resume from step S
    drops the records of steps > S first, so the file always holds one record per step.

    Fields: step (optimizer steps done), loss (EMA 0.9, bias-corrected), raw_loss, lr (multiplier), dt (s),
    tok_per_sec, mfu (fraction of peak, 0-1; null when the peak is unknown), tokens, flops (cumulative),
    peak_mem_mb; plus val_bpb, val_loss (nats/token over all targets, as loss) and core on evaluation steps."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        keep = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5, check=False)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


def peak_memory_mb(ctx: RuntimeContext) -> float:
    if ctx.device_type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB of peak RSS


# ---------------------------------------------------------------------------------------------
# the run


def checkpoint_dir_for(args) -> Path:
    return get_base_dir() / ckpt.PHASE_DIRS["base"] / (args.model_tag or f"d{args.depth}")


def restore(out_dir: Path, which, ctx: RuntimeContext, plan: Plan, model, optimizer, train_loader):
    """Load checkpoint `which` (a step or "latest") into the model, optimizer, data loader and RNGs.

    Refuses a checkpoint written by another world size or another model config. Returns
    (step, loop state with smooth_loss, train_time and val_bpb)."""
    resume_step = ckpt.find_last_step(out_dir) if which == "latest" else int(which)
    meta = ckpt.load_meta(out_dir, resume_step)
    if meta.get("world_size") != ctx.world_size:
        raise ConfigError(f"checkpoint step {resume_step} in {out_dir} was written by {meta.get('world_size')} "
                          f"rank(s) but this run has {ctx.world_size}: its optimizer and data-loader states are "
                          f"per rank, so resume with the same number of ranks")
    diff = ckpt.config_mismatch(meta["model_config"], plan.config.to_dict())
    if diff:
        raise ConfigError(f"checkpoint step {resume_step} in {out_dir} is a different model: {'; '.join(diff)}. "
                          f"Use the same model flags, or another --model-tag for a new run")
    model_state, optim_state, _ = ckpt.load_checkpoint(out_dir, resume_step, device=ctx.device,
                                                       load_optimizer=True, rank=ctx.rank)
    ckpt.load_state_into(model, model_state)
    optimizer.load_state_dict(optim_state)
    train_loader.load_state_dict(meta["dataloader_state"][ctx.rank])
    set_rng_state(meta["rng_state"][ctx.rank])
    ctx.print0(f"resumed from {out_dir} step {resume_step} (val bpb {meta.get('val_bpb')})")
    return resume_step, dict(meta["loop_state"], val_bpb=meta.get("val_bpb"))


def train(args) -> int:
    """Run pretraining as the flags say; returns the process exit code."""
    ctx = init_runtime(args.device_type, args.dtype, seed=args.seed)
    try:
        return _train(args, ctx)
    finally:
        ctx.teardown()


def _train(args, ctx: RuntimeContext) -> int:
    from nanochat.gpt import GPT
    from nanochat.optim import build_optimizer

    tokenizer = None
    if args.synthetic_data:
        vocab_size = args.vocab_size
    else:
        from nanochat.tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
        vocab_size = tokenizer.get_vocab_size()
    if ctx.needs_grad_scaler:
        raise ConfigError("--dtype float16 needs a gradient scaler, which this loop does not have: use bfloat16 "
                          "(SM80+ GPUs) or float32")
    plan = plan_run(args, vocab_size, ctx.world_size)
    sizes = sizing_dict(plan, args, ctx.world_size)
    N, A = plan.num_iterations, plan.grad_accum_steps
    out_dir = checkpoint_dir_for(args)
    existing = ckpt.list_steps(out_dir)
    if args.resume_from_step == "auto":  # preemptible jobs: the same command for the first launch and requeues
        args.resume_from_step = "latest" if existing else None
        ctx.print0(f"--resume auto: resuming from step {existing[-1]}" if existing
                   else f"--resume auto: no checkpoint in {out_dir}, starting fresh")
    if args.resume_from_step is None and existing:
        # a fresh run here would mix its checkpoints and metrics with the old ones (and --keep-last would
        # prune the new, lower steps first)
        raise ConfigError(f"{out_dir} already holds checkpoints of an earlier run (steps {existing[-3:]}): pass "
                          f"--resume latest to continue it, choose another --model-tag, or delete the folder")
    if ctx.is_master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # --- model and optimizer --------------------------------------------------------------------
    with torch.device("meta"):
        model = GPT(plan.config, compute_dtype=ctx.dtype)
    model.to_empty(device=ctx.device)
    model.init_weights()
    # bf16 matmuls on CPUs without bf16 units run ~10x slower than fp32 (measured: Muon step 24 s vs 2 s at
    # depth 4), so the orthogonalisation runs in fp32 there; GPUs keep the recipe's bf16
    extra = {"orth_dtype": torch.float32} if ctx.device_type == "cpu" else {}
    optimizer = build_optimizer(model, weight_decay=plan.weight_decay, **plan.lrs, **extra)
    for group in optimizer.param_groups:
        group["initial_weight_decay"] = group.get("weight_decay", 0.0)
    train_loader = make_loader(args, tokenizer, "train", ctx, A, vocab_size)

    # --- resume -----------------------------------------------------------------------------------
    step, smooth = 0, {"ema": 0.0, "n": 0}
    val_bpb, resume_step = None, None
    train_time = 0.0
    if args.resume_from_step is not None:
        resume_step, loop = restore(out_dir, args.resume_from_step, ctx, plan, model, optimizer, train_loader)
        step, smooth, train_time, val_bpb = resume_step, loop["smooth_loss"], loop["train_time"], loop["val_bpb"]

    # --- report what is about to be trained -----------------------------------------------------------
    table = sizing_table(sizes, ctx, model)
    ctx.print0(table)
    decay_per_step = plan.lrs["matrix_lr"] * plan.weight_decay
    if decay_per_step > 0.05:  # the horizon rule D_ref / D explodes for very short runs
        ctx.print0(f"WARNING: Muon weight decay x matrix LR = {decay_per_step:.3g} per step shrinks the weights "
                   f"by that fraction each step (the run is very short for this model): set --weight-decay")
    if ctx.is_master:
        run_info = {"args": vars(args), "model_config": plan.config.to_dict(), "sizing": sizes,
                    "env": {"device_name": ctx.device_name, "peak_flops": ctx.peak_flops,
                            "dtype": str(ctx.dtype).replace("torch.", ""), "torch": torch.__version__,
                            "git_commit": git_commit(), "argv": sys.argv, "resumed_from": resume_step}}
        ckpt.atomic_json_save(run_info, out_dir / "run.json")
    metrics = MetricsWriter(out_dir / "metrics.jsonl", resume_step if resume_step is not None else 0, ctx.is_master)
    wandb_run = None
    if args.run != "dummy" and ctx.is_master:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("--run names a wandb run but wandb is not installed: `pip install wandb`, "
                              "or pass --run dummy") from e
        wandb_run = wandb.init(project="nanochat", name=args.run, config={"args": vars(args), "sizing": sizes},
                               resume="allow")

    model.fused_loss = {"auto": None, "on": True, "off": False}[args.fused_loss]
    compile_model = args.compile if args.compile is not None else ctx.device_type == "cuda"
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    token_bytes = None
    evals_on = not args.synthetic_data
    if args.synthetic_data and ctx.is_master:
        print("synthetic data: validation bpb, CORE and samples are off")
    core_available = evals_on and args.core_metric_every != 0 and core_preflight(args, ctx)
    nan_step = int(os.environ.get("NANOCHAT_TEST_NAN_STEP", "-1"))
    hang_step = int(os.environ.get("NANOCHAT_TEST_HANG_STEP", "-1"))

    def due(every: int, s: int) -> bool:  # every > 0: periodic and last step; -1: last step only; 0: never
        return every != 0 and (s == N or (every > 0 and s % every == 0))

    def save(s: int, reason: str) -> None:
        loader_states = gather_to_all(ctx, train_loader.state_dict())
        rng_states = gather_to_all(ctx, rng_state(ctx.device_type))
        meta = {"model_config": plan.config.to_dict(), "args": vars(args), "val_bpb": val_bpb,
                "world_size": ctx.world_size, "num_iterations": N, "sizing": sizes,
                "loop_state": {"smooth_loss": smooth, "train_time": train_time},
                "dataloader_state": loader_states, "rng_state": rng_states}
        ckpt.save_checkpoint(out_dir, s, model.state_dict() if ctx.is_master else None, optimizer.state_dict(),
                             meta, rank=ctx.rank, barrier=ctx.barrier)
        pruned = ckpt.prune_checkpoints(out_dir, args.keep_last) if ctx.is_master else []
        ctx.print0(f"saved checkpoint step {s} ({reason}) to {out_dir}" + (f"; removed steps {pruned}" if pruned else ""))

    # --- the loop ---------------------------------------------------------------------------------------
    beta = 0.9  # loss EMA; debiased by 1 - beta^n
    first_timed = step + 1  # the first step of a (re)start pays compilation and warm-up: not timed
    ctx.print0(f"training steps {step} -> {N}")
    with StopSignal() as stop, contextlib.closing(train_loader):
        while step < N:
            t0 = time.time()
            try:
                loss_sum = torch.zeros((), device=ctx.device)
                for _ in range(A):
                    x, y = next(train_loader)
                    loss = train_model(x, y)
                    if step == nan_step:
                        loss = loss * float("nan")
                    loss_sum += loss.detach()
                    (loss / A).backward()
                if step == hang_step:  # test hook: stuck mid-step until a signal (or SIGKILL) arrives
                    print(f"hanging at step {step}", flush=True)
                    while stop.received is None:
                        time.sleep(0.05)
                lrm = sizing.lr_multiplier(step, N, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
                wdm = sizing.weight_decay_multiplier(step, N)
                for group in optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * lrm
                    group["weight_decay"] = group["initial_weight_decay"] * wdm
                    if group["kind"] == "muon":
                        group["momentum"] = sizing.muon_momentum(step)
                flags = torch.stack([loss_sum / A, torch.tensor(float(stop.received is not None), device=ctx.device)])
                if ctx.ddp:
                    dist.all_reduce(flags)
                loss_total, stop_flag = flags.tolist()  # one device->host sync per step, not two
                raw_loss, stop_now = loss_total / ctx.world_size, stop_flag > 0
                if not math.isfinite(raw_loss):
                    raise NonFiniteLoss(f"loss is {raw_loss} at step {step}")
                optimizer.step()
                model.zero_grad(set_to_none=True)
                ctx.synchronize()
            except torch.OutOfMemoryError:
                print(f"[rank {ctx.rank}] CUDA out of memory at step {step} with --device-batch-size="
                      f"{args.device_batch_size} (x {args.max_seq_len} tokens): lower --device-batch-size "
                      f"(gradient accumulation keeps --total-batch-size)", file=sys.stderr, flush=True)
                return EXIT_OOM
            except NonFiniteLoss as e:
                last = ckpt.list_steps(out_dir)
                ctx.print0(f"stopping: {e}; no update was applied. Last good checkpoint: "
                           f"{f'step {last[-1]} in {out_dir}' if last else 'none'} (kept). Try a lower learning rate, "
                           f"or resume from it with --resume-from-step")
                return EXIT_NONFINITE
            dt = time.time() - t0
            step += 1
            if step > first_timed:
                train_time += dt
            smooth["ema"] = beta * smooth["ema"] + (1 - beta) * raw_loss
            smooth["n"] += 1
            smooth_loss = smooth["ema"] / (1 - beta ** smooth["n"])
            tok_per_sec = plan.total_batch_size / dt
            mfu = (plan.flops_per_token * tok_per_sec / (ctx.peak_flops * ctx.world_size)  # fraction of peak
                   if ctx.peak_flops else None)
            timed = step - first_timed
            eta = (N - step) * (train_time / timed if timed > 0 else dt)
            record = {"step": step, "loss": smooth_loss, "raw_loss": raw_loss, "lr": lrm, "dt": dt,
                      "tok_per_sec": tok_per_sec, "mfu": mfu, "tokens": step * plan.total_batch_size,
                      "flops": step * plan.total_batch_size * plan.flops_per_token,
                      "peak_mem_mb": peak_memory_mb(ctx)}
            ctx.print0(f"step {step:05d}/{N} | loss {smooth_loss:.4f} (raw {raw_loss:.4f}) | lrm {lrm:.3f} | "
                       f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {f'{100 * mfu:.2f}%' if mfu is not None else 'n/a'}"
                       f" | mem {record['peak_mem_mb']:.0f}MB | eta {eta / 60:.1f}m")

            # --- evaluations at step `step` (skipped once a stop is requested: preemption grace periods are
            # short, and the checkpoint matters more; all ranks agree through stop_now) ---
            stopping = stop_now or (not ctx.ddp and stop.received is not None)
            if stopping and evals_on and any(due(every, step) for every in
                                             (args.eval_every, args.core_metric_every, args.sample_every)):
                ctx.print0(f"step {step:05d} | evaluations skipped: stop requested")
            if evals_on and not stopping and due(args.eval_every, step):
                if token_bytes is None:
                    from nanochat.tokenizer import get_token_bytes

                    token_bytes = get_token_bytes(ctx.device)
                # a signal arriving during the evaluation abandons it (single process; with several ranks it
                # would desynchronise the collective, so they finish it and stop after)
                should_stop = None if ctx.ddp else (lambda: stop.received is not None)
                # the uncompiled module: loss_eval detects its per-token loss from forward's signature, which a
                # compiled wrapper hides (it would then materialise the full fp32 logits)
                val = evaluate_val(args, model, tokenizer, ctx, token_bytes, should_stop)
                if val is None:
                    ctx.print0(f"step {step:05d} | validation abandoned: stop requested")
                    stopping = True
                else:
                    val_bpb = val["bpb"]
                    record["val_bpb"], record["val_loss"] = val_bpb, val["loss"]  # val_loss: nats/token, like loss
                    ctx.print0(f"step {step:05d} | val bpb {val_bpb:.6f} | val loss {val['loss']:.4f}")
            if core_available and not stopping and due(args.core_metric_every, step):
                core = run_core(args, model, tokenizer, ctx)
                if core is None:
                    core_available = False
                else:
                    record["core"] = core
                    ctx.print0(f"step {step:05d} | CORE {core:.4f}")
            if evals_on and not stopping and ctx.is_master and due(args.sample_every, step):
                print_samples(model, tokenizer)
            metrics.write(record)
            if wandb_run is not None:
                wandb_run.log(record, step=step)

            # --- checkpoint ---
            if stop_now or (not ctx.ddp and stop.received is not None):
                save(step, f"signal {stop.received or 'on another rank'}")
                ctx.print0(f"stopped by signal at step {step}; resume with --resume-from-step {step}")
                break
            if step == N or (args.save_every > 0 and step % args.save_every == 0):
                save(step, "final" if step == N else "periodic")
    if wandb_run is not None:
        wandb_run.finish()
    ctx.print0(f"done: step {step}/{N}, val bpb {val_bpb}, training time {train_time / 60:.2f} min")
    return EXIT_OK


def evaluate_val(args, model, tokenizer, ctx: RuntimeContext, token_bytes, should_stop=None) -> dict | None:
    """Validation bpb and mean loss in nats/token (see loss_eval.evaluate_loss_and_bpb); None if
    `should_stop` ended it early."""
    from nanochat.loss_eval import evaluate_loss_and_bpb

    tokens_per_batch = args.device_batch_size * args.max_seq_len * ctx.world_size
    steps = max(1, args.eval_tokens // tokens_per_batch)
    loader = make_loader(args, tokenizer, "val", ctx, 1, tokenizer.get_vocab_size())
    model.eval()
    try:
        return evaluate_loss_and_bpb(model, loader, steps, token_bytes, should_stop)
    finally:
        model.train()
        loader.close()


def core_preflight(args, ctx: RuntimeContext) -> bool:
    """Find the CORE bundle and check the flags before training: False (after one warning) when the
    bundle is unavailable; ConfigError when --core-metric-max-per-task is too small for its few-shot tasks."""
    from nanochat.core_eval import EvalBundleError, load_task_specs, resolve_eval_bundle

    try:
        specs = load_task_specs(resolve_eval_bundle())
    except (EvalBundleError, FileNotFoundError) as e:
        ctx.print0(f"WARNING: CORE metric disabled for this run: {e}")
        return False
    most_shots = max((s.num_fewshot for s in specs), default=0)
    if 0 < args.core_metric_max_per_task <= most_shots:
        raise ConfigError(f"--core-metric-max-per-task={args.core_metric_max_per_task} is too small: {most_shots}-shot "
                          f"tasks draw their examples from the other rows, so use > {most_shots} (or -1 for all)")
    return True


def run_core(args, model, tokenizer, ctx: RuntimeContext) -> float | None:
    """CORE on a few examples per task; None (after one warning) when the eval bundle is unavailable."""
    from nanochat.core_eval import EvalBundleError, evaluate_core

    try:
        out = evaluate_core(model, tokenizer, ctx.device, max_per_task=args.core_metric_max_per_task, verbose=False)
    except (EvalBundleError, FileNotFoundError) as e:
        ctx.print0(f"WARNING: CORE metric disabled for this run: {e}")
        return None
    finally:
        model.train()
    return out["core"]


def print_samples(model, tokenizer, max_tokens: int = 16) -> None:
    from nanochat.engine import Engine

    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    model.eval()
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        results, _ = engine.generate_batch(tokens, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        print(f"  sample: {tokenizer.decode(results[0][1:])!r}", flush=True)
    model.train()
