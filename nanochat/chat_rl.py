"""Reinforcement learning on verifiable rewards: the reference's GSM8K policy gradient, behind
`scripts/chat_rl.py`.

Per optimizer step, `examples_per_step` problems (split across ranks); per problem, `num_samples`
replies sampled by the engine (tool use on), `device_batch_size` at a time -- the last batch is
smaller when the two do not divide, never truncated. Rewards come from the task (`task.reward`);
advantage = reward - the group's mean (no std normalisation, no KL, no PPO ratio: on-policy REINFORCE
with a group baseline, as the reference). Loss = -sum(logp * advantage) over the sampled tokens
(forced tool outputs and the prompt are masked out), divided by the problem's number of sampled
tokens and by the problems per rank: token-level normalisation, independent of how the samples
were batched. LR = the source's LRs x 0.05, decaying linearly to 0.

Everything a step depends on is a function of the step number (which problems, the sampling seeds)
and of the weights and optimizer state, all of which a checkpoint holds: resume is exact (the
reference cannot resume RL). Metrics: step, reward (mean over the step's samples), advantage_sum
(~0: a check), sequence lengths, lr; pass@1..k on the evaluation task every `eval_every` steps.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat.chat_sft import base_learning_rates
from nanochat.common import RuntimeContext
from nanochat.config import ConfigError, RunConfig
from nanochat.optim import build_optimizer
from nanochat.tasks import EVAL_TASKS, MIX_TASKS, TaskDataError
from nanochat.training import (EXIT_NONFINITE, EXIT_OK, EXIT_OOM, LoopState, NonFiniteLoss, StopSignal,
                               apply_schedule, restore_training_checkpoint, run_in_run_folder,
                               save_training_checkpoint)


@dataclass
class RLConfig(RunConfig):
    """RL (scripts/chat_rl.py). `model_tag` names the output folder chatrl_checkpoints/<tag> (default: the
    source's tag)."""

    source: str = "sft"
    source_tag: str | None = None
    source_step: int | None = None
    task: str = "gsm8k"  # training problems: a name of nanochat.tasks.MIX_TASKS with a reward (gsm8k, embedded)
    eval_task: str = "GSM8K"  # a name of nanochat.tasks.EVAL_TASKS
    task_data: str | None = None
    train_size: int = -1  # > 0: only the first N training problems
    examples_per_step: int = 16  # problems per optimizer step, over all ranks
    num_samples: int = 16  # replies per problem
    device_batch_size: int = 8  # replies per forward/backward
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 50
    num_epochs: float = 1.0
    num_iterations: int = -1  # > 0: fixed number of steps
    init_lr_frac: float = 0.05
    weight_decay: float = 0.0
    eval_every: int = 60  # > 0 periodic + last step; -1 last only; 0 never
    eval_examples: int = 400
    eval_num_samples: int = 4  # pass@1..k
    quiet: bool = False


class ProblemCursor:
    """The 'data loader' of RL: problems are a function of the step, so its state is the step alone (kept so
    that the shared checkpoint code, which saves a loader state per rank, has something to save)."""

    def __init__(self, num_problems: int):
        self.num_problems, self.step = num_problems, 0

    def problems(self, step: int, per_step: int, rank: int, world: int) -> list[int]:
        base = step * per_step
        return [(base + j) % self.num_problems for j in range(rank, per_step, world)]

    def state_dict(self) -> dict:
        return {"kind": "rl", "step": self.step, "num_problems": self.num_problems}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "rl" or state.get("num_problems") != self.num_problems:
            raise ValueError(f"RL state over {state.get('num_problems')} problems does not fit this task "
                             f"({self.num_problems}): resume with the same --task and --train-size")
        self.step = state["step"]


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """reward - mean reward of the group (the samples of one problem): sums to 0."""
    return rewards - rewards.mean()


def sample_batch(engine, tokenizer, prompt: list[int], n: int, cfg: RLConfig, seed: int, pad_id: int, limit: int):
    """n sampled replies -> (inputs (n, L), targets (n, L) with -1 off the sampled tokens, replies as text)."""
    budget = max(1, min(cfg.max_new_tokens, limit - len(prompt)))
    seqs, masks = engine.generate_batch(prompt, num_samples=n, max_tokens=budget, temperature=cfg.temperature,
                                        top_k=cfg.top_k, seed=seed)
    replies = [tokenizer.decode(s[len(prompt):]) for s in seqs]
    L = max(len(s) for s in seqs) - 1
    inputs = torch.full((n, max(L, 1)), pad_id, dtype=torch.long)
    targets = torch.full((n, max(L, 1)), -1, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        if len(s) > 1:
            inputs[i, :len(s) - 1] = torch.tensor(s[:-1])
            t = torch.tensor(s[1:])
            keep = torch.tensor(m[1:], dtype=torch.bool)
            targets[i, :len(s) - 1] = torch.where(keep, t, torch.full_like(t, -1))
    return inputs, targets, replies


def run_rl(cfg: RLConfig, ctx: RuntimeContext | None = None, train_task=None, eval_task=None) -> int:
    """Train; returns an exit code. `train_task` / `eval_task` override cfg.task / cfg.eval_task (tests)."""
    return run_in_run_folder(cfg, ctx, "rl", "chat_rl", lambda c, x: _run(c, x, train_task, eval_task),
                             errors=(TaskDataError,))


def _run(cfg: RLConfig, ctx: RuntimeContext, train_task, eval_task) -> int:
    from nanochat.chat_eval import run_generative
    from nanochat.engine import Engine

    say = (lambda *a: None) if cfg.quiet else ctx.print0
    cfg.validate()
    for name in ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.examples_per_step % ctx.world_size:
        raise ConfigError(f"--examples-per-step {cfg.examples_per_step} must be divisible by the "
                          f"{ctx.world_size} ranks")
    if train_task is None:
        if cfg.task not in MIX_TASKS:
            raise ConfigError(f"unknown --task {cfg.task!r}; known: {', '.join(MIX_TASKS)}")
        train_task = MIX_TASKS[cfg.task][0](cfg.task_data)
    if cfg.train_size > 0:
        train_task = train_task[:cfg.train_size]
    if eval_task is None and cfg.eval_every != 0:
        if cfg.eval_task not in EVAL_TASKS:
            raise ConfigError(f"unknown --eval-task {cfg.eval_task!r}; known: {', '.join(EVAL_TASKS)}")
        eval_task = EVAL_TASKS[cfg.eval_task](cfg.task_data)
    if train_task.eval_type != "generative":
        raise ConfigError(f"{train_task!r} is a {train_task.eval_type} task: RL needs sampled replies with a reward")

    src_tag = cfg.source_tag or ckpt.find_last_tag(rd.phase_dir(cfg.source))
    model, tokenizer, src_meta = ckpt.load_model(cfg.source, ctx.device, src_tag, cfg.source_step,
                                                 compute_dtype=ctx.dtype)
    model.train()
    model_config = model.config.to_dict()
    limit = model.config.sequence_len
    out_dir = rd.run_dir("rl", cfg.model_tag or src_tag)  # taken by run_rl (lock, --resume auto, refusals)
    resume = cfg.resume_from_step

    # the base run's LRs x init_lr_frac (as the reference, whose SFT and RL both scale the same base LRs): an SFT
    # run.json records them as base_lrs; a base run's own sizing holds them
    src_run = rd.read_run_json(rd.run_dir(cfg.source, src_tag)) or {}
    src_lrs = (src_run.get("sizing") or {}).get("base_lrs") or base_learning_rates(src_run or src_meta)
    lrs = {k: v * cfg.init_lr_frac for k, v in src_lrs.items()}
    extra = {"orth_dtype": ctx.orth_dtype}
    optimizer = build_optimizer(model, weight_decay=cfg.weight_decay, **lrs, **extra)
    cursor = ProblemCursor(len(train_task))
    N = cfg.num_iterations if cfg.num_iterations > 0 else max(1, int(cfg.num_epochs * len(train_task)) //
                                                                cfg.examples_per_step)
    state = LoopState()
    resume_step = None
    if resume is not None:
        if not ckpt.list_steps(out_dir):
            raise ConfigError(f"--resume {resume}: no checkpoint in {out_dir} yet")
        resume_step, state, _ = restore_training_checkpoint(out_dir, resume, ctx, model, optimizer, cursor,
                                                            model_config)
    if ctx.is_master:
        rd.write_run_json(out_dir, {"config": cfg.to_dict(), "model_config": model_config,
                                    "source": {"phase": cfg.source, "tag": src_tag, "step": src_meta.get("step")},
                                    "sizing": {**lrs, "num_iterations": N, "world_size": ctx.world_size,
                                               "problems": len(train_task)}, "resumed_from": resume_step})
    metrics = rd.MetricsWriter(out_dir, resume_step if resume_step is not None else 0, ctx.is_master)
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.get_bos_token_id()
    per_rank = cfg.examples_per_step // ctx.world_size
    say(f"RL from {cfg.source}/{src_tag}: {len(train_task):,} problems of {train_task.name}, {N} steps x "
        f"{cfg.examples_per_step} problems x {cfg.num_samples} samples, LRs x {cfg.init_lr_frac}")

    def evaluate() -> dict:
        res = run_generative(eval_task, model, tokenizer, ctx, num_samples=cfg.eval_num_samples,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                             max_problems=cfg.eval_examples, batch_size=cfg.device_batch_size, seed=cfg.seed)
        model.train()
        return {k: v for k, v in res.items() if k.startswith("pass@")}

    with StopSignal() as stop:
        while state.step < N:
            t0 = time.time()
            step = state.step
            lrm = 1.0 - step / N
            apply_schedule(optimizer, lrm)
            stats = torch.zeros(5, dtype=torch.float64)  # reward sum, samples, advantage sum, tokens, loss sum
            try:
                for j, index in enumerate(cursor.problems(step, cfg.examples_per_step, ctx.rank, ctx.world_size)):
                    conv = train_task[index]
                    prompt = tokenizer.render_for_completion(conv)[-(limit - 1):]
                    model.eval()
                    chunks = []
                    for b, start in enumerate(range(0, cfg.num_samples, cfg.device_batch_size)):
                        n = min(cfg.device_batch_size, cfg.num_samples - start)
                        seed = cfg.seed + 1_000_003 * step + 1009 * index + b
                        chunks.append(sample_batch(engine, tokenizer, prompt, n, cfg, seed, pad_id, limit))
                    model.train()
                    rewards = torch.tensor([train_task.reward(conv, r) for c in chunks for r in c[2]],
                                           dtype=torch.float32)
                    adv = group_advantages(rewards)
                    valid = sum(int((c[1] >= 0).sum()) for c in chunks)
                    stats += torch.tensor([float(rewards.sum()), len(rewards), float(adv.sum()), valid, 0.0],
                                          dtype=torch.float64)
                    offset = 0
                    for inputs, targets, _ in chunks:
                        a = adv[offset:offset + len(inputs)].to(ctx.device)
                        offset += len(inputs)
                        logp = -model(inputs.to(ctx.device), targets.to(ctx.device), loss_reduction="none")  # (n, L)
                        objective = (logp * a[:, None]).sum() / (max(valid, 1) * per_rank)
                        loss = -objective
                        loss.backward()
                        stats[4] += float(loss.detach())
                totals = ctx.all_reduce_sum(torch.cat([stats, torch.tensor([float(stop.received is not None)],
                                                                           dtype=torch.float64)]))
                loss_value = float(totals[4]) / ctx.world_size
                if not torch.isfinite(torch.tensor(loss_value)):
                    raise NonFiniteLoss(f"loss is {loss_value} at step {step}")
                optimizer.step()
                model.zero_grad(set_to_none=True)
                ctx.synchronize()
            except torch.OutOfMemoryError:
                print(f"[rank {ctx.rank}] CUDA out of memory at step {step}: lower --device-batch-size (samples per "
                      f"forward; --num-samples is kept)", file=sys.stderr, flush=True)
                return EXIT_OOM
            except NonFiniteLoss as e:
                say(f"stopping: {e}; no update was applied. Last checkpoint: {ckpt.list_steps(out_dir)[-1:]}")
                return EXIT_NONFINITE
            dt = time.time() - t0
            state.step += 1
            cursor.step = state.step
            state.train_time += dt
            state.update_loss(loss_value)
            reward = float(totals[0] / totals[1])
            record = {"step": state.step, "reward": reward, "advantage_sum": float(totals[2]),
                      "tokens_per_sample": float(totals[3] / totals[1]), "loss": loss_value, "lr": lrm, "dt": dt}
            stopping = totals[5] > 0
            last = state.step == N
            if eval_task is not None and not stopping and cfg.eval_every != 0 and (
                    last or (cfg.eval_every > 0 and state.step % cfg.eval_every == 0)):
                record.update(evaluate())
            metrics.write(record)
            say(f"step {state.step:05d}/{N} | reward {reward:.4f} | tokens/sample {record['tokens_per_sample']:.1f} | "
                f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms"
                + "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("pass@")))
            if stopping or last or (cfg.save_every > 0 and state.step % cfg.save_every == 0):
                meta = {"model_config": model_config, "config": cfg.to_dict(), "phase": "rl", "reward": reward,
                        "finished": last}
                save_training_checkpoint(out_dir, state.step, model, optimizer, cursor, state, ctx, meta, cfg.keep_last)
                say(f"saved checkpoint step {state.step} to {out_dir}")
            if stopping:
                say(f"stopped by signal at step {state.step}; resume with --resume latest")
                return EXIT_OK
    return EXIT_OK


__all__ = ["ProblemCursor", "RLConfig", "group_advantages", "run_rl"]
