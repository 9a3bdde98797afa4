"""Chat task data: conversations to fine-tune on and problems to evaluate (see base.py for the interface).

Mixtures by name (`--mix`): a comma-separated list of `name[*k]` (k-fold oversampling), e.g. the
reference SFT mix `smoltalk,mmlu-aux*3,gsm8k*4`, or `embedded` (offline). Each name maps to a
training split and a validation split (`build_mix(spec, "train" | "val")`).
"""

from __future__ import annotations

from nanochat.tasks.base import LETTERS, CategoricalTask, Task, TaskMixture, TaskSequence, render_multiple_choice
from nanochat.tasks.embedded import EmbeddedChat
from nanochat.tasks.hub import TaskDataError, load_rows
from nanochat.tasks.hub_tasks import ARC, GSM8K, MMLU, HumanEval, SmolTalk

REFERENCE_MIX = "smoltalk,mmlu-aux*3,gsm8k*4"
EMBEDDED_MIX = "embedded"

# mix name -> (train task, val task) factories (task_data: the local override folder or None)
MIX_TASKS = {
    "smoltalk": (lambda d: SmolTalk("train", d), lambda d: SmolTalk("test", d)),
    "mmlu-aux": (lambda d: MMLU("auxiliary_train", "train", d), lambda d: MMLU("all", "validation", d)),
    "gsm8k": (lambda d: GSM8K("main", "train", d), lambda d: GSM8K("main", "test", d)),
    "arc-easy": (lambda d: ARC("ARC-Easy", "train", d), lambda d: ARC("ARC-Easy", "validation", d)),
    "arc-challenge": (lambda d: ARC("ARC-Challenge", "train", d), lambda d: ARC("ARC-Challenge", "validation", d)),
    "embedded": (lambda d: EmbeddedChat("train"), lambda d: EmbeddedChat("val")),
}

# ChatCORE's five tasks (evaluation splits) and their chance accuracy
EVAL_TASKS = {
    "ARC-Easy": lambda d: ARC("ARC-Easy", "test", d),
    "ARC-Challenge": lambda d: ARC("ARC-Challenge", "test", d),
    "MMLU": lambda d: MMLU("all", "test", d),
    "GSM8K": lambda d: GSM8K("main", "test", d),
    "HumanEval": lambda d: HumanEval("test", d),
    "EmbeddedChat": lambda d: EmbeddedChat("val"),
}


def parse_mix(spec: str) -> list[tuple[str, int]]:
    out = []
    for item in spec.split(","):
        name, _, times = item.strip().partition("*")
        if name not in MIX_TASKS:
            raise ValueError(f"unknown task {name!r} in mix {spec!r}; known: {', '.join(MIX_TASKS)}")
        try:
            k = int(times) if times else 1
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"bad repeat count in {item!r}: write name*k with k >= 1")
        out.append((name, k))
    return out


def build_mix(spec: str, split: str = "train", task_data=None, seed: int = 1337) -> Task:
    """The mixture of `spec` for "train" (oversampled, shuffled) or "val" (each task once, shuffled)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tasks, cache = [], {}
    for name, k in parse_mix(spec):
        if name not in cache:
            cache[name] = MIX_TASKS[name][0 if split == "train" else 1](task_data)
        tasks.extend([cache[name]] * (k if split == "train" else 1))
    if split == "val":  # a task listed twice is validated once
        tasks = list({id(t): t for t in tasks}.values())
    return TaskMixture(tasks, seed=seed)


__all__ = ["ARC", "EMBEDDED_MIX", "EVAL_TASKS", "GSM8K", "LETTERS", "MIX_TASKS", "MMLU", "REFERENCE_MIX",
           "CategoricalTask", "EmbeddedChat", "HumanEval", "SmolTalk", "Task", "TaskDataError", "TaskMixture",
           "TaskSequence", "build_mix", "load_rows", "parse_mix", "render_multiple_choice"]
