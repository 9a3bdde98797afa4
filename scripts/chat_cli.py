"""Talk to a trained model in the terminal.

    python -m scripts.chat_cli                         # the latest SFT model, interactive
    python -m scripts.chat_cli --source base -p "The capital of France is"
    python -m scripts.chat_cli --source sft --model-tag d12 --step 700 -t 0.8 -k 50

Interactive: type a message and press Enter; `clear` starts a new conversation, `quit` (or Ctrl-D)
exits, Ctrl-C during a reply stops it. Replies stream as they are generated, whole characters only
(an emoji split across tokens is printed once complete). When the conversation outgrows the model's
context the oldest turns are dropped (a note says how many). Calculator calls print as <<expr=result>>.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # `python scripts/chat_cli.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.chat_session import SOURCES, ChatError, ReplyStream, fit_prompt, load_chat_model  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from scripts.flags import add_checkpoint_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat with a trained nanochat model in the terminal")
    add_checkpoint_flags(p, SOURCES)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message, print the reply and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature, 0 = greedy (0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens, 0 = all (50)")
    p.add_argument("--max-tokens", type=int, default=512, help="longest reply in tokens (512)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (then +1 per reply)")
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if not 0.0 <= args.temperature <= 2.0:
        p.error(f"-t/--temperature {args.temperature} must be between 0 and 2")
    if args.top_k < 0:
        p.error(f"-k/--top-k {args.top_k} must be >= 0 (0 = no top-k)")
    if args.max_tokens < 1:
        p.error(f"--max-tokens {args.max_tokens} must be >= 1")
    return args


def reply(engine: Engine, tokenizer, messages: list[dict], args, seed: int, out=None) -> str:
    """Stream one assistant reply to `out` (stdout); return its text (tool calls as <<expr=result>>)."""
    out = out if out is not None else sys.stdout
    context = engine.model.config.sequence_len
    fitted = fit_prompt(tokenizer, messages, context, reserve=args.max_tokens)
    if fitted.dropped_messages or fitted.cropped:
        what = f"dropped the {fitted.dropped_messages} oldest messages" if fitted.dropped_messages else ""
        if fitted.cropped:
            what += (" and " if what else "") + "kept only the end of the last message"
        print(f"(note: {what} to fit the model's context of {context} tokens)", file=sys.stderr, flush=True)
    stream = ReplyStream(tokenizer)
    text = []
    try:
        for ids, masks in engine.generate(fitted.tokens, max_tokens=args.max_tokens, temperature=args.temperature,
                                          top_k=args.top_k or None, seed=seed):
            for _, piece in stream.feed(ids[0], masks[0]):
                text.append(piece)
                out.write(piece)
                out.flush()
    except KeyboardInterrupt:
        out.write(" [stopped]")
    for _, piece in stream.close():
        text.append(piece)
        out.write(piece)
    out.write("\n")
    out.flush()
    return "".join(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a non-UTF-8 terminal gets '?' instead of a crash
    try:
        device = torch.device(autodetect_device_type(args.device_type))
        model, tokenizer, _, name = load_chat_model(args.source, device, args.model_tag, args.step)
    except (ChatError, ValueError, RuntimeError) as e:
        print(f"chat_cli: {e}", file=sys.stderr)
        return 2
    engine = Engine(model, tokenizer)
    seed = args.seed
    if args.prompt is not None:
        reply(engine, tokenizer, [{"role": "user", "content": args.prompt}], args, seed)
        return 0
    print(f"{name} on {device} (context {model.config.sequence_len} tokens). "
          f"Type a message; 'clear' starts over, 'quit' exits.", flush=True)
    messages: list[dict] = []
    while True:
        try:
            line = input("\nUser: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip().lower()
        if cmd in ("quit", "exit"):
            return 0
        if cmd == "clear":
            messages = []
            print("(new conversation)", flush=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        print("Assistant: ", end="", flush=True)
        messages.append({"role": "assistant", "content": reply(engine, tokenizer, messages, args, seed)})
        seed += 1


if __name__ == "__main__":
    sys.exit(main())
