"""The hub tasks of the chat pipeline: SmolTalk, MMLU, ARC-Easy/Challenge, GSM8K, HumanEval.

Rows come from `nanochat.tasks.hub.load_rows` (local override or the hub); each class turns a row
into a conversation and scores completions. GSM8K's `<<expr=result>>` annotations become calculator
tool calls (a "python" part with the expression, a "python_output" part with the result); its score
is the number after `####`. HumanEval completions run in the sandbox (nanochat/execution.py).
"""

from __future__ import annotations

import re

from nanochat.tasks.base import CategoricalTask, Task, multiple_choice_conversation
from nanochat.tasks.hub import TaskDataError, load_rows


class HubTask(Task):
    key = ""

    def __init__(self, split: str, task_data=None, **kw):
        super().__init__(**kw)
        self.split = split
        self.rows = load_rows(self.key, split, task_data)

    def num_examples(self) -> int:
        return len(self.rows)

    def _row(self, index: int, *columns: str) -> dict:
        row = self.rows[index]
        missing = [c for c in columns if c not in row]
        if missing:
            raise TaskDataError(f"{self.name} row {index} lacks column(s) {missing} (has {sorted(row)}): a local "
                                f"table must have the hub's columns")
        return row


class SmolTalk(HubTask):
    """General conversations (HuggingFaceTB/smol-smoltalk), for training."""
    key, name = "smoltalk", "SmolTalk"

    def get_example(self, index: int) -> dict:
        return {"messages": self._row(index, "messages")["messages"]}


class MMLU(CategoricalTask, HubTask):
    """cais/mmlu: `subset="all"` (splits test / validation / dev) or `"auxiliary_train"` (split train)."""
    name = "MMLU"

    def __init__(self, subset: str = "all", split: str = "test", task_data=None, **kw):
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', got {subset!r}")
        self.key = "mmlu" if subset == "all" else "mmlu-aux"
        super().__init__(split, task_data, **kw)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        if isinstance(row.get("train"), dict):  # the auxiliary_train config nests each row under "train"
            row = row["train"]
        for c in ("question", "choices", "answer"):
            if c not in row:
                raise TaskDataError(f"MMLU row {index} lacks column {c!r}: a local table needs question, "
                                    f"choices, answer (and subject)")
        return multiple_choice_conversation(row["question"], list(row["choices"]), int(row["answer"]),
                                            subject=row.get("subject", ""))


class ARC(CategoricalTask, HubTask):
    """allenai/ai2_arc, `subset` "ARC-Easy" or "ARC-Challenge"."""

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", task_data=None, **kw):
        keys = {"ARC-Easy": "arc-easy", "ARC-Challenge": "arc-challenge"}
        if subset not in keys:
            raise ValueError(f"ARC subset must be one of {list(keys)}, got {subset!r}")
        self.key, self.name = keys[subset], subset
        super().__init__(split, task_data, **kw)

    def get_example(self, index: int) -> dict:
        row = self._row(index, "question", "choices", "answerKey")
        labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
        if row["answerKey"] not in labels:
            raise TaskDataError(f"{self.name} row {index}: answerKey {row['answerKey']!r} not among labels {labels}")
        return multiple_choice_conversation(row["question"], texts, labels.index(row["answerKey"]))


GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def gsm8k_answer(text: str) -> str | None:
    """The number after `####` (commas removed), or None."""
    m = GSM8K_ANSWER.search(text)
    return m.group(1).strip().replace(",", "") if m else None


def gsm8k_parts(answer: str) -> list[dict]:
    """Assistant parts of a GSM8K solution: text, and a python call + output per `<<expr=result>>`."""
    parts = []
    for piece in re.split(r"(<<[^>]+>>)", answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            expr, _, result = piece[2:-2].rpartition("=")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(HubTask):
    key, name = "gsm8k", "GSM8K"

    def __init__(self, subset: str = "main", split: str = "test", task_data=None, **kw):
        if subset != "main":
            raise ValueError(f"GSM8K subset must be 'main' (the one with calculator annotations), got {subset!r}")
        super().__init__(split, task_data, **kw)

    def get_example(self, index: int) -> dict:
        row = self._row(index, "question", "answer")
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": gsm8k_parts(row["answer"])}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        last = conversation["messages"][-1]["content"]
        ref_text = last if isinstance(last, str) else "".join(p["text"] for p in last if p["type"] == "text")
        ref = gsm8k_answer(ref_text)
        got = gsm8k_answer(completion)
        return ref is not None and got is not None and got == ref


def extract_program(completion: str) -> str:
    """The code of a completion: the first ```python fenced block if there is one, else all of it."""
    m = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, re.DOTALL)
    return m.group(1) if m else completion


def extract_imports(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))


class HumanEval(HubTask):
    key, name = "humaneval", "HumanEval"

    def __init__(self, split: str = "test", task_data=None, timeout: float = 5.0, **kw):
        super().__init__(split, task_data, **kw)
        self.timeout = timeout

    def get_example(self, index: int) -> dict:
        row = self._row(index, "task_id", "prompt", "canonical_solution", "test", "entry_point")
        return {"messages": [{"role": "user", "content": row["prompt"]},
                             {"role": "assistant", "content": row["prompt"] + row["canonical_solution"]}],
                "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}

    def program(self, conversation: dict, completion: str) -> str:
        prompt = conversation["messages"][0]["content"]
        return "\n\n".join([extract_imports(prompt), extract_program(completion), conversation["test"],
                            f"check({conversation['entry_point']})\n"])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        from nanochat.execution import execute_code

        return execute_code(self.program(conversation, completion), timeout=self.timeout).success
