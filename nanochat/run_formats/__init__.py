"""Training runs as the run doctor reads them, whatever program wrote them.

Each format is a parser that returns a `Run` and declares, in `Run.knows`, what its format records:
which parameter count the model is judged by, whether the logged loss is smoothed (and how), whether
the LR schedule and the planned steps are known, tokens per step, which peak a logged MFU divides by,
the training phase. The doctor's checks read those declarations; none compares a format's name.

Formats (tried in this order by `detect`; the first whose `looks_like` says yes parses the file):
  nanochat run folder         run.json + metrics.jsonl (nanochat.run_dir)
  hf-trainer                  a Hugging Face Trainer output or checkpoint folder (trainer_state.json,
                              config.json), or the trainer_state.json itself
  tensorboard                 a folder of TensorBoard event files, or one events.out.tfevents.* file
  wandb                       a wandb run-history export (.csv, .jsonl)
  nanochat console log        this project's base_train output saved to a file
  karpathy-nanochat           karpathy/nanochat scripts/base_train.py output
  llm.c                       karpathy/llm.c train_gpt2.cu output
  modded-nanogpt              KellerJordan/modded-nanogpt train_gpt.py output (or its logs/*.txt)
  nanogpt                     karpathy/nanoGPT train.py output (+ its config .py, read with ast)

Metric records (one dict per logged step) use these keys: step (optimizer steps done when the line
was logged), tokens, raw_loss (the training loss of that step), loss (the logged loss as the program
smoothed it), val_loss (nats/token), val_bpb, eval_train_loss (eval-mode loss on the training split),
lr (multiplier of the peak), mfu (fraction of `knows.mfu_peak_flops`), dt (s), tok_per_sec, core.
What a format does not carry is listed in `skipped`, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


class RunFormatError(ValueError):
    """The path is not a run any parser reads (the message says what was looked for)."""


@dataclass(frozen=True)
class Smoothing:
    """How a program smooths the loss it prints. "ema": x_t = beta x_{t-1} + (1 - beta) loss_t, divided
    by (1 - beta^(t+1)) when `debiased` (Adam's bias correction); "window": the mean of the last
    `window` steps (Hugging Face Trainer: the mean since the previous log line)."""
    kind: str  # "ema" | "window"
    beta: float = 0.0
    window: int = 1
    debiased: bool = True

    def lag(self, steps_done: np.ndarray) -> np.ndarray:
        """Mean age, in steps, of the losses the value logged after `steps_done` steps averages over."""
        t = np.maximum(np.asarray(steps_done, dtype=float), 1.0)
        if self.kind == "window":
            return np.minimum(t, self.window) / 2 - 0.5
        b = self.beta
        # weights (1 - b) b^k / (1 - b^t) on the loss k steps back, k = 0..t-1: their mean k in closed form
        return b * (1 - t * b ** (t - 1) + (t - 1) * b ** t) / ((1 - b) * (1 - b ** t))

    def describe(self) -> str:
        if self.kind == "window":
            return f"the mean of the last {self.window} steps' losses"
        return f"a{' debiased' if self.debiased else 'n'} exponential moving average (beta {self.beta:g}) of the step losses"


@dataclass
class Knows:
    """What a run's format records, for the checks to read instead of its name."""
    params: str = "total"  # the count the compute-optimal ratio is judged in: "scaling" (nanochat's
    # convention, matrices + LM head: its fitted ~10.5 tokens/param applies) or "total" (Chinchilla's ~20)
    printed_params: str | None = None  # what the program's own printed count covers; None: it prints none
    loss_smoothing: Smoothing | None = None  # how the logged `loss` is smoothed (None: it is the step loss)
    lr_schedule: Callable[[int], float] | None = None  # the planned LR multiplier of every step, when recorded
    planned_steps: bool = False  # sizing.num_iterations is what the run planned
    tokens_per_step: bool = False  # sizing.tokens_per_step (and metric `tokens`) are known
    eval_offset: int = 1  # the eval logged at step s scored the weights whose training loss is logged at s + offset
    mfu_peak_flops: float | None = None  # the peak a logged `mfu` divides by
    mfu_peak_note: str = ""  # how the program chose that peak
    phase: str = "base"  # base | sft | rl: thresholds and wording of the val/train check depend on it
    builds_model: bool = False  # info["model_config"] is a nanochat GPTConfig: the model can be built and counted


@dataclass
class Run:
    """One training run: its metric records, its metadata (`info`) and what its format knows."""
    path: Path
    format: str  # a description for the report ("nanoGPT train.py console log")
    metrics: list[dict]
    info: dict = field(default_factory=dict)
    knows: Knows = field(default_factory=Knows)
    problems: list[str] = field(default_factory=list)  # unreadable lines, missing files
    skipped: list[str] = field(default_factory=list)  # what the format does not record (checks skip on these)
    source: str = ""  # the parser that read it, for the JSON output (checks never read it)

    @property
    def args(self) -> dict:
        """The run's flags: run.json keeps them under "args" (base) or "config" (SFT, RL); either works."""
        a = self.info.get("args")
        c = self.info.get("config")
        return a if isinstance(a, dict) and a else (c if isinstance(c, dict) else {})

    @property
    def sizing(self) -> dict:
        return self.info.get("sizing") or {}

    @property
    def env(self) -> dict:
        return self.info.get("env") or {}

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """(x, value) over the metric records that carry a numeric `key` (and `x`)."""
        xs, vs = [], []
        for m in self.metrics:
            v, s = m.get(key), m.get(x)
            if isinstance(v, (int, float)) and isinstance(s, (int, float)) and not isinstance(v, bool):
                xs.append(float(s))
                vs.append(float(v))
        return np.array(xs), np.array(vs)

    def last(self, key: str):
        for m in reversed(self.metrics):
            if m.get(key) is not None:
                return m[key]
        return None


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    looks_like: Callable[[Path, str], bool]  # (path, the first ~2 MB of text or "" for folders)
    parse: Callable[..., Run]  # (path, config=None) -> Run


def _formats() -> list[Format]:
    from nanochat.run_formats import (hf_trainer, karpathy_nanochat, llmc, modded_nanogpt, nanochat_log, nanogpt,
                                      tensorboard, wandb)

    return [nanochat_log.RUN_FOLDER, hf_trainer.FORMAT, tensorboard.FORMAT, wandb.FORMAT, nanochat_log.CONSOLE,
            karpathy_nanochat.FORMAT, llmc.FORMAT, modded_nanogpt.FORMAT, nanogpt.FORMAT]


def _head(path: Path) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        return f.read(2_000_000).decode("utf-8", errors="replace")


def detect(path) -> Format:
    """The format of a run folder or log file; RunFormatError naming every format looked for."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such run folder or log file: {path}")
    head = _head(path)
    formats = _formats()
    for fmt in formats:
        if fmt.looks_like(path, head):
            return fmt
    what = "folder" if path.is_dir() else "file"
    raise RunFormatError(f"{path}: this {what} is none of the formats the doctor reads ("
                         + "; ".join(f.description for f in formats) + ")")


def parse(path, config=None) -> Run:
    """Read any supported run (see `detect`); `config` is the run's config .py (nanoGPT, wandb)."""
    fmt = detect(path)
    run = fmt.parse(Path(path), config)
    run.source = run.source or fmt.name
    return run
