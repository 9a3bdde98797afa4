"""The pretraining loop behind `scripts/base_train.py`, and the pieces every training phase reuses.

One process per device (plain `python` or torchrun, one or many nodes). No DDP wrapper: every rank
runs backward on its own `grad_accum_steps` micro-batches and `MuonAdamW.step()` averages the
gradients across ranks (nanochat/optim.py), so one optimizer step always sees `total_batch_size`
tokens however they are split between ranks and accumulation.

For step s = start .. N-1 (s counts completed optimizer steps; checkpoint S = S steps done):
`train_step` (micro-batches, backward, one all-reduce of loss and stop flag, a non-finite loss stops
before the update, optimizer step); then the metrics record of step s + 1, the checkpoint due at s + 1
and the evaluations due there. Everything a step depends on is a function of s, the weights, the
optimizer state and the data-loader position, all of which a checkpoint holds: a resumed run
reproduces the uninterrupted one -- bit for bit on CPU (tested, including after SIGKILL), within float
rounding on CUDA, where Inductor's embedding backward uses atomic adds (docs/multinode.md). The final checkpoint
is written before the final evaluations, and an evaluation that fails is reported as such (exit code
5) without losing the trained model.

The pieces every training phase shares (LoopState, train_step, checkpoint save/restore, ...) live in
nanochat/training.py.

Test hooks (environment): `NANOCHAT_TEST_NAN_STEP=k` multiplies the loss of step k by NaN;
`NANOCHAT_TEST_HANG_STEP=k` stops in the middle of step k (after backward, before the update),
prints "hanging at step k" and waits for a signal, so a test can SIGKILL or SIGTERM a run there.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace

import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import sizing
from nanochat.attention import windowed_kernel_available
from nanochat.autobatch import find_device_batch_size, oom_message
from nanochat.common import RuntimeContext, init_runtime, matmul_probe_shapes
from nanochat.config import ConfigError, TrainConfig
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import DataLoader, default_streams, divisors
from nanochat.eval_bundle import EvalBundleError, check_bundle
from nanochat.engine import Engine
from nanochat.gpt import GPT
from nanochat.loss_eval import check_eval_data, evaluate_loss_and_bpb
from nanochat.optim import build_optimizer
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import (EXIT_CONFIG, EXIT_EVAL, EXIT_NONFINITE, EXIT_OK, EXIT_OOM, LoopState, NonFiniteLoss,
                               PhaseRun, StopSignal, TestHooks, apply_schedule, due, exit_oom, peak_memory_mb,
                               phase_run, restore_training_checkpoint, save_training_checkpoint, train_step,
                               update_checkpoint_meta)

__all__ = ["ConfigError", "EXIT_CONFIG", "EXIT_EVAL", "EXIT_NONFINITE", "EXIT_OK", "EXIT_OOM", "train"]

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is",
                  "If yesterday was Friday, then tomorrow will be", "The opposite of hot is"]


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
        # the DataLoader's layout: inputs and targets as two halves of one (2, B, T) buffer (a compiled model
        # guards on strides and aliasing; --device-batch-size auto probes with the same, autobatch.probe_batch)
        xy = torch.stack([row[:, :-1], row[:, 1:]]).to(self.device)
        return xy[0], xy[1]

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "count": self.count, "world_size": self.W}

    def load_state_dict(self, state: dict) -> None:
        # count * W micro-batches are consumed globally: the same position on another world size
        global_count = state["count"] * state.get("world_size", self.W)
        if global_count % self.W:
            raise ConfigError(f"the synthetic loader stopped after {global_count} global micro-batches, which "
                              f"{self.W} ranks cannot split: resume with a world size that divides it")
        self.count = global_count // self.W

    def close(self) -> None:
        pass


def make_loader(cfg: TrainConfig, tokenizer, split: str, ctx: RuntimeContext, grad_accum: int, vocab_size: int):
    """The training or validation loader of a config (synthetic tokens with --synthetic-data). The
    validation rows stay the reference's (tails discarded) whatever the training flag, so val bpb
    remains comparable across runs."""
    if cfg.synthetic_data:
        return SyntheticLoader(vocab_size, cfg.device_batch_size, cfg.max_seq_len, grad_accum, ctx.device,
                               ctx.rank, ctx.world_size, seed=cfg.seed + (0 if split == "train" else 7919))
    if split != "train":  # validation: the single global stream, the same rows on any world size
        return DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split=split, device=ctx.device,
                          rank=ctx.rank, world_size=ctx.world_size, data_dir=cfg.data_dir)
    # training: logical streams, each rank packing and tokenising only its own (nanochat/dataloader.py)
    rows = grad_accum * cfg.device_batch_size * ctx.world_size
    return DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, split=split, device=ctx.device,
                      rank=ctx.rank, world_size=ctx.world_size, data_dir=cfg.data_dir,
                      keep_remainder=cfg.keep_remainder, grad_accum=grad_accum,
                      streams=cfg.data_streams or default_streams(rows, ctx.world_size),
                      adopt_saved_streams=cfg.data_streams == 0)

# ---------------------------------------------------------------------------------------------
# evaluations


def evaluate_val(model, tokenizer, ctx: RuntimeContext, token_bytes, cfg: TrainConfig, eval_tokens: int,
                 should_stop=None) -> dict | None:
    """Validation bpb and mean loss in nats/token (loss_eval.evaluate_loss_and_bpb); None if
    `should_stop` ended it early."""
    steps = max(1, eval_tokens // (cfg.device_batch_size * cfg.max_seq_len * ctx.world_size))
    loader = make_loader(cfg, tokenizer, "val", ctx, 1, tokenizer.get_vocab_size())
    model.eval()
    try:
        return evaluate_loss_and_bpb(model, loader, steps, token_bytes, should_stop, ctx=ctx, progress="val bpb")
    finally:
        model.train()
        loader.close()


def core_preflight(cfg: TrainConfig, ctx: RuntimeContext) -> bool:
    """Find the CORE bundle and parse its task files before training: False (after one warning) when the
    bundle is unavailable; a warning naming each task that will be skipped (corrupt file: file and line);
    ConfigError when --core-metric-max-per-task cannot work (too small for the few-shot tasks)."""
    try:
        found = check_bundle(max_per_task=cfg.core_metric_max_per_task)
    except ValueError as e:
        raise ConfigError(str(e).replace("max_per_task=", "--core-metric-max-per-task=")) from e
    except (EvalBundleError, FileNotFoundError) as e:
        ctx.print0(f"WARNING: CORE metric disabled for this run: {e}")
        return False
    for label, why in found["skipped"].items():
        ctx.print0(f"WARNING: CORE task {label} will be skipped: {why}")
    return True


def val_preflight(cfg: TrainConfig, ctx: RuntimeContext, eval_tokens: int) -> None:
    """The validation split opens and holds text (its first row groups, as much as one pass reads), before
    training: DataError naming the file otherwise."""
    check_eval_data("val", cfg.data_dir, tokens=eval_tokens)


def stop_check(ctx: RuntimeContext, stop: StopSignal):
    """A callable answering whether a stop signal has arrived, for an evaluation to check between its
    batches (or tasks). Distributed, the ranks agree (one tiny all-reduce per check, so every rank must
    check equally often): a signal that reached any rank stops all of them at the same batch."""
    if not ctx.ddp:
        return lambda: stop.received is not None
    return lambda: ctx.all_reduce_sum([float(stop.received is not None)])[0] > 0


def run_core(model, tokenizer, ctx: RuntimeContext, max_per_task: int, should_stop=None) -> dict | None:
    """evaluate_core's result: `core` over the tasks scored, `failed` {label: why} for corrupt task files;
    None if `should_stop` ended it (checked before each task)."""
    try:
        return evaluate_core(model, tokenizer, ctx.device, max_per_task=max_per_task, verbose=False, ctx=ctx,
                             should_stop=should_stop)
    finally:
        model.train()


def print_samples(model, tokenizer, max_tokens: int = 16) -> None:
    engine = Engine(model, tokenizer)
    bos = tokenizer.get_bos_token_id()
    model.eval()
    prompts = [tokenizer.encode(prompt, prepend=bos) for prompt in SAMPLE_PROMPTS]
    replies = {i: toks for i, toks, _ in engine.generate_many(prompts, max_tokens=max_tokens, temperature=0.0)}
    for i, tokens in enumerate(prompts):
        print(f"  sample: {tokenizer.decode(tokens[1:] + replies[i])!r}", flush=True)
    model.train()


class Evaluations:
    """The evaluations of a run (val bpb, CORE, samples) at the steps the config asks for.

    An evaluation that raises is reported with its error and switched off for the rest of the run;
    training and checkpoints go on, and the run ends with EXIT_EVAL naming what failed."""

    def __init__(self, cfg: TrainConfig, plan: sizing.RunPlan, ctx: RuntimeContext, tokenizer):
        self.cfg, self.ctx, self.tokenizer, self.last = cfg, ctx, tokenizer, plan.num_iterations
        self.on = not cfg.synthetic_data
        if cfg.synthetic_data:
            ctx.print0("synthetic data: validation bpb, CORE and samples are off")
        self.core_on = self.on and cfg.core_metric_every != 0 and core_preflight(cfg, ctx)
        self.eval_tokens = cfg.eval_tokens_for(ctx.device_type, plan.total_tokens,
                                               cfg.device_batch_size * cfg.max_seq_len * ctx.world_size)
        if self.on and cfg.eval_every != 0:
            val_preflight(cfg, ctx, self.eval_tokens)
        self.token_bytes = None
        self.failed: dict[str, str] = {}

    def any_due(self, step: int) -> bool:
        c = self.cfg
        return self.on and any(due(e, step, step == self.last) for e in (c.eval_every, c.core_metric_every, c.sample_every))

    def _failed(self, name: str, step: int, e: BaseException) -> None:
        self.failed[name] = f"{type(e).__name__}: {e}"
        self.ctx.print0(f"step {step:05d} | {name} evaluation failed: {type(e).__name__}: {e}. Training and "
                        f"checkpoints are not affected; {name} is off for the rest of this run")

    def run(self, model, step: int, state: LoopState, record: dict, stop: StopSignal) -> bool:
        """Run what is due at `step` into `record` and `state`; False if a stop signal abandoned one."""
        cfg, ctx = self.cfg, self.ctx
        should_stop = stop_check(ctx, stop)
        if self.on and "val bpb" not in self.failed and due(cfg.eval_every, step, step == self.last):
            # a signal during the pass abandons it (before each batch; every rank at the same one)
            try:
                if self.token_bytes is None:
                    self.token_bytes = get_token_bytes(ctx.device)
                val = evaluate_val(model, self.tokenizer, ctx, self.token_bytes, cfg, self.eval_tokens, should_stop)
            except (Exception, torch.OutOfMemoryError) as e:
                self._failed("val bpb", step, e)
            else:
                if val is None:
                    ctx.print0(f"step {step:05d} | validation abandoned: stop requested")
                    return False
                state.record_val(val["bpb"])
                record["val_bpb"], record["val_loss"] = val["bpb"], val["loss"]  # val_loss: nats/token, like loss
                ctx.print0(f"step {step:05d} | val bpb {val['bpb']:.6f} | val loss {val['loss']:.4f}")
        if self.core_on and "CORE" not in self.failed and due(cfg.core_metric_every, step, step == self.last):
            try:
                core = run_core(model, self.tokenizer, ctx, cfg.core_metric_max_per_task, should_stop)
                if core is None:
                    ctx.print0(f"step {step:05d} | CORE abandoned: stop requested")
                    return False
                state.core = record["core"] = core["core"]
                ctx.print0(f"step {step:05d} | CORE {state.core:.4f} over {core['n_tasks']} of {core['n_tasks_total']} tasks")
                if core["failed"]:  # the scored tasks are kept; the run still ends reporting the failure
                    self.failed["CORE tasks"] = "; ".join(core["failed"].values())
            except (Exception, torch.OutOfMemoryError) as e:
                self._failed("CORE", step, e)
        if self.on and ctx.is_master and "samples" not in self.failed and due(cfg.sample_every, step, step == self.last):
            try:
                print_samples(model, self.tokenizer)
            except Exception as e:
                self._failed("samples", step, e)
        return True


# ---------------------------------------------------------------------------------------------
# the run


def sizing_table(plan: sizing.RunPlan, ctx: RuntimeContext, model) -> str:
    p = plan
    rows = [
        ("parameters (total)", f"{p.num_params:,}"),
        ("  scaling (block matrices + head)", f"{p.scaling_params:,}"),
        ("  embeddings (token + value)", f"{p.embedding_params:,}"),
        ("  scalars", f"{p.scalar_params:,}"),
        ("FLOPs per token", f"{p.flops_per_token:.4g}"),
        ("tokens per step", (f"{p.tokens_per_step:,} = {p.device_batch_size} x {p.max_seq_len} x "
                             f"{p.world_size} ranks x {p.grad_accum_steps} accumulation")),
        ("steps", f"{p.num_iterations:,} (from {p.horizon_source})"),
        ("total tokens", f"{p.total_tokens:,}"),
        ("tokens : scaling params", f"{p.tokens_per_scaling_param:.2f}"),
        ("total FLOPs", f"{p.total_flops:.4g}"),
        ("learning rates", (f"matrix {p.matrix_lr:.4g}, embedding {p.embedding_lr:.4g}, "
                            f"unembedding {p.unembedding_lr:.4g}, scalar {p.scalar_lr:.4g}")),
        ("schedule", f"warmup {p.warmup_steps}, warmdown {p.warmdown_ratio:g}, final {p.final_lr_frac:g}"),
        ("weight decay (Muon)", f"{p.weight_decay:.4g}"),
        ("world size", f"{ctx.world_size} ({ctx.device_name})"),
        *([("threads", ctx.threads)] if ctx.device_type == "cpu" and ctx.threads else []),
        ("dtype", ctx.dtype_summary() + (" (block Linears in fp8)" if getattr(model, "fp8", False) else "")),
        ("attention", model.attention_backend),
        ("peak FLOP/s (MFU)", f"{ctx.peak_flops:.4g} dense bf16" + (" (fp8 matmuls counted against the bf16 peak)"
                                                                    if getattr(model, "fp8", False) else "")
                              if ctx.peak_flops else "unknown (MFU not reported)"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["=" * 80, "sizing"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["model:", str(model), "=" * 80]
    decay_per_step = plan.matrix_lr * plan.weight_decay
    if decay_per_step > 0.05:  # the horizon rule D_ref / D explodes for very short runs
        lines.append(f"WARNING: Muon weight decay x matrix LR = {decay_per_step:.3g} per step shrinks the weights "
                     f"by that fraction each step (the run is very short for this model): set --weight-decay")
    return "\n".join(lines)


def build_train_model(cfg: TrainConfig, plan: sizing.RunPlan, ctx: RuntimeContext):
    """(model, the module training calls: compiled or the model itself, whether it is compiled)."""
    mc = plan.model_config  # --dtype auto on CPU: the GEMM probe again at this model's shapes (cached)
    ctx.probe_at(matmul_probe_shapes(mc.n_embd, plan.device_batch_size * plan.max_seq_len, mc.padded_vocab_size))
    with torch.device("meta"):
        model = GPT(plan.model_config, compute_dtype=ctx.dtype, attention=cfg.attention)
    model.to_empty(device=ctx.device)
    model.init_weights()
    try:
        model.set_attention()  # once per run; printed in the sizing table and run.json
        if cfg.fp8:
            from nanochat.fp8 import enable_fp8

            model.fp8 = bool(enable_fp8(model))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    model.fused_loss = {"auto": None, "on": True, "off": False}[cfg.fused_loss]
    if ctx.device_type == "cuda":
        model.fused_loss_chunk_rows = 4096  # fewer eager chunk iterations (it runs outside the compiled graph)
    compile_model = cfg.compile if cfg.compile is not None else ctx.device_type == "cuda"
    if compile_model and cfg.compile_scope == "blocks":
        train_model = model.compile_blocks(dynamic=False)  # in place: model is train_model
    elif compile_model:
        model.before_compile()
        train_model = torch.compile(model, dynamic=False)
    else:
        train_model = model
    return model, train_model, compile_model


def build_train_optimizer(cfg: TrainConfig, plan: sizing.RunPlan, ctx: RuntimeContext, model, compile_model: bool):
    """MuonAdamW with the plan's LRs and weight decay (the schedule scales them from these initial values)."""
    # Muon's orthogonalisation: bf16 on GPUs and where the CPU probe chose bf16; fp32 on other CPUs, whose
    # emulated bf16 matmuls run ~10x slower (measured: Muon step 24 s vs 2 s at depth 4)
    extra = {} if ctx.device_type == "cpu" else {"compile": compile_model}
    optimizer = build_optimizer(model, weight_decay=plan.weight_decay, **plan.lrs, orth_dtype=ctx.orth_dtype,
                                reduce_dtype=torch.bfloat16 if cfg.grad_reduce_dtype == "bf16" else torch.float32,
                                **extra)
    for group in optimizer.param_groups:
        group["initial_weight_decay"] = group.get("weight_decay", 0.0)
    return optimizer


def report_overlap(optimizer, ctx: RuntimeContext, whole_model_compiled: bool) -> None:
    stats = optimizer.overlap_stats
    ctx.print0(f"gradient reductions: {stats['in_backward']} of {stats['total']} started during backward"
               + (" (a whole-model torch.compile finishes every gradient at the end of backward: "
                  "--compile-scope blocks lets them overlap it)" if whole_model_compiled else ""))


def step_record(plan: sizing.RunPlan, ctx: RuntimeContext, state: LoopState, raw_loss: float, lrm: float, dt: float,
                first_timed: int) -> dict:
    """The metrics record of the step just done (state.step), printed as the step's console line."""
    step, N = state.step, plan.num_iterations
    smooth_loss = state.update_loss(raw_loss)
    tok_per_sec = plan.tokens_per_step / dt
    mfu = plan.flops_per_token * tok_per_sec / (ctx.peak_flops * ctx.world_size) if ctx.peak_flops else None
    timed = step - first_timed
    eta = (N - step) * (state.train_time / timed if timed > 0 else dt)
    record = {"step": step, "loss": smooth_loss, "raw_loss": raw_loss, "lr": lrm, "dt": dt,
              "tok_per_sec": tok_per_sec, "mfu": mfu, "tokens": step * plan.tokens_per_step,
              "flops": step * plan.tokens_per_step * plan.flops_per_token, "peak_mem_mb": peak_memory_mb(ctx)}
    ctx.print0(f"step {step:05d}/{N} | loss {smooth_loss:.4f} (raw {raw_loss:.4f}) | lrm {lrm:.3f} | "
               f"dt {dt * 1000:.0f}ms | tok/s {tok_per_sec:,.0f} | mfu {f'{100 * mfu:.2f}%' if mfu is not None else 'n/a'}"
               f" | mem {record['peak_mem_mb']:.0f}MB | eta {eta / 60:.1f}m")
    return record


def train(cfg: TrainConfig) -> int:
    """Run pretraining as the config says; returns the process exit code."""
    cfg.validate()
    try:
        ctx = init_runtime(cfg.device_type, cfg.dtype, seed=cfg.seed, threads=cfg.threads)
    except (ValueError, RuntimeError) as e:  # --device-type cuda without CUDA, --dtype fp8, a failed rendezvous
        raise ConfigError(str(e)) from e
    try:
        # architecture left open: the record recipe on CUDA with a windowed attention kernel (README)
        return _train(cfg.with_device_defaults(windowed_kernel_available(ctx.device_type, ctx.dtype, cfg.attention)),
                      ctx)
    finally:
        ctx.teardown()


def _start_wandb(cfg: TrainConfig, plan: sizing.RunPlan, ctx: RuntimeContext):
    if cfg.run == "dummy" or not ctx.is_master:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("--run names a wandb run but wandb is not installed: `pip install wandb`, "
                          "or pass --run dummy") from e
    return wandb.init(project="nanochat", name=cfg.run, config={"args": cfg.to_dict(), "sizing": plan.to_dict()},
                      resume="allow")


def _train(cfg: TrainConfig, ctx: RuntimeContext) -> int:
    tokenizer = None if cfg.synthetic_data else get_tokenizer()
    vocab_size = cfg.vocab_size if cfg.synthetic_data else tokenizer.get_vocab_size()
    if ctx.needs_grad_scaler:
        raise ConfigError("--dtype float16 needs a gradient scaler, which this loop does not have: use bfloat16 "
                          "(SM80+ GPUs) or float32")
    auto_batch = cfg.device_batch_size == "auto"
    try:  # with --device-batch-size auto, a provisional plan (batch 1) until the probe below
        plan = sizing.plan_run(replace(cfg, device_batch_size=1) if auto_batch else cfg, vocab_size, ctx.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    with phase_run("base", cfg.tag, cfg.resume_from_step, ctx, "base_train") as run:
        return _train_locked(cfg, ctx, tokenizer, vocab_size, plan, run)


def _train_locked(cfg: TrainConfig, ctx: RuntimeContext, tokenizer, vocab_size: int, plan: sizing.RunPlan,
                  run: PhaseRun) -> int:
    auto_batch = cfg.device_batch_size == "auto"
    out_dir, resume_which = run.out_dir, run.resume

    model, train_model, compile_model = build_train_model(cfg, plan, ctx)
    if auto_batch:
        # a resume probes again: the loader's state is per logical stream, so another micro-batch continues exactly
        found = find_device_batch_size(model, train_model, cfg.max_seq_len, vocab_size, plan.tokens_per_step,
                                       ctx.world_size, log=ctx.print0)
        cfg = replace(cfg, device_batch_size=int(found))
        plan = sizing.plan_run(replace(cfg, total_batch_size=plan.tokens_per_step), vocab_size, ctx.world_size)
    N, A = plan.num_iterations, plan.grad_accum_steps
    optimizer = build_train_optimizer(cfg, plan, ctx, model, compile_model)
    train_loader = make_loader(cfg, tokenizer, "train", ctx, A, vocab_size)

    state, resume_step = LoopState(), None
    if resume_which is not None:
        resume_step, state, _ = restore_training_checkpoint(out_dir, resume_which, ctx, model, optimizer,
                                                            train_loader, plan.model_config.to_dict(), tokenizer)

    ctx.print0(sizing_table(plan, ctx, model))
    streams = getattr(train_loader, "streams", None)
    if streams:
        ctx.print0(f"data: {streams} logical streams, {streams // ctx.world_size} per rank (each rank reads and "
                   f"tokenises only its own); resumable on {', '.join(map(str, divisors(streams)))} ranks")
    # the logical streams are part of how a step's rows are cut: recorded with the rest of the step's sizing
    run.write_record(cfg.to_dict(), plan.model_config.to_dict(), {**plan.to_dict(), "data_streams": streams},
                     resume_step, attention=model.attention_backend, fp8=bool(getattr(model, "fp8", False)),
                     mfu_peak="dense bf16")
    metrics = run.metrics(resume_step)
    wandb_run = _start_wandb(cfg, plan, ctx)
    evals = Evaluations(cfg, plan, ctx, tokenizer)
    hooks = TestHooks.from_env()
    meta = run.checkpoint_meta(num_iterations=N)

    first_timed = state.step + 1  # the first step of a (re)start pays compilation and warm-up: not timed
    ctx.print0(f"training steps {state.step} -> {N}")
    with StopSignal() as stop, contextlib.closing(train_loader):
        while state.step < N:
            t0 = time.time()
            apply_schedule(optimizer, plan.lr_multiplier(state.step), plan.weight_decay_multiplier(state.step),
                           sizing.muon_momentum(state.step))
            try:
                result = train_step(train_model, optimizer, train_loader, A, ctx, stop, state.step, hooks,
                                    overlap_reductions=cfg.overlap_reductions)
            except torch.OutOfMemoryError:
                return exit_oom(ctx, oom_message(cfg.device_batch_size, cfg.max_seq_len, where=f"step {state.step}"))
            except NonFiniteLoss as e:
                last = ckpt.list_steps(out_dir)
                ctx.print0(f"stopping: {e}; no update was applied. Last good checkpoint: "
                           f"{f'step {last[-1]} in {out_dir}' if last else 'none'} (kept). Try a lower learning rate, "
                           f"or resume from it with --resume-from-step")
                return EXIT_NONFINITE
            dt = time.time() - t0
            lrm = plan.lr_multiplier(state.step)
            state.step += 1
            step = state.step
            if step > first_timed:
                state.train_time += dt
            elif compile_model:
                ctx.print0(f"first step {dt:.1f}s (torch.compile + warm-up)")
            if ctx.ddp and step == first_timed + 1 and cfg.overlap_reductions:
                report_overlap(optimizer, ctx, compile_model and cfg.compile_scope == "model")
            record = step_record(plan, ctx, state, result.loss, lrm, dt, first_timed)
            # a stop signal (all ranks agree through result.stop_requested) skips the evaluations: preemption
            # grace periods are short and the checkpoint matters more
            stopping = result.stop_requested or (not ctx.ddp and stop.received is not None)
            saved = stopping or (step == N and cfg.final_checkpoint) or (cfg.save_every > 0 and step % cfg.save_every == 0)
            if saved:  # before the evaluations: an evaluation that fails cannot cost the trained model
                reason = f"signal {stop.received or 'on another rank'}" if stopping else ("final" if step == N else "periodic")
                t_save = time.time()
                pruned = save_training_checkpoint(out_dir, step, model, optimizer, train_loader, state, ctx, meta,
                                                  cfg.keep_last, tokenizer)
                # (the time tells how long a preemption grace period must be: docs/multinode.md)
                ctx.print0(f"saved checkpoint step {step} ({reason}) to {out_dir} in {time.time() - t_save:.1f}s"
                           + (f"; removed steps {pruned}" if pruned else ""))
            if stopping:
                if evals.any_due(step):
                    ctx.print0(f"step {step:05d} | evaluations skipped: stop requested")
            elif evals.any_due(step):
                completed = evals.run(model, step, state, record, stop)  # the uncompiled module (see loss_eval)
                if saved and ctx.is_master:
                    update_checkpoint_meta(out_dir, step, state)
                if not completed:  # a signal abandoned the validation pass; the step is saved below
                    stopping = True
            metrics.write(record)
            if wandb_run is not None:
                wandb_run.log(record, step=step)
            if stopping:
                if not saved:
                    save_training_checkpoint(out_dir, step, model, optimizer, train_loader, state, ctx, meta,
                                             cfg.keep_last, tokenizer)
                ctx.print0(f"stopped by signal at step {step}; resume with --resume-from-step {step}")
                break
    if wandb_run is not None:
        wandb_run.finish()
    ctx.print0(f"done: step {state.step}/{N}, val bpb {state.val_bpb}, training time {state.train_time / 60:.2f} min")
    if evals.failed:
        ctx.print0("evaluations that failed (the model is saved): " + "; ".join(f"{k}: {v}" for k, v in evals.failed.items()))
        return EXIT_EVAL
    return EXIT_OK
