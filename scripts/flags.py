"""Command-line helpers shared by the training scripts (the library never sees argparse)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def resume_step(value: str):
    """argparse type of --resume: a step number >= 0, 'latest' or 'auto'."""
    if value in ("latest", "auto"):
        return value
    try:
        step = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step number, 'latest' or 'auto', got {value!r}") from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"step must be >= 0, got {step}")
    return step


def config_parser(cls, description: str, help: dict | None = None) -> argparse.ArgumentParser:
    """A parser with one dashed flag per field of the config dataclass `cls` (`--resume` for
    resume_from_step); `cls.from_dict(vars(parser.parse_args()))` builds the config back."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        args = typing.get_args(kind)
        base = next((t for t in args if t is not type(None)), kind) if args else kind
        text = (help or {}).get(f.name, "") + f" (default: {f.default})"
        if f.name == "resume_from_step":
            parser.add_argument(flag, "--resume", dest=f.name, type=resume_step, default=f.default,
                                help="a checkpoint step of this run, 'latest', or 'auto' (latest if any, else fresh)")
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=base, default=f.default, help=text)
    return parser


def add_checkpoint_flags(parser: argparse.ArgumentParser, sources, default: str = "sft") -> None:
    """--source / --model-tag / --step: which checkpoint a chat front end loads."""
    parser.add_argument("--source", default=default, choices=sources,
                        help=f"which training phase's checkpoint (default {default})")
    parser.add_argument("--model-tag", default=None, help="run folder under the phase (default: the latest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
