"""Evaluate a chat model: ARC-Easy/Challenge and MMLU (categorical), GSM8K and HumanEval (generative),
ChatCORE over the tasks that ran; JSON + markdown beside the checkpoint.

    python -m scripts.chat_eval --source sft                          # the five ChatCORE tasks
    python -m scripts.chat_eval --source sft -a EmbeddedChat          # the offline embedded mix
    python -m scripts.chat_eval --source sft -a GSM8K -n 8 -t 0.7      # pass@1..8
    torchrun --nproc_per_node=8 -m scripts.chat_eval --source sft
Output: <base>/<phase>_checkpoints/<tag>/chat_eval_<step>.json and .md (or --output PATH.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/chat_eval.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import checkpoint_manager as ckpt  # noqa: E402
from nanochat import run_dir as rd  # noqa: E402
from nanochat.chat_eval import run_chat_eval, to_markdown  # noqa: E402
from nanochat.common import init_runtime  # noqa: E402
from nanochat.tasks import EVAL_TASKS  # noqa: E402
from nanochat.training import EXIT_CONFIG, EXIT_OK  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Chat evaluation and ChatCORE", allow_abbrev=False)
    p.add_argument("--source", default="sft", choices=["base", "sft", "rl"], help="checkpoint phase")
    p.add_argument("--model-tag", default=None, help="default: the phase's most recent")
    p.add_argument("--step", type=int, default=None, help="default: the last")
    p.add_argument("-a", "--tasks", default=None,
                   help=f"comma-separated, of {', '.join(EVAL_TASKS)} (default: the five ChatCORE tasks)")
    p.add_argument("-x", "--max-problems", type=int, default=-1, help="per task (-1: all)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="prompts per forward (categorical tasks)")
    p.add_argument("--decode-batch", type=int, default=32,
                   help="replies decoded together (generative tasks; fewer if their KV cache would pass 2 GiB on CPU)")
    p.add_argument("-n", "--num-samples", type=int, default=1, help="samples per generative problem (pass@1..n)")
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=None, help="default: per task (512 GSM8K/HumanEval)")
    p.add_argument("--task-data", default=None, help="local task tables DIR/<task>/<split>.jsonl|parquet "
                                                     "(or NANOCHAT_TASK_DATA)")
    p.add_argument("--output", default=None, help="JSON path (markdown beside it); default: in the run folder")
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", default=None, help="CPU threads: auto (default; fewer while other processes use the "
                                                   "cores) or a number (or NANOCHAT_THREADS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    unknown = [t for t in tasks or [] if t not in EVAL_TASKS]
    if unknown or args.num_samples < 1 or args.batch_size < 1 or args.decode_batch < 1:
        why = f"unknown task(s) {unknown}; known: {list(EVAL_TASKS)}" if unknown else \
            "-n, -b and --decode-batch must be >= 1"
        print(f"chat_eval: error: {why}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        ctx = init_runtime(args.device_type, args.dtype, threads=args.threads)
    except (ValueError, RuntimeError) as e:  # --device-type cuda without CUDA, --dtype fp8, --threads 0
        print(f"chat_eval: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        tag = args.model_tag or ckpt.find_last_tag(rd.phase_dir(args.source))
        # no --dtype: the inference default of load_model (auto decided at decode shapes; generation dominates)
        model, tokenizer, meta = ckpt.load_model(args.source, ctx.device, tag, args.step,
                                                 compute_dtype=ctx.dtype if args.dtype else None)
    except (ckpt.CheckpointError, FileNotFoundError) as e:
        print(f"chat_eval: error: {e}", file=sys.stderr)
        ctx.teardown()
        return EXIT_CONFIG
    try:
        result = run_chat_eval(model, tokenizer, ctx, tasks, args.task_data, args.max_problems, args.batch_size,
                               args.num_samples, args.max_new_tokens, args.temperature, args.top_k,
                               decode_batch=args.decode_batch)
    finally:
        ctx.teardown()
    result.update(source=args.source, model_tag=tag, step=meta.get("step"),
                  settings={k: v for k, v in vars(args).items() if k not in ("output",)})
    if ctx.is_master:
        default = rd.run_dir(args.source, tag) / f"chat_eval_{meta.get('step', 0):06d}.json"
        out = Path(args.output) if args.output else default
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        md = to_markdown(result, f"Chat evaluation: {args.source}/{tag} step {meta.get('step')}")
        out.with_suffix(".md").write_text(md)
        print(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
