"""Reinforcement learning on verifiable rewards: the reference's GSM8K policy gradient, behind
`scripts/chat_rl.py`.

Per optimizer step, `examples_per_step` problems (split across ranks); per problem, `num_samples`
replies sampled by the engine (tool use on), `device_batch_size` at a time -- the last batch is
smaller when the two do not divide, never truncated. Rewards come from the task (`task.reward`);
advantage = reward - the group's mean (no std normalisation, no KL, no PPO ratio: on-policy REINFORCE
with a group baseline, as the reference). Loss = -sum(logp * advantage) over the sampled tokens
(forced tool outputs and the prompt are masked out), divided by the problem's number of sampled
tokens and by the problems per rank: token-level normalisation, independent of how the samples
were batched. LR = the pretraining run's LRs x 0.05 (sizing.pretraining_lrs of the source checkpoint; the
reference's SFT and RL both scale the base LRs), decaying linearly to 0 (sizing.rl_lr_multiplier). The
update is the shared `train_step` over the step's chunks of replies (`PolicyGradientLoss`), so RL gets
its one reduction of loss and stop flag, the non-finite check before the update and the test hooks.

Everything a step depends on is a function of the step number (which problems, the sampling seeds)
and of the weights and optimizer state, all of which a checkpoint holds: resume is exact (the
reference cannot resume RL). Metrics: step, reward (mean over the step's samples), advantage_sum
(~0: a check), sequence lengths, lr; pass@1..k on the evaluation task every `eval_every` steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanochat import checkpoint_manager as ckpt
from nanochat import run_dir as rd
from nanochat import sizing
from nanochat.autobatch import oom_message
from nanochat.common import RuntimeContext
from nanochat.config import ConfigError, RunConfig
from nanochat.optim import build_optimizer
from nanochat.sizing import FinetunePlan
from nanochat.tasks import EVAL_TASKS, MIX_TASKS, TaskDataError
from nanochat.training import (EXIT_NONFINITE, EXIT_OK, LoopState, NonFiniteLoss, PhaseRun, StopSignal, TestHooks,
                               apply_schedule, due, exit_oom, restore_training_checkpoint, run_chat_phase,
                               save_training_checkpoint, train_step)


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


class PolicyGradientLoss(torch.nn.Module):
    """The policy-gradient loss as a module `train_step` calls like a model: forward(inputs, (targets,
    advantages, norm)) = -sum(logp x advantage) over the sampled tokens / norm (the problem's sampled tokens x
    problems per rank), x the micro-batches per step, which train_step divides by again."""

    def __init__(self, model, micro_batches: int):
        super().__init__()
        self.model, self.micro_batches = model, micro_batches

    def forward(self, inputs, target):
        targets, advantages, norm = target
        logp = -self.model(inputs, targets, loss_reduction="none")  # (n, L), 0 off the sampled tokens
        return -(logp * advantages[:, None]).sum() / norm * self.micro_batches


def run_rl(cfg: RLConfig, ctx: RuntimeContext | None = None, train_task=None, eval_task=None) -> int:
    """Train; returns an exit code. `train_task` / `eval_task` override cfg.task / cfg.eval_task (tests)."""
    return run_chat_phase(cfg, ctx, "rl", "chat_rl", lambda c, run: _run(c, run, train_task, eval_task),
                          errors=(TaskDataError,))


def _tasks(cfg: RLConfig, ctx: RuntimeContext, train_task, eval_task):
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
    return train_task, eval_task


def _run(cfg: RLConfig, run: PhaseRun, train_task, eval_task) -> int:
    from nanochat.chat_eval import run_generative
    from nanochat.engine import Engine

    ctx, out_dir = run.ctx, run.out_dir
    say = (lambda *a: None) if cfg.quiet else ctx.print0
    train_task, eval_task = _tasks(cfg, ctx, train_task, eval_task)
    model, tokenizer, src_meta = ckpt.load_model(cfg.source, ctx.device, run.source_tag, cfg.source_step,
                                                 compute_dtype=ctx.dtype)
    run.source["step"] = src_meta.get("step")
    model.train()
    model_config, limit = model.config.to_dict(), model.config.sequence_len
    per_rank = cfg.examples_per_step // ctx.world_size
    chunks_per_problem = -(-cfg.num_samples // cfg.device_batch_size)
    src_run = rd.read_run_json(rd.run_dir(cfg.source, run.source_tag))  # older source checkpoints lack sizing
    plan = FinetunePlan(sizing.pretraining_lrs(src_meta, src_run), cfg.init_lr_frac, cfg.weight_decay,
                        ctx.world_size, cfg.device_batch_size, limit, per_rank * chunks_per_problem,
                        cfg.num_iterations if cfg.num_iterations > 0 else
                        max(1, int(cfg.num_epochs * len(train_task)) // cfg.examples_per_step),
                        cfg.num_epochs, len(train_task))
    N = plan.num_iterations
    optimizer = build_optimizer(model, weight_decay=plan.weight_decay, **plan.lrs, orth_dtype=ctx.orth_dtype)
    cursor = ProblemCursor(len(train_task))
    state, resume_step = LoopState(), None
    if run.resume is not None:
        resume_step, state, _ = restore_training_checkpoint(out_dir, run.resume, ctx, model, optimizer, cursor,
                                                            model_config)
    run.write_record(cfg.to_dict(), model_config, plan.to_dict(), resume_step)
    metrics = run.metrics(resume_step)
    engine, pad_id = Engine(model, tokenizer), tokenizer.get_bos_token_id()
    policy_loss = PolicyGradientLoss(model, plan.grad_accum_steps)
    say(f"RL from {cfg.source}/{run.source_tag}: {len(train_task):,} problems of {train_task.name}, {N} steps x "
        f"{cfg.examples_per_step} problems x {cfg.num_samples} samples, LRs x {cfg.init_lr_frac}")

    def micro_batches(step: int, stats: torch.Tensor):
        """Per problem of this rank: sample its replies, reward them, then yield its chunks (inputs, (targets,
        advantages, norm)). Adds reward sum, samples, advantage sum and sampled tokens to `stats`."""
        for index in cursor.problems(step, cfg.examples_per_step, ctx.rank, ctx.world_size):
            conv = train_task[index]
            prompt = tokenizer.render_for_completion(conv)[-(limit - 1):]
            model.eval()
            chunks = [sample_batch(engine, tokenizer, prompt, min(cfg.device_batch_size, cfg.num_samples - start),
                                   cfg, cfg.seed + 1_000_003 * step + 1009 * index + b, pad_id, limit)
                      for b, start in enumerate(range(0, cfg.num_samples, cfg.device_batch_size))]
            model.train()
            rewards = torch.tensor([train_task.reward(conv, r) for c in chunks for r in c[2]], dtype=torch.float32)
            adv = group_advantages(rewards)
            valid = sum(int((c[1] >= 0).sum()) for c in chunks)
            stats += torch.tensor([float(rewards.sum()), len(rewards), float(adv.sum()), valid], dtype=torch.float64)
            offset = 0
            for inputs, targets, _ in chunks:
                a = adv[offset:offset + len(inputs)]
                offset += len(inputs)
                yield inputs.to(ctx.device), (targets.to(ctx.device), a.to(ctx.device), max(valid, 1) * per_rank)

    hooks = TestHooks.from_env()
    with StopSignal() as stop:
        while state.step < N:
            t0, step = time.time(), state.step
            lrm = sizing.rl_lr_multiplier(step, N)
            apply_schedule(optimizer, lrm)
            stats = torch.zeros(4, dtype=torch.float64)  # reward sum, samples, advantage sum, sampled tokens
            try:
                result = train_step(policy_loss, optimizer, micro_batches(step, stats), plan.grad_accum_steps, ctx,
                                    stop, step=step, hooks=hooks)
            except torch.OutOfMemoryError:
                return exit_oom(ctx, oom_message(cfg.device_batch_size, limit, where=f"step {step}", remedy=(
                    "lower --device-batch-size (replies per forward; --num-samples is kept)")))
            except NonFiniteLoss as e:
                say(f"stopping: {e}; no update was applied. Last checkpoint: {ckpt.list_steps(out_dir)[-1:]}")
                return EXIT_NONFINITE
            totals = ctx.all_reduce_sum(stats)
            dt = time.time() - t0
            state.step += 1
            cursor.step = state.step
            state.train_time += dt
            state.update_loss(result.loss)
            reward, last = float(totals[0] / totals[1]), state.step == N
            record = {"step": state.step, "reward": reward, "advantage_sum": float(totals[2]),
                      "tokens_per_sample": float(totals[3] / totals[1]), "loss": result.loss, "lr": lrm, "dt": dt}
            if eval_task is not None and not result.stop_requested and due(cfg.eval_every, state.step, last):
                res = run_generative(eval_task, model, tokenizer, ctx, num_samples=cfg.eval_num_samples,
                                     max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                     max_problems=cfg.eval_examples, batch_size=cfg.device_batch_size, seed=cfg.seed)
                model.train()
                record.update({k: v for k, v in res.items() if k.startswith("pass@")})
            metrics.write(record)
            say(f"step {state.step:05d}/{N} | reward {reward:.4f} | tokens/sample {record['tokens_per_sample']:.1f} | "
                f"lrm {lrm:.3f} | dt {dt * 1000:.0f}ms"
                + "".join(f" | {k} {v:.4f}" for k, v in record.items() if k.startswith("pass@")))
            if result.stop_requested or last or (cfg.save_every > 0 and state.step % cfg.save_every == 0):
                save_training_checkpoint(out_dir, state.step, model, optimizer, cursor, state, ctx,
                                         run.checkpoint_meta(reward=reward, finished=last), cfg.keep_last)
                say(f"saved checkpoint step {state.step} to {out_dir}")
            if result.stop_requested:
                say(f"stopped by signal at step {state.step}; resume with --resume latest")
                return EXIT_OK
    return EXIT_OK


__all__ = ["PolicyGradientLoss", "ProblemCursor", "RLConfig", "group_advantages", "run_rl"]
