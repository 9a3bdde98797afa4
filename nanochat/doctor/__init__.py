"""The run doctor's checks, by topic: size (param_count, tokens_ratio), speed (mfu), loss
(val_vs_train, spikes, loss_curve), schedule. Each check takes a `run_formats.Run` and returns a
`Finding`; nanochat/diagnose.py lists them in report order and ranks what they find.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Finding:
    check: str
    status: str  # ok | warn | info | skip
    summary: str
    numbers: dict = field(default_factory=dict)
    advice: str = ""
    severity: float = 0.0  # ranks warnings: the most consequential first


def num(x):
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def fmt(n: float) -> str:
    for unit, s in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= unit:
            return f"{n / unit:.3g}{s}"
    return f"{n:.3g}"
