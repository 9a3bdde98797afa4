"""The Task interface, mixtures and sequences.

A task is an indexable list of conversations (`{"messages": [...]}` as the tokenizer's
`render_conversation` takes them) plus a way to score a model's reply:

- `eval_type == "categorical"`: the last assistant message is one letter of `conversation["letters"]`;
  evaluation compares the letter the model rates highest at the answer position (nanochat/chat_eval.py).
- `eval_type == "generative"`: the model samples a reply; `evaluate(conversation, completion)` says
  whether it is right and `reward(conversation, completion)` is the RL reward (1.0 / 0.0 by default).

`Task(start, stop, step)` is a slice of the underlying examples, so `GSM8K(split="test", stop=100)`
is the first 100 problems. Slicing an instance (`task[10:20]`) returns a view of the same kind.
"""

from __future__ import annotations

import random

LETTERS = "ABCDEFGHIJ"


class Task:
    eval_type = "generative"
    name = "task"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < 0) or step < 1:
            raise ValueError(f"task slice must have start >= 0, stop >= 0 and step >= 1, got {start}:{stop}:{step}")
        self.start, self.stop, self.step = start, stop, step

    # --- what a subclass provides --------------------------------------------------------------

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    # --- slicing and indexing ------------------------------------------------------------------

    def _range(self) -> range:
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return range(min(self.start, stop), stop, self.step)

    def __len__(self) -> int:
        return len(self._range())

    def __getitem__(self, index):
        if isinstance(index, slice):
            import copy

            view = copy.copy(self)
            r = self._range()[index]
            view.start, view.stop, view.step = r.start, r.stop, r.step
            if view.step < 1:
                raise ValueError("tasks cannot be sliced backwards")
            return view
        r = self._range()
        if not -len(r) <= index < len(r):
            raise IndexError(f"{self.name}: index {index} out of range for {len(r)} examples")
        return self.get_example(r[index])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"{self.name}[{len(self)} examples]"


class TaskMixture(Task):
    """Several tasks interleaved in one fixed-seed shuffle. A task listed twice is seen twice per
    epoch (oversampling); the shuffle is a permutation of all (task, example) pairs, so one pass
    over the mixture is exactly one pass over each listed task."""

    def __init__(self, tasks: list[Task], seed: int = 1337, **kw):
        super().__init__(**kw)
        if not tasks:
            raise ValueError("a mixture needs at least one task")
        empty = [repr(t) for t in tasks if len(t) == 0]
        if empty:
            raise ValueError(f"empty task(s) in the mixture: {', '.join(empty)}")
        self.tasks = tasks
        self.index = [(ti, ei) for ti, t in enumerate(tasks) for ei in range(len(t))]
        random.Random(seed).shuffle(self.index)
        self.name = "+".join(t.name for t in tasks)

    def num_examples(self) -> int:
        return len(self.index)

    def get_example(self, index: int) -> dict:
        ti, ei = self.index[index]
        return self.tasks[ti][ei]


class TaskSequence(Task):
    """Tasks one after another (curricula; no shuffle)."""

    def __init__(self, tasks: list[Task], **kw):
        super().__init__(**kw)
        self.tasks = tasks
        self.offsets = [0]
        for t in tasks:
            self.offsets.append(self.offsets[-1] + len(t))
        self.name = ">".join(t.name for t in tasks)

    def num_examples(self) -> int:
        return self.offsets[-1]

    def get_example(self, index: int) -> dict:
        import bisect

        ti = bisect.bisect_right(self.offsets, index) - 1
        return self.tasks[ti][index - self.offsets[ti]]


def render_multiple_choice(question: str, choices: list[str], letters: str = LETTERS) -> str:
    """The user message of a multiple-choice question. Choices read `- choice=A`: the letter follows
    `=` with no space, so it is the same token as the answer the assistant gives (" A" and "A" are
    different tokens)."""
    lines = [f"Multiple Choice question: {question}"]
    lines += [f"- {choice}={letter}" for letter, choice in zip(letters, choices)]
    lines.append("\nRespond only with the letter of the correct answer.")
    return "\n".join(lines)


def multiple_choice_conversation(question: str, choices: list[str], answer: int, **extra) -> dict:
    letters = LETTERS[:len(choices)]
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
    return {"messages": [{"role": "user", "content": render_multiple_choice(question, choices, letters)},
                         {"role": "assistant", "content": letters[answer]}],
            "letters": list(letters), **extra}


class CategoricalTask(Task):
    eval_type = "categorical"

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
