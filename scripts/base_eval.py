"""Evaluate a base model: CORE, train/val bits per byte, and a few greedy samples.

    python scripts/base_eval.py                              # latest base checkpoint, everything
    python scripts/base_eval.py --model-tag d12 --step 5000 --eval core --max-per-task 500
    python scripts/base_eval.py --hf-path openai-community/gpt2 --eval core   # a Hugging Face baseline
    torchrun --nproc_per_node=8 scripts/base_eval.py

Results: JSON (`core`, `tasks`, `train_bpb`, `val_bpb`, ...), CSV and a markdown table, written into
the checkpoint's run folder (or `<base>/base_eval/` for Hugging Face models; `--out` to choose).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if not __package__:  # `python scripts/base_eval.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from nanochat.common import get_base_dir, init_runtime  # noqa: E402
from nanochat.env import atomic_write_text  # noqa: E402
from nanochat.loss_eval import evaluate_split_bpb  # noqa: E402
from nanochat.hf_adapters import HFModel, HFTokenizer  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
PARTS = ("core", "bpb", "sample")
# CORE examples per task when none is asked for on CPU: 22 tasks x 100 = ~2,200 of the full ~83K (the full set
# takes 40 min to hours on a laptop CPU); each task's accuracy then has a standard error of ~0.05, CORE ~0.01
CPU_MAX_PER_TASK = 100
GPU_SPLIT_TOKENS = 2 ** 20
CPU_SPLIT_TOKENS = 2 ** 16  # the cpu speedrun preset's figure: ~1 min per split for a depth-4 model on 2 cores


def partial_path(json_path: Path) -> Path:
    return json_path.with_name(json_path.stem + ".core_partial.json")


class FinishedTasks:
    """CORE tasks finished so far, kept on disk as each one ends (`add`), so that a stopped evaluation
    (SIGTERM, Ctrl-C, a crash) loses at most the task it was in: the same command resumes from them (`load`).
    They are reused only for the same model, bundle, examples per task and context (`key`)."""

    def __init__(self, path: Path, key: dict, enabled: bool = True):
        self.path, self.key, self.enabled = Path(path), key, enabled
        self.tasks: dict = {}

    def load(self) -> dict:
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            return {}
        self.tasks = dict(saved.get("tasks") or {})
        return dict(self.tasks)

    def add(self, label: str, result: dict) -> None:
        self.tasks[label] = result
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"key": self.key, "tasks": self.tasks}, indent=1))

    def discard(self) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)


STOP_NOTE: list = [None]  # the FinishedTasks of the CORE run in progress, for the message when stopped


def _stop_on_sigterm() -> None:
    """SIGTERM ends the evaluation like Ctrl-C: the finished CORE tasks are on disk already; say where."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test harness thread)
        pass


def fail(msg: str, code: int = 2):
    """One line on stderr and exit `code` (2: bad input or missing files), no traceback."""
    print(f"base_eval: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect within `timeout` s (the hub client itself retries for
    ~50 s before giving up offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def load_hf(path: str, device, trust_remote_code: bool = False):
    """(model wrapper, tokenizer wrapper) of a local directory or hub name (hub needs the network, else the
    local hub cache is used; neither: a one-line error within seconds).

    `trust_remote_code` runs the modeling code shipped in the folder (nanochat's remote-code exports)."""
    local = Path(path).expanduser().is_dir()
    offline = not local and not hub_reachable()
    offline_hint = (f"--hf-path {path!r} is not a local folder, the Hugging Face hub cannot be reached and the model "
                    f"is not in the local hub cache: on a networked machine run `hf download {path} --local-dir DIR`, "
                    f"copy DIR here and pass --hf-path DIR")
    if offline:  # answer before the (slow) transformers import when the hub cache has nothing either
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(path, "config.json"), str)
        except Exception:  # noqa: BLE001  (an invalid repo id, or no huggingface_hub: let transformers decide)
            cached = True
        if not cached:
            fail(offline_hint)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        fail("--hf-path needs the transformers package: pip install transformers")
    kwargs = {"local_files_only": True} if local or offline else {}
    try:
        hf_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        hf_model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if offline:
            fail(offline_hint)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"could not load a Hugging Face model from {path!r} ({first}); give a local directory holding "
             f"config.json, the weights and the tokenizer files, or a hub name on a machine with network access")
    hf_model.to(device).eval()
    cfg = hf_model.config
    max_seq_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    return HFModel(hf_model, max_seq_len), HFTokenizer(hf_tok)


# ---------------------------------------------------------------------------------------------
# the parts


@torch.no_grad()
def greedy_samples(model, tokenizer, device, max_tokens: int = 16) -> list[str]:
    """Greedy continuations of PROMPTS: the KV-cache Engine for our GPT, a plain loop otherwise."""
    engine = None
    if hasattr(model, "config") and hasattr(model, "get_device"):
        try:
            from nanochat.engine import Engine

            engine = Engine(model, tokenizer)
        except ImportError:
            engine = None
    out = []
    bos = tokenizer.get_bos_token_id()
    prompts = [tokenizer.encode(prompt, prepend=bos) for prompt in PROMPTS]
    replies = {}
    if engine is not None:  # all prompts decoded together
        replies = {i: toks for i, toks, _ in engine.generate_many(prompts, max_tokens=max_tokens, temperature=0.0)}
    for i, (prompt, tokens) in enumerate(zip(PROMPTS, prompts)):
        if engine is not None:
            new = replies[i]
        else:
            seq = list(tokens)
            for _ in range(max_tokens):
                logits = model(torch.tensor([seq], dtype=torch.long, device=device))
                nxt = int(logits[0, -1].argmax())
                if nxt == bos:
                    break
                seq.append(nxt)
            new = seq[len(tokens):]
        out.append(prompt + tokenizer.decode(new))
    return out


# ---------------------------------------------------------------------------------------------
# output


def results_table(result: dict) -> str:
    lines = ["| task | type | shots | n | accuracy | centered |", "|---|---|---:|---:|---:|---:|"]
    core = result.get("core_eval") or {}
    for label, t in result.get("tasks", {}).items():
        lines.append(f"| {label} | {t.get('task_type', '')} | {t.get('num_fewshot', '')} | {t['n']} | "
                     f"{t['accuracy']:.4f} | {t['centered']:.4f} |")
    for label in core.get("missing", []):
        lines.append(f"| {label} | missing | | 0 | | |")
    if result.get("core") is not None:
        lines.append(f"| **CORE** ({core.get('n_tasks')} of {core.get('n_tasks_total')} tasks) | | | "
                     f"{core.get('n_examples')} | | **{result['core']:.4f}** |")
    for key in ("train_bpb", "val_bpb"):
        if result.get(key) is not None:
            lines.append(f"| {key} | | | | | {result[key]:.4f} |")
    return "\n".join(lines)


def write_results(result: dict, json_path: Path) -> list[Path]:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    csv_path, md_path = json_path.with_suffix(".csv"), json_path.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "accuracy", "centered", "n"])
        for label, t in result.get("tasks", {}).items():
            w.writerow([label, f"{t['accuracy']:.6f}", f"{t['centered']:.6f}", t["n"]])
        if result.get("core") is not None:
            w.writerow(["CORE", "", f"{result['core']:.6f}", (result.get("core_eval") or {}).get("n_examples", "")])
    md_path.write_text(f"# base_eval: {result['model']}\n\n{results_table(result)}\n")
    return [json_path, csv_path, md_path]


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Base model evaluation: CORE, bits per byte, samples")
    p.add_argument("--model-tag", default=None, help="checkpoint tag under <base>/base_checkpoints (default: latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--hf-path", default=None, help="evaluate a Hugging Face causal LM (local dir or hub name)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="with --hf-path: run the model code in the folder (nanochat remote-code exports)")
    p.add_argument("--eval", default="core,bpb,sample", help="comma-separated parts: core, bpb, sample")
    p.add_argument("--max-per-task", type=int, default=None,
                   help=f"CORE examples per task (-1 = all; default: all on GPUs, {CPU_MAX_PER_TASK} on CPU)")
    p.add_argument("--tasks", default="", help="comma-separated CORE task labels (default: all)")
    p.add_argument("--eval-bundle", default=None, help="CORE eval bundle folder (else NANOCHAT_EVAL_BUNDLE, "
                                                       "else <base>/eval_bundle, downloaded on first use)")
    p.add_argument("--dump-examples", default=None, help="write every CORE example's decision to this jsonl")
    p.add_argument("--batch-tokens", type=int, default=8192, help="CORE tokens per forward pass")
    p.add_argument("--split-tokens", type=int, default=None,
                   help=f"tokens per split for train/val bpb (default {GPU_SPLIT_TOKENS:,} on GPUs, "
                        f"{CPU_SPLIT_TOKENS:,} on CPU, where 2^20 tokens take longer than a small model's training)")
    p.add_argument("--device-batch-size", type=int, default=16, help="rows per forward for bpb")
    p.add_argument("--seq-len", type=int, default=None, help="bpb row length (default: the model's context)")
    p.add_argument("--out", default=None, help="JSON output path (CSV and .md go beside it)")
    p.add_argument("--device-type", default=None, choices=["cuda", "cpu", "mps"], help="default: autodetect")
    p.add_argument("--dtype", default=None, help="compute dtype: auto (default: bf16 on Ampere+ GPUs and AMX/AVX512-BF16 CPUs, by a GEMM probe) | float32 | bfloat16")
    p.add_argument("--threads", default=None, help="CPU threads: auto (default; fewer while other processes use the "
                                                   "cores) or a number (or NANOCHAT_THREADS)")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.eval.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        p.error(f"--eval got {args.eval!r}: use a comma-separated subset of {','.join(PARTS)}")
    if args.max_per_task is not None and (args.max_per_task == 0 or args.max_per_task < -1):
        p.error(f"--max-per-task {args.max_per_task}: use -1 (all examples) or a positive number")
    if args.split_tokens is not None and args.split_tokens < 1:
        p.error(f"--split-tokens {args.split_tokens}: use a positive number of tokens")
    args.parts = parts
    return args


def main(argv=None) -> dict:
    """Evaluate as the flags say; returns the result dict. Bad input and missing files: one line, exit 2; CORE
    tasks that failed (corrupt data): the results of the rest are written, then exit 1."""
    args = parse_args(argv)
    try:
        ctx = init_runtime(args.device_type, args.dtype, threads=args.threads)
    except (ValueError, RuntimeError) as e:  # --device-type cuda without CUDA, --dtype fp8
        fail(str(e))
    _stop_on_sigterm()
    STOP_NOTE[0] = None
    try:
        return _main(args, ctx)
    except KeyboardInterrupt:
        kept = STOP_NOTE[0]
        n = len(kept.tasks) if kept is not None else 0
        where = (f"{n} finished CORE task(s) are kept in {kept.path}: run the same command again to resume"
                 if n else "no CORE task had finished, nothing kept")
        print(f"base_eval: stopped; {where}", file=sys.stderr, flush=True)
        raise SystemExit(130)
    finally:
        ctx.teardown()


def _main(args, ctx) -> dict:
    from nanochat.checkpoint_manager import CheckpointError
    from nanochat.dataset import DataError
    from nanochat.tokenizer import TokenizerError

    base = get_base_dir()
    if args.max_per_task is None:
        args.max_per_task = CPU_MAX_PER_TASK if ctx.device_type == "cpu" else -1
        if ctx.device_type == "cpu" and "core" in args.parts:
            ctx.print0(f"base_eval: on CPU, CORE runs at most {CPU_MAX_PER_TASK} examples per task (~{22 * CPU_MAX_PER_TASK:,} "
                       f"of ~83K; a quick estimate, CORE within ~0.01); --max-per-task -1 runs them all (hours on a CPU)")
    if "core" in args.parts:  # find (or download) the bundle and parse its tasks before any slow work
        from nanochat.core_eval import EvalBundleError, check_bundle

        try:
            bundle = check_bundle(args.eval_bundle, args.max_per_task, base_dir=base)
        except (EvalBundleError, ValueError) as e:
            fail(str(e))
        args.eval_bundle = str(bundle["bundle"])
        for label, why in bundle["skipped"].items():
            ctx.print0(f"WARNING: CORE task {label} will be skipped: {why}")
    if args.split_tokens is None:
        args.split_tokens = CPU_SPLIT_TOKENS if ctx.device_type == "cpu" else GPU_SPLIT_TOKENS
    try:
        return _evaluate(args, ctx, base)
    except (CheckpointError, DataError, TokenizerError, FileNotFoundError) as e:
        fail(str(e))


def _evaluate(args, ctx, base) -> dict:
    t_start = time.time()
    if args.hf_path:
        model, tokenizer = load_hf(args.hf_path, ctx.device, args.trust_remote_code)
        max_seq_len = model.max_seq_len
        token_bytes = tokenizer.token_bytes(ctx.device)
        name = args.hf_path
        out_dir = base / "base_eval"
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.hf_path.strip("/")).strip("_")
        autocast = (torch.autocast("cuda", dtype=ctx.dtype) if ctx.device_type == "cuda" and ctx.dtype != torch.float32
                    else nullcontext())
        meta = {}
    else:
        from nanochat.checkpoint_manager import find_last_step, find_last_tag, load_model
        from nanochat.run_dir import phase_dir as phase_dir_of

        phase_dir = phase_dir_of("base", base)
        tag = args.model_tag or find_last_tag(phase_dir)
        step = args.step if args.step is not None else find_last_step(phase_dir / tag)
        model, tokenizer, meta = load_model("base", ctx.device, model_tag=tag, step=step, compute_dtype=ctx.dtype)
        max_seq_len = model.config.sequence_len
        token_bytes = None
        name = f"{tag} step {step}"
        out_dir = phase_dir / tag
        stem = f"base_eval_{step:06d}"
        autocast = nullcontext()  # our GPT casts to its compute dtype itself
    ctx.print0(f"base_eval: {name} on {ctx.device_name} (world size {ctx.world_size}); parts: {','.join(args.parts)}")
    result: dict = {"model": name, "core": None, "tasks": {}, "train_bpb": None, "val_bpb": None,
                    "step": meta.get("step"), "max_seq_len": max_seq_len}

    if "sample" in args.parts and ctx.is_master:
        with autocast:
            samples = greedy_samples(model, tokenizer, ctx.device)
        result["samples"] = samples
        for s in samples:
            ctx.print0("  " + s.replace("\n", "\\n"))

    if "bpb" in args.parts:
        if token_bytes is None:
            from nanochat.tokenizer import get_token_bytes

            token_bytes = get_token_bytes(ctx.device)
        seq_len = args.seq_len or max_seq_len or 1024
        for split in ("train", "val"):
            with autocast:
                bpb = evaluate_split_bpb(model, tokenizer, token_bytes, ctx, split, args.split_tokens,
                                         args.device_batch_size, seq_len)
            result[f"{split}_bpb"] = bpb
            result["split_tokens"] = args.split_tokens
            ctx.print0(f"{split} bpb: {bpb:.4f} ({args.split_tokens:,} tokens)")

    if "core" in args.parts:
        from nanochat.core_eval import evaluate_core

        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
        json_path = Path(args.out) if args.out else out_dir / f"{stem}.json"
        kept = FinishedTasks(partial_path(json_path), dict(model=name, bundle=str(args.eval_bundle),
                                                           max_per_task=args.max_per_task, max_seq_len=max_seq_len),
                             enabled=ctx.is_master)
        done = kept.load()
        if done and args.dump_examples:
            ctx.print0(f"--dump-examples: not reusing the {len(done)} CORE task(s) kept in {kept.path} (their "
                       f"per-example decisions were not kept)")
            done = {}
        elif done:
            ctx.print0(f"resuming CORE: {len(done)} task(s) finished by an earlier run are reused from {kept.path}")
        STOP_NOTE[0] = kept
        with autocast:
            core = evaluate_core(model, tokenizer, ctx.device, args.eval_bundle, args.max_per_task,
                                 max_seq_len=max_seq_len, tasks=tasks, batch_tokens=args.batch_tokens,
                                 dump_examples=args.dump_examples, ctx=ctx, done=done, on_task=kept.add)
        result["core"] = core["core"]
        result["tasks"] = {k: {"accuracy": v["accuracy"], "centered": v["centered"], "n": v["n"],
                               "task_type": v["task_type"], "num_fewshot": v["num_fewshot"]}
                           for k, v in core["tasks"].items()}
        result["core_eval"] = {k: core[k] for k in ("missing", "failed", "n_tasks", "n_tasks_total", "n_examples", "seconds",
                                                    "examples_per_second", "max_per_task")}
        ctx.print0(f"CORE: {core['core']:.4f} over {core['n_tasks']} of {core['n_tasks_total']} tasks, "
                   f"{core['n_examples']:,} examples in {core['seconds']:.1f}s"
                   + (f" (missing: {', '.join(core['missing'])})" if core["missing"] else "")
                   + (f" (FAILED: {', '.join(core['failed'])})" if core["failed"] else ""))
        if args.dump_examples and ctx.is_master:
            ctx.print0(f"per-example decisions: {args.dump_examples}")

    result["seconds"] = time.time() - t_start
    if ctx.is_master:
        json_path = Path(args.out) if args.out else out_dir / f"{stem}.json"
        paths = write_results(result, json_path)
        if STOP_NOTE[0] is not None:
            STOP_NOTE[0].discard()  # the results are whole now
        STOP_NOTE[0] = None
        ctx.print0("\n" + results_table(result) + "\n")
        ctx.print0("wrote " + ", ".join(str(p) for p in paths))
    failed = result.get("core_eval", {}).get("failed")
    if failed:
        print(f"base_eval: error: {len(failed)} CORE task(s) failed ({'; '.join(failed.values())}); the other "
              f"{result['core_eval']['n_tasks']} were scored and written above", file=sys.stderr, flush=True)
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
