"""Numbers and size claims in free text (log lines, config comments, run names)."""

from __future__ import annotations

import re

NUM = r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?"  # 1,234.5e-3
SIZE_RE = re.compile(r"(?<![a-z0-9.])~?\s?(\d+(?:\.\d+)?)\s?([kmb])(?![a-z])", re.IGNORECASE)
# the parameter counts the names of published GPT-2 checkpoints stand for
GPT2_SIZES = {"gpt2": 124e6, "gpt2-medium": 350e6, "gpt2-large": 774e6, "gpt2-xl": 1558e6}


def num(s: str) -> float:
    return float(s.replace(",", ""))


def size_value(text: str) -> float | None:
    """The first parameter size written in `text` ("gpt-124m" -> 124e6), or None."""
    m = SIZE_RE.search(text)
    return float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()] if m else None


def size_claims(text: str, where: str) -> list[dict]:
    """Parameter sizes written in free text ("~125M", "1.3B params", "gpt2-medium")."""
    out = []
    for m in SIZE_RE.finditer(text):
        v = float(m.group(1)) * {"k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
        if v >= 1e5:  # "8k context", "4k vocab" are not model sizes
            out.append(dict(value=v, text=m.group(0).strip(), where=where))
    for name in sorted(GPT2_SIZES, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE) and not out:
            out.append(dict(value=GPT2_SIZES[name], text=name, where=where))
            break
    return out
