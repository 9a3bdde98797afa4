"""Reinforcement learning on GSM8K (or the embedded mix) from an SFT checkpoint (see nanochat/chat_rl.py).

    python -m scripts.chat_rl --source-tag d20                       # GSM8K, the reference recipe
    torchrun --nproc_per_node=8 -m scripts.chat_rl --source-tag d20
    python -m scripts.chat_rl --task embedded --eval-task EmbeddedChat --max-new-tokens 64   # offline
    python -m scripts.chat_rl --resume latest                        # continue (optimizer state included)
Output: <base>/chatrl_checkpoints/<tag>/ (run.json, metrics.jsonl with reward and pass@k, checkpoints).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/chat_rl.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.chat_rl import RLConfig, run_rl  # noqa: E402
from scripts.flags import config_parser  # noqa: E402

HELP = {
    "source": "phase of the starting checkpoint (sft, base or rl)",
    "source_tag": "source model tag (default: its most recent)",
    "model_tag": "output folder under chatrl_checkpoints/ (default: the source tag)",
    "task": "training problems: gsm8k or embedded",
    "eval_task": "pass@k evaluation task: GSM8K, EmbeddedChat, ...",
    "examples_per_step": "problems per optimizer step over all ranks",
    "num_samples": "replies per problem (any number: the last device batch may be smaller)",
    "device_batch_size": "replies per forward/backward",
    "eval_every": "pass@k every N steps (-1: last step only, 0: never)",
}


def main(argv: list[str] | None = None) -> int:
    args = config_parser(RLConfig, "Chat RL (GSM8K policy gradient)", HELP).parse_args(argv)
    return run_rl(RLConfig.from_dict(vars(args)))


if __name__ == "__main__":
    sys.exit(main())
