"""The one dial: everything a run's size follows from, as small pure functions.

depth -> width, heads, parameter counts, FLOPs per token; horizon -> total batch, learning rates,
weight decay; step -> learning-rate, momentum and weight-decay multipliers. Used by training, the
planner and the scaling-law tools alike. Rules and constants are those of REFERENCE.md section 2
(the reference nanochat's Jan-Mar 2026 recipe) unless a comment says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields

from nanochat.model_config import VE_GATE_CHANNELS, GPTConfig

# Compute-optimal tokens per *scaling* parameter (block matrices + LM head). The reference's Jan 2026
# IsoFLOP sweep of this exact architecture fitted ~10.5 (its default is a slightly longer 12); with
# Chinchilla's all-parameter counting the same optimum reads ~20 because the embeddings are large at
# these sizes. We have not yet run our own sweep at GPU scale (scripts/scaling_sweep.py can), so we
# adopt the fitted value rather than the rounded default.
COMPUTE_OPTIMAL_RATIO = 10.5

REF_DEPTH = 12  # the batch-size and weight-decay rules are anchored at depth 12
REF_BATCH = 2 ** 19  # tokens per step at the anchor (Power Lines, arXiv 2505.13738)
BATCH_EXPONENT = 0.383  # B* grows as D^0.383
BASE_WEIGHT_DECAY = 0.28  # Muon, at the anchor batch and horizon
MAX_DECAY_PER_STEP = 0.035  # cap on matrix lr x weight decay (see weight_decay)
# The learning rates at the anchor (2^19 tokens per step, width 768; REFERENCE s2), the one home of their
# defaults: the flags, TrainConfig, build_optimizer and the fine-tuning phases all read them from here.
BASE_LRS = {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5}


def model_config(depth: int, aspect_ratio: int = 64, head_dim: int = 128, max_seq_len: int = 2048,
                 vocab_size: int = 32768, n_kv_head: int | None = None, window_pattern: str = "L",
                 value_embeds: bool = False, resid_scalars: bool = False, **overrides) -> GPTConfig:
    """GPTConfig from the depth dial: width = depth * aspect_ratio rounded up to a multiple of head_dim."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim
    n_head = width // head_dim
    n_kv_head = n_head if n_kv_head is None else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise ValueError(f"--n-kv-head={n_kv_head} must divide the number of heads ({n_head} at depth {depth})")
    return GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=width, window_pattern=window_pattern,
                     value_embeds=value_embeds, resid_scalars=resid_scalars, **overrides)


def count_params(config: GPTConfig) -> dict[str, int]:
    """Closed-form parameter counts; must equal `GPT(config).num_params()` (tested)."""
    C, L, V = config.n_embd, config.n_layer, config.padded_vocab_size
    q_dim, kv_dim = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    per_layer = C * q_dim + 2 * C * kv_dim + q_dim * C + 8 * C * C  # q, k, v, proj, mlp fc + proj
    ve_layers = sum(config.has_value_embed(i) for i in range(L))
    matrix, head = L * per_layer, V * C
    embedding = V * C + ve_layers * V * kv_dim
    scalar = ve_layers * VE_GATE_CHANNELS * config.n_kv_head + (2 * L if config.resid_scalars else 0)
    return {"total": matrix + head + embedding + scalar, "scaling": matrix + head,
            "embedding": embedding, "scalar": scalar}


def flops_per_token(config: GPTConfig) -> float:
    """6 x scaling params (matmul fwd+bwd) + 12 * H * D * attended context per layer (scores and values)."""
    attn = sum(12 * config.n_head * config.head_dim * min(w, config.sequence_len) for w in config.window_sizes())
    return 6.0 * count_params(config)["scaling"] + attn


# ---------------------------------------------------------------------------------------------
# horizon, batch, learning rates, weight decay


def reference_tokens(config: GPTConfig, ratio: float) -> float:
    """Token budget of the depth-12 model of the same shape family at `ratio` tokens per scaling param."""
    ref = model_config(REF_DEPTH, aspect_ratio=64, head_dim=config.head_dim, max_seq_len=config.sequence_len,
                       vocab_size=config.vocab_size)
    return ratio * count_params(ref)["scaling"]


def auto_total_batch_size(tokens: float, ref_tokens: float) -> int:
    """B = 2^round(log2(2^19 * (D / D_ref)^0.383)): d8 -> 2^18, d12 -> 2^19, d20 -> 2^20 (REFERENCE s2)."""
    return 2 ** round(math.log2(REF_BATCH * (tokens / ref_tokens) ** BATCH_EXPONENT))


def learning_rates(total_batch_size: int, n_embd: int, matrix_lr: float = BASE_LRS["matrix_lr"],
                   embedding_lr: float = BASE_LRS["embedding_lr"], unembedding_lr: float = BASE_LRS["unembedding_lr"],
                   scalar_lr: float = BASE_LRS["scalar_lr"]) -> dict[str, float]:
    """All LRs scale with sqrt(B / 2^19); the AdamW groups also with (width / 768)^-0.5."""
    batch = math.sqrt(total_batch_size / REF_BATCH)
    width = (n_embd / 768) ** -0.5
    return {"matrix_lr": matrix_lr * batch, "embedding_lr": embedding_lr * batch * width,
            "unembedding_lr": unembedding_lr * batch * width, "scalar_lr": scalar_lr * batch}


def weight_decay(total_batch_size: int, tokens: float, ref_tokens: float, base: float = BASE_WEIGHT_DECAY,
                 matrix_lr: float = BASE_LRS["matrix_lr"]) -> float:
    """Muon weight decay 0.28 * sqrt(B / 2^19) * (D_ref / D): longer runs need less decay per step.

    The rule was fitted for horizons near the reference's (d8-d26). For far shorter runs (CPU demos,
    sweeps at tiny budgets) D_ref / D explodes -- a 40k-token run would get wd ~560, i.e. weights shrunk
    ~99% per step. We cap the per-step decay lr * wd at MAX_DECAY_PER_STEP (~5x what the rule gives at d8),
    which leaves every reference-scale run untouched.
    """
    wd = base * math.sqrt(total_batch_size / REF_BATCH) * (ref_tokens / tokens)
    lr = matrix_lr * math.sqrt(total_batch_size / REF_BATCH)
    return min(wd, MAX_DECAY_PER_STEP / lr)


def resolve_horizon(tokens_per_step: int, scaling_params: int, flops_per_tok: float, num_iterations: int = -1,
                    target_flops: float = -1.0, target_param_data_ratio: float = -1.0) -> tuple[int, str]:
    """Number of optimizer steps, with the reference's precedence: iterations > FLOPs > tokens:params ratio."""
    if num_iterations > 0:
        return num_iterations, f"--num-iterations={num_iterations}"
    if target_flops > 0:
        steps = round(target_flops / (flops_per_tok * tokens_per_step))
        return max(1, steps), f"--target-flops={target_flops:.3g}"
    ratio = target_param_data_ratio if target_param_data_ratio > 0 else COMPUTE_OPTIMAL_RATIO
    steps = round(ratio * scaling_params / tokens_per_step)
    return max(1, steps), f"tokens:scaling-params ratio {ratio:g}"


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size % per_pass:
        raise ValueError(
            f"--total-batch-size={total_batch_size} is not a multiple of device_batch_size x max_seq_len x world_size "
            f"= {device_batch_size} x {seq_len} x {world_size} = {per_pass}: change one of them "
            f"(e.g. --total-batch-size={max(1, round(total_batch_size / per_pass)) * per_pass})")
    return total_batch_size // per_pass


# ---------------------------------------------------------------------------------------------
# schedules (multipliers on the base values; functions of the step only, so resume is exact)


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """Linear warmup, constant, then linear warmdown over the last `warmdown_ratio` of steps to final_lr_frac."""
    warmup_steps = min(warmup_steps, max(0, num_iterations - 1))
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - step) / max(1, warmdown_steps)
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.97, ramp_steps: int = 300) -> float:
    frac = min(step / ramp_steps, 1.0) if ramp_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def weight_decay_multiplier(step: int, num_iterations: int) -> float:
    """Cosine decay of the weight decay to zero over training."""
    return 0.5 * (1 + math.cos(math.pi * min(step, num_iterations) / max(1, num_iterations)))


# fine-tuning (REFERENCE section 11): SFT's horizon is a fraction of the data (epochs), so its LR follows the
# progress through it; RL's is a number of steps


def sft_lr_multiplier(progress: float, warmdown_ratio: float = 0.5, final_lr_frac: float = 0.0) -> float:
    """SFT: 1 (no warmup) until 1 - warmdown_ratio of the horizon, then linear to final_lr_frac at the end."""
    if warmdown_ratio <= 0 or progress < 1 - warmdown_ratio:
        return 1.0
    left = max(0.0, (1 - progress) / warmdown_ratio)
    return left + (1 - left) * final_lr_frac


def sft_muon_momentum(step: int, warmup_steps: int = 300) -> float:
    """SFT: Muon momentum 0.85 -> 0.95 over the first `warmup_steps` steps."""
    return muon_momentum(step, start=0.85, end=0.95, ramp_steps=warmup_steps)


def rl_lr_multiplier(step: int, num_iterations: int) -> float:
    """RL: linear from 1 to 0 over the run."""
    return 1.0 - step / num_iterations


# ---------------------------------------------------------------------------------------------
# the run plan: everything a training configuration implies, computed once


@dataclass
class RunPlan:
    """What a run will do, from its config: the model, batch split, horizon, LRs, weight decay, schedule.

    Field names are the keys of run.json's "sizing" record (`to_dict()`), which the report card, the
    doctor and the planner read. `model_config` is stored beside it, as run.json's "model_config".
    """

    model_config: GPTConfig
    num_params: int
    scaling_params: int
    embedding_params: int
    scalar_params: int
    flops_per_token: float
    tokens_per_step: int
    num_iterations: int
    horizon_source: str
    target_param_data_ratio: float
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    weight_decay: float
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float
    world_size: int
    device_batch_size: int
    max_seq_len: int
    grad_accum_steps: int

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.num_iterations

    @property
    def total_flops(self) -> float:
        return self.flops_per_token * self.total_tokens

    @property
    def tokens_per_scaling_param(self) -> float:
        return self.total_tokens / self.scaling_params

    @property
    def lrs(self) -> dict[str, float]:
        return {"matrix_lr": self.matrix_lr, "embedding_lr": self.embedding_lr,
                "unembedding_lr": self.unembedding_lr, "scalar_lr": self.scalar_lr}

    def lr_multiplier(self, step: int) -> float:
        return lr_multiplier(step, self.num_iterations, self.warmup_steps, self.warmdown_ratio, self.final_lr_frac)

    def weight_decay_multiplier(self, step: int) -> float:
        return weight_decay_multiplier(step, self.num_iterations)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclass_fields(self) if f.name != "model_config"}
        d.update(total_tokens=self.total_tokens, total_flops=self.total_flops,
                 tokens_per_scaling_param=self.tokens_per_scaling_param)
        return d


@dataclass
class FinetunePlan:
    """What a fine-tuning phase (SFT, RL) will do: its LRs (the pretraining run's x `init_lr_frac`, as the
    reference, whose SFT and RL both scale the base LRs), batch split and horizon. `to_dict()` is run.json's
    "sizing" and the checkpoint metas' "sizing" of these phases, with RunPlan's key names where they mean
    the same; `base_lrs` is what a later phase starting from this one scales (`pretraining_lrs`)."""

    base_lrs: dict
    init_lr_frac: float
    weight_decay: float
    world_size: int
    device_batch_size: int  # rows (SFT) or sampled replies (RL) per forward/backward
    max_seq_len: int
    grad_accum_steps: int  # micro-batches per optimizer step and rank (RL: per problem; see chat_rl)
    num_iterations: int | None  # None: until `num_epochs` of the data are done (SFT)
    num_epochs: float
    examples: int  # training conversations (SFT) or problems (RL)
    val_examples: int | None = None

    @property
    def lrs(self) -> dict[str, float]:
        return {k: v * self.init_lr_frac for k, v in self.base_lrs.items()}

    @property
    def tokens_per_step(self) -> int:
        """Token slots per optimizer step (padding and prompt included)."""
        return self.device_batch_size * self.max_seq_len * self.grad_accum_steps * self.world_size

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        d.update(self.lrs, tokens_per_step=self.tokens_per_step)
        return d


def pretraining_lrs(*records: dict | None) -> dict[str, float]:
    """The learning rates of the pretraining run a checkpoint descends from, from its meta or run record
    (the first that has them): a fine-tuned one records them as sizing.base_lrs, a base one's sizing holds
    them; BASE_LRS where none does."""
    for rec in records:
        sizing = (rec or {}).get("sizing") or {}
        if isinstance(sizing.get("base_lrs"), dict):
            return {k: float(sizing["base_lrs"].get(k, v)) for k, v in BASE_LRS.items()}
        if all(k in sizing for k in BASE_LRS):
            return {k: float(sizing[k]) for k in BASE_LRS}
    return dict(BASE_LRS)


def plan_run(cfg, vocab_size: int, world_size: int = 1) -> RunPlan:
    """The RunPlan of a pretraining config (nanochat.config.TrainConfig or anything with its fields).

    Horizon precedence as the reference: --num-iterations > --target-flops > tokens:params ratio; the
    total batch is automatic (-1) from that horizon; weight decay automatic (-1) from batch and horizon.
    ValueError (with the flag to change) for shapes that do not fit.
    """
    config = model_config(cfg.depth, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                          max_seq_len=cfg.max_seq_len, vocab_size=vocab_size, n_kv_head=cfg.n_kv_head,
                          window_pattern=cfg.window_pattern, value_embeds=cfg.value_embeds,
                          resid_scalars=cfg.resid_scalars)
    params = count_params(config)
    fpt = flops_per_token(config)
    ratio = cfg.target_param_data_ratio if cfg.target_param_data_ratio > 0 else COMPUTE_OPTIMAL_RATIO
    ref_tokens = reference_tokens(config, ratio)
    if cfg.total_batch_size > 0:
        total_batch_size = cfg.total_batch_size
    else:
        horizon_tokens = cfg.target_flops / fpt if cfg.target_flops > 0 else ratio * params["scaling"]
        total_batch_size = auto_total_batch_size(horizon_tokens, ref_tokens)
    accum = grad_accum_steps(total_batch_size, cfg.device_batch_size, cfg.max_seq_len, world_size)
    steps, source = resolve_horizon(total_batch_size, params["scaling"], fpt, cfg.num_iterations,
                                    cfg.target_flops, ratio)
    lrs = learning_rates(total_batch_size, config.n_embd, matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr,
                         unembedding_lr=cfg.unembedding_lr, scalar_lr=cfg.scalar_lr)
    wd = cfg.weight_decay if cfg.weight_decay >= 0 else weight_decay(
        total_batch_size, steps * total_batch_size, ref_tokens, matrix_lr=cfg.matrix_lr)
    return RunPlan(model_config=config, num_params=params["total"], scaling_params=params["scaling"],
                   embedding_params=params["embedding"], scalar_params=params["scalar"], flops_per_token=fpt,
                   tokens_per_step=total_batch_size, num_iterations=steps, horizon_source=source,
                   target_param_data_ratio=cfg.target_param_data_ratio, **lrs, weight_decay=wd,
                   warmup_steps=cfg.warmup_steps, warmdown_ratio=cfg.warmdown_ratio,
                   final_lr_frac=cfg.final_lr_frac, world_size=world_size,
                   device_batch_size=cfg.device_batch_size, max_seq_len=cfg.max_seq_len, grad_accum_steps=accum)
