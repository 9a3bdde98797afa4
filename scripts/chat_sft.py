"""Supervised fine-tuning of a base checkpoint on chat conversations (see nanochat/chat_sft.py).

    python -m scripts.chat_sft --source-tag d20                       # reference mix from the hub
    python -m scripts.chat_sft --mix embedded --device-batch-size 8   # offline embedded mix (CPU)
    torchrun --nproc_per_node=8 -m scripts.chat_sft --source-tag d20
    python -m scripts.chat_sft --mix embedded --resume latest          # continue an interrupted run
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/chat_sft.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.chat_sft import SFTConfig, run_sft  # noqa: E402
from scripts.flags import config_parser  # noqa: E402

HELP = {
    "source": "phase of the starting checkpoint (base or sft)",
    "source_tag": "source model tag (default: its most recent)",
    "source_step": "source checkpoint step (default: its last)",
    "model_tag": "output folder under chatsft_checkpoints/ (default: the source tag)",
    "mix": "training mix: name[*k],... of smoltalk, mmlu-aux, gsm8k, arc-easy, arc-challenge, embedded",
    "task_data": "folder of local task tables DIR/<task>/<split>.jsonl|parquet (or NANOCHAT_TASK_DATA)",
    "max_seq_len": "row length (-1: the model's context)",
    "num_iterations": "fixed number of steps (-1: --num-epochs of the mix)",
    "overflow": "conversations longer than a row: crop or skip (both counted)",
    "eval_every": "masked val loss every N steps (-1: last step only, 0: never)",
    "chatcore_every": "ChatCORE every N steps (-1: last step only, 0: never)",
}


def main(argv: list[str] | None = None) -> int:
    args = config_parser(SFTConfig, "Chat supervised fine-tuning", HELP).parse_args(argv)
    return run_sft(SFTConfig.from_dict(vars(args)))


if __name__ == "__main__":
    sys.exit(main())
