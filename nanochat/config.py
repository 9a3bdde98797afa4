"""Typed run configurations: what a command line asks for, as dataclasses the library reads.

Scripts parse flags and build one of these; nothing in `nanochat/` sees an argparse Namespace. Field
names equal the flags' destinations (`--device-batch-size` -> `device_batch_size`), so `run.json`
records a config as `asdict(config)` and a config can be rebuilt from it.

`RunConfig` holds what every training phase shares (run folder, runtime, checkpointing); a phase adds
its own fields in a subclass: `TrainConfig` for pretraining here, the chat phases in their modules.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from nanochat.sizing import BASE_LRS, COMPUTE_OPTIMAL_RATIO

# `--eval-tokens -1` on CUDA: the reference's 10 x 2^19 validation tokens
GPU_EVAL_TOKENS = 10 * 2 ** 19


class ConfigError(ValueError):
    """Inconsistent flags: reported as a one-line error (exit code 2) before any work starts."""


@dataclass
class RunConfig:
    model_tag: str | None = None  # run folder name under <base>/<phase>_checkpoints/ (default: per phase)
    device_type: str | None = None  # cuda | mps | cpu (None: autodetect)
    dtype: str | None = None  # auto | float32 | bfloat16 | float16 (None: auto, nanochat.common.resolve_dtype)
    seed: int = 42
    compile: bool | None = None  # torch.compile the model (None: on for CUDA)
    threads: str = "auto"  # CPU intra-op threads: auto (follow the machine's load) or a number (cpu_threads.py)
    run: str = "dummy"  # wandb run name ("dummy": no wandb)
    save_every: int = -1  # checkpoint every N steps (-1: only at the end)
    keep_last: int = -1  # keep the newest N checkpoints (-1: all)
    resume_from_step: int | str | None = None  # a step, "latest", "auto" (latest if any, else fresh), None

    @classmethod
    def from_dict(cls, d: dict):
        """A config from a dict such as vars(argparse.Namespace) or run.json's "config"; unknown keys are
        ignored (a newer run.json read by older code), missing ones take their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.save_every == 0 or self.save_every < -1:
            raise ConfigError(f"--save-every must be a number of steps >= 1, or -1 (only at the end); got "
                              f"{self.save_every}")
        if self.keep_last == 0 or self.keep_last < -1:
            raise ConfigError(f"--keep-last must be >= 1, or -1 (keep all); got {self.keep_last}")
        threads = str(self.threads).strip().lower()
        if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
            raise ConfigError(f"--threads must be 'auto' or a number >= 1; got {self.threads!r}")


@dataclass
class TrainConfig(RunConfig):
    """Pretraining (scripts/base_train.py). -1 means "automatic" wherever a comment says so."""

    # model
    depth: int = 20
    aspect_ratio: int = 64
    head_dim: int = 128
    max_seq_len: int = 2048
    n_kv_head: int | None = None
    # None: the record recipe (SSSL, value embeddings, residual scalars) on CUDA with a windowed attention
    # kernel, else "L" / off / off (with_device_defaults fills them in)
    window_pattern: str | None = None
    value_embeds: bool | None = None
    resid_scalars: bool | None = None
    attention: str = "auto"  # auto | fa3 | fa4 | flex | sdpa (nanochat/attention.py)
    fp8: bool = False  # block Linears in fp8 through torch._scaled_mm (nanochat/fp8.py)
    # batch and horizon
    device_batch_size: int | str = 32  # or "auto": the largest that fits (nanochat/autobatch.py)
    total_batch_size: int = -1  # -1: from the horizon
    target_param_data_ratio: float = COMPUTE_OPTIMAL_RATIO
    target_flops: float = -1.0  # -1: off
    num_iterations: int = -1  # -1: from FLOPs or the ratio
    # optimizer
    matrix_lr: float = BASE_LRS["matrix_lr"]  # all four at the anchor batch and width (sizing.learning_rates)
    embedding_lr: float = BASE_LRS["embedding_lr"]
    unembedding_lr: float = BASE_LRS["unembedding_lr"]
    scalar_lr: float = BASE_LRS["scalar_lr"]
    weight_decay: float = -1.0  # -1: from batch and horizon
    warmup_steps: int = 40
    warmdown_ratio: float = 0.65
    final_lr_frac: float = 0.05
    # evaluation
    eval_every: int = 250  # -1: only at the end, 0: never
    eval_tokens: int = -1  # -1: 10 x 2^19 on CUDA, scaled to the run elsewhere (see eval_tokens_for)
    core_metric_every: int = 2000
    core_metric_max_per_task: int = 500
    sample_every: int = 2000
    # runtime and data
    fused_loss: str = "auto"  # auto | on | off
    final_checkpoint: bool = True  # save at the last step (benchmarks turn it off: a multi-GB write at depth 20)
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: the gradient reductions across ranks
    compile_scope: str = "model"  # model | blocks (GPT.compile_blocks: reductions overlap backward)
    overlap_reductions: bool = True  # start them from backward's gradient hooks (nanochat/optim.py)
    data_dir: str | None = None
    keep_remainder: int = 0
    data_streams: int = 0  # logical data streams L (0: automatic, nanochat.dataloader.default_streams)
    synthetic_data: bool = False
    vocab_size: int = 32768  # only with synthetic_data (else the tokenizer's)

    def validate(self) -> None:
        super().validate()
        if self.device_batch_size != "auto" and not isinstance(self.device_batch_size, int):
            raise ConfigError(f"--device-batch-size must be a number of sequences or 'auto', got {self.device_batch_size!r}")
        for name in ("depth", "device_batch_size", "max_seq_len", "aspect_ratio", "head_dim"):
            if getattr(self, name) == "auto":
                continue
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # 0 used to fall through to "automatic" and start a run of hours: only -1 means automatic
        for name in ("num_iterations", "total_batch_size"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, or -1 for automatic; got {value}")
        if self.eval_tokens == 0 or self.eval_tokens < -1:
            raise ConfigError(f"--eval-tokens must be >= 1, or -1 for automatic; got {self.eval_tokens}")
        if self.keep_remainder < 0:
            raise ConfigError(f"--keep-remainder must be >= 0 (0: discard cropped tails), got {self.keep_remainder}")
        if self.data_streams < 0:
            raise ConfigError(f"--data-streams must be >= 1, or 0 for automatic; got {self.data_streams}")
        if self.compile_scope not in ("model", "blocks"):
            raise ConfigError(f"--compile-scope must be model or blocks; got {self.compile_scope!r}")
        if self.grad_reduce_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"--grad-reduce-dtype must be fp32 or bf16; got {self.grad_reduce_dtype!r}")
        if self.fused_loss not in ("auto", "on", "off"):
            raise ConfigError(f"--fused-loss must be auto, on or off; got {self.fused_loss!r}")
        if not 0 <= self.warmdown_ratio <= 1:
            raise ConfigError(f"--warmdown-ratio must be in [0, 1], got {self.warmdown_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        for name in ("eval_every", "core_metric_every", "sample_every"):
            if getattr(self, name) < -1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0 or -1, got {getattr(self, name)}")

    def with_device_defaults(self, record_recipe: bool) -> "TrainConfig":
        """This config with the architecture left open (None) filled in: the record recipe (SSSL windows,
        value embeddings, residual scalars) when `record_recipe` (CUDA with a windowed kernel, see
        nanochat.attention.windowed_kernel_available), else full attention without extras (the CPU default)."""
        defaults = ("SSSL", True, True) if record_recipe else ("L", False, False)
        names = ("window_pattern", "value_embeds", "resid_scalars")
        return replace(self, **{n: d for n, d in zip(names, defaults) if getattr(self, n) is None})

    @property
    def tag(self) -> str:
        return self.model_tag or f"d{self.depth}"

    def eval_tokens_for(self, device_type: str, total_tokens: int, tokens_per_batch: int) -> int:
        """Validation tokens per evaluation. Automatic: the reference's 10 x 2^19 on CUDA; elsewhere a tenth
        of the run's training tokens within [one batch, 10 x 2^19] (a 100-step CPU run at 2,048 tokens per
        step used to train for minutes and then evaluate 5.2M tokens for far longer)."""
        if self.eval_tokens > 0:
            return self.eval_tokens
        if device_type == "cuda":
            return GPU_EVAL_TOKENS
        return max(tokens_per_batch, min(GPU_EVAL_TOKENS, total_tokens // 10))
