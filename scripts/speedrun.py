"""The whole pipeline in one command: data -> tokenizer -> pretraining -> evaluation -> SFT -> chat
evaluation (-> RL with --rl on the gpu preset) -> report card.

    python -m scripts.speedrun                 # preset chosen by the hardware (gpu if CUDA, else cpu)
    python -m scripts.speedrun --preset ci     # the few-minute CPU smoke run CI executes

`speedrun.sh` sets up the virtual environment and calls this. Every stage checks what is already on
disk and skips or resumes: re-running after a crash or a kill continues where it stopped.
Environment variables (each also a flag): NANOCHAT_PRESET, NANOCHAT_DEPTH, NANOCHAT_DATA
(climbmix | fineweb-edu | embedded | a path to prepare), WANDB_RUN, NANOCHAT_BASE_DIR, NANOCHAT_EVAL_BUNDLE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

if not __package__:  # `python scripts/speedrun.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import report as rc  # noqa: E402
from nanochat.common import NotWritable, get_base_dir, require_writable  # noqa: E402
from nanochat.run_dir import read_metrics, read_run_json  # noqa: E402
from nanochat.run_dir import run_dir as run_dir_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Preset:
    name: str
    data: str  # climbmix | fineweb-edu | embedded | path
    num_shards: int  # train shards to download (hub sources)
    tok_first_shards: int  # shards fetched before the tokenizer trains (the rest download meanwhile)
    vocab_size: int
    tok_max_chars: int
    depth: int
    max_seq_len: int
    device_batch_size: int
    train_args: list[str] = field(default_factory=list)  # horizon, evals, model options
    core_max_per_task: int = -1  # -1 = all examples
    eval_split_tokens: int = 2 ** 20
    sft_args: list[str] = field(default_factory=list)  # scripts.chat_sft flags (mix, batch, evals)
    chat_eval_args: list[str] = field(default_factory=list)  # scripts.chat_eval flags (tasks, problem caps)


PRESETS = {
    # GPT-2 grade (REFERENCE section 9): d24, tokens:params 8, bf16 + compile, SSSL windows, value embeds
    "gpu": Preset("gpu", data="climbmix", num_shards=170, tok_first_shards=8, vocab_size=32768,
                  tok_max_chars=2_000_000_000, depth=24, max_seq_len=2048, device_batch_size=16,
                  train_args=["--target-param-data-ratio=8", "--window-pattern=SSSL", "--value-embeds",
                              "--resid-scalars", "--eval-every=250", "--core-metric-every=2000",
                              "--sample-every=2000", "--save-every=1000", "--keep-last=2"],
                  core_max_per_task=-1, eval_split_tokens=40 * 2 ** 19,
                  # the reference SFT mix from the hub, then the five ChatCORE tasks
                  sft_args=["--device-batch-size=8", "--eval-every=200", "--save-every=500", "--keep-last=2"]),
    # ~10 minutes on 2 CPU cores, offline: the embedded corpus, a 4K tokenizer, a depth-4 model.
    # LRs are 8x the reference's base values: its sqrt(B / 2^19) batch rule was fitted at 2^18-2^21
    # tokens per step and starves a 2,048-token batch (measured, 40 steps: val bpb 2.14 at 1x, 1.78 at 4x,
    # 1.73 at 8x). The KJV's chapters (~1,000 tokens)
    # are long against 257-token rows: discarding cropped tails threw away 62% of the text and repeated
    # chapter openings, so tails of >= 32 tokens are kept (same compute, val bpb 1.512 -> 1.482).
    # The in-training evaluations use as many tokens as the final one (65,536), so the curve's last point and
    # the report's val bpb measure the same thing. One logical data stream: a single CPU process has no ranks
    # to share the data with, and the corpus is small (1,130 chapters): cut into the default 8 streams, each
    # packs ~140 chapters with a buffer of that many and crops more (val bpb 1.518 vs 1.505 with one stream).
    "cpu": Preset("cpu", data="embedded", num_shards=0, tok_first_shards=0, vocab_size=4096,
                  tok_max_chars=100_000_000, depth=4, max_seq_len=256, device_batch_size=8,
                  train_args=["--num-iterations=260", "--total-batch-size=2048", "--warmup-steps=10",
                              "--keep-remainder=32", "--data-streams=1",
                              "--matrix-lr=0.16", "--embedding-lr=2.4", "--unembedding-lr=0.064", "--scalar-lr=1.0",
                              "--eval-every=65", "--eval-tokens=65536", "--core-metric-every=0",
                              "--sample-every=-1", "--save-every=65", "--keep-last=2"],
                  core_max_per_task=16, eval_split_tokens=65536,
                  # the embedded chat mix (offline), scored on its held-out split before and after SFT
                  sft_args=["--mix=embedded", "--train-size=2000", "--device-batch-size=8", "--eval-every=-1",
                            "--eval-steps=16"],
                  chat_eval_args=["--tasks=EmbeddedChat", "--max-problems=100", "--max-new-tokens=96"]),
    # CI smoke test: every stage for real, in a couple of minutes
    "ci": Preset("ci", data="embedded", num_shards=0, tok_first_shards=0, vocab_size=512,
                 tok_max_chars=2_000_000, depth=2, max_seq_len=128, device_batch_size=4,
                 train_args=["--num-iterations=30", "--total-batch-size=1024", "--warmup-steps=5",
                             "--eval-every=15", "--eval-tokens=8192", "--core-metric-every=0",
                             "--sample-every=-1", "--save-every=15", "--aspect-ratio=64", "--head-dim=64"],
                 core_max_per_task=11, eval_split_tokens=8192,
                 sft_args=["--mix=embedded", "--train-size=200", "--val-size=32", "--device-batch-size=4",
                           "--eval-every=-1", "--eval-steps=4"],
                 chat_eval_args=["--tasks=EmbeddedChat", "--max-problems=8", "--max-new-tokens=16"]),
}


def log(msg: str) -> None:
    print(f"[speedrun {time.strftime('%H:%M:%S')}] {msg}", flush=True)


SKIPPED: set[str] = set()  # stages that found their work done on disk in this invocation


def skip(stage: str, msg: str) -> None:
    """Log that `stage` is already done; its wall time in the report stays the one of the run that did it."""
    SKIPPED.add(stage)
    log(msg)


def run(cmd: list[str], env: dict | None = None) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"speedrun: stage command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
                         "Fix the cause above and re-run: finished stages are skipped, training resumes.")


def num_cuda_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def launcher(nproc: int, module: str) -> list[str]:
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", module]
    return [sys.executable, "-m", module]


# ---------------------------------------------------------------------------------------------
# stages


def stage_data(p: Preset, base: Path) -> subprocess.Popen | None:
    """Make sure train + validation shards exist. Returns a background download still running, if any."""
    from nanochat import dataset

    def have_data() -> bool:
        try:
            return bool(dataset.list_shards("train")) and bool(dataset.list_shards("val"))
        except Exception:
            return False

    if p.data == "embedded":
        if have_data():
            skip("data", "embedded corpus prepared earlier, skipping")
        else:
            run([sys.executable, "-m", "nanochat.dataset", "embedded"])
        return None
    if p.data in ("climbmix", "fineweb-edu"):
        # enough shards for the tokenizer now, the rest in the background while it trains
        run([sys.executable, "-m", "nanochat.dataset", "-n", str(p.tok_first_shards), "--source", p.data])
        log(f"downloading the remaining shards (up to {p.num_shards}) in the background")
        return subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", str(p.num_shards),
                                 "--source", p.data], cwd=REPO)
    # a local path or a `datasets` name
    if have_data():
        skip("data", "data prepared earlier, skipping")
    else:
        run([sys.executable, "-m", "nanochat.dataset", "prepare", "--input", p.data])
    return None


def stage_tokenizer(p: Preset, base: Path, report: rc.Report) -> None:
    tok_dir = base / "tokenizer"
    if (tok_dir / "token_bytes.pt").exists():
        from nanochat.tokenizer import get_tokenizer

        vocab = get_tokenizer().get_vocab_size()
        if vocab != p.vocab_size:
            raise SystemExit(f"speedrun: {tok_dir} holds a tokenizer of vocab {vocab}, the {p.name} preset wants "
                             f"{p.vocab_size}. Use another NANOCHAT_BASE_DIR, or delete {tok_dir} to retrain.")
        skip("tokenizer", f"tokenizer exists ({tok_dir}), skipping training")
    else:
        run([sys.executable, "-m", "scripts.tok_train", f"--vocab-size={p.vocab_size}",
             f"--max-chars={p.tok_max_chars}"])
    report.set("tokenizer", tokenizer_section(p))


def tokenizer_section(p: Preset) -> str:
    from nanochat import dataset
    from nanochat.tokenizer import get_tokenizer

    tok = get_tokenizer()
    n_bytes = n_tokens = 0
    for i, doc in enumerate(dataset.iter_documents("val")):
        n_bytes += len(doc.encode("utf-8"))
        n_tokens += len(tok.encode(doc))
        if i >= 300:
            break
    ratio = n_bytes / max(1, n_tokens)
    meta = getattr(tok, "meta", None) or {}
    if meta.get("chars"):  # what the tokenizer was trained on (the cap is only an upper bound)
        used = (f"{meta['chars']:,} characters in {meta.get('docs', 0):,} documents"
                + (f" (cap --max-chars {meta['max_chars']:,})" if meta.get("max_chars") else ""))
    else:
        used = f"unknown (trained before tokenizers recorded it; cap --max-chars {p.tok_max_chars:,})"
    rows = [["vocab size", tok.get_vocab_size()], ["training text used", used],
            ["compression on validation docs", f"{ratio:.3f} bytes/token ({n_bytes:,} bytes in {n_tokens:,} tokens)"]]
    return "## Tokenizer\n\n" + rc.md_table(["", ""], rows) + "\n"


def training_done(run_dir: Path) -> bool:
    from nanochat.checkpoint_manager import list_steps

    info = read_run_json(run_dir)
    if info is None:
        return False
    target = info.get("sizing", {}).get("num_iterations")
    steps = list_steps(run_dir) if run_dir.exists() else []
    return bool(target) and bool(steps) and max(steps) >= target


def stage_train(p: Preset, tag: str, nproc: int, run_name: str, report: rc.Report) -> None:
    from nanochat.checkpoint_manager import list_steps

    run_dir = run_dir_of("base", tag)
    if training_done(run_dir):
        skip("train", f"training finished earlier ({run_dir}), skipping")
    else:
        cmd = launcher(nproc, "scripts.base_train") + [
            f"--depth={p.depth}", f"--max-seq-len={p.max_seq_len}", f"--device-batch-size={p.device_batch_size}",
            f"--model-tag={tag}", f"--run={run_name}"] + p.train_args
        if run_dir.exists() and list_steps(run_dir):
            log(f"resuming training from the latest checkpoint in {run_dir}")
            cmd.append("--resume-from-step=latest")
        run(cmd)
    info = read_run_json(run_dir) or {}
    report.set("sizing", rc.sizing_section(info))
    dtype = (info.get("env") or {}).get("dtype")
    report.set("environment", rc.environment_section(REPO, dtype=dtype))
    metrics = read_metrics(run_dir)
    plots = rc.plot_training(metrics, report.dir) if metrics else []
    report.set("training", rc.training_section(metrics, plots, eval_tokens=rc.run_flags(info).get("eval_tokens")))


def untrained_val_bpb(run_dir: Path, split_tokens: int) -> float:
    """Validation bpb of the same architecture at initialisation: what training has to beat."""
    from nanochat.checkpoint_manager import build_model
    from nanochat.common import init_runtime
    from nanochat.loss_eval import evaluate_split_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    info = read_run_json(run_dir)
    ctx = init_runtime(seed=int(info.get("args", {}).get("seed", 42)))
    model = build_model(info["model_config"], ctx.device, ctx.dtype)  # freshly initialised weights
    model.eval()
    batch = int(info.get("args", {}).get("device_batch_size", 8))
    return evaluate_split_bpb(model, get_tokenizer(), get_token_bytes(ctx.device), ctx, "val", split_tokens, batch,
                              model.config.sequence_len)


def stage_eval(p: Preset, tag: str, nproc: int, report: rc.Report) -> dict:
    from nanochat.checkpoint_manager import find_last_step

    run_dir = run_dir_of("base", tag)
    step = find_last_step(run_dir)
    out = run_dir / f"base_eval_{step:06d}.json"
    bundle_error = None
    try:  # resolve (or download) the CORE bundle up front: without one, CORE is skipped with a note
        from nanochat.eval_bundle import resolve_eval_bundle

        bundle = resolve_eval_bundle()
    except Exception as e:  # EvalBundleError offline; anything else is reported the same way
        bundle, bundle_error = None, str(e)
    if out.exists():
        skip("eval", f"evaluation of step {step} exists ({out}), skipping")
    else:
        cmd = launcher(nproc, "scripts.base_eval") + [f"--model-tag={tag}", f"--step={step}", f"--out={out}",
                                                       f"--split-tokens={p.eval_split_tokens}",
                                                       f"--device-batch-size={p.device_batch_size}"]
        if bundle is None:
            log("no CORE eval bundle: evaluating bpb and samples only")
            cmd.append("--eval=bpb,sample")
        else:
            cmd.append(f"--eval-bundle={bundle}")
            if p.core_max_per_task > 0:
                cmd.append(f"--max-per-task={p.core_max_per_task}")
        run(cmd)
    result = json.loads(out.read_text())
    result.setdefault("step", step)
    result.setdefault("split_tokens", p.eval_split_tokens)
    if "untrained_val_bpb" not in result and result.get("val_bpb") is not None:
        result["untrained_val_bpb"] = untrained_val_bpb(run_dir, p.eval_split_tokens)
        out.write_text(json.dumps(result, indent=2))
    note = None
    if result.get("core") is None:
        note = ("CORE was not computed: " + (bundle_error or "no eval bundle available")
                + " (with `NANOCHAT_EVAL_BUNDLE` set, or on a networked machine, re-run after deleting "
                  f"{out.name} to add it).")
    elif p.core_max_per_task > 0:
        note = f"CORE on at most {p.core_max_per_task} examples per task (a smoke figure, not comparable to full CORE)."
    report.set("evaluation", rc.evaluation_section(result, note))
    samples = [("", s) if isinstance(s, str) else (s.get("prompt", ""), s.get("completion", ""))
               for s in result.get("samples", [])]
    if samples:
        report.set("samples", rc.samples_section(samples))
    return result


def chat_phase_done(run_dir: Path) -> bool:
    """The last checkpoint of an SFT / RL run is its final one."""
    from nanochat.checkpoint_manager import list_steps, load_meta

    steps = list_steps(run_dir)
    return bool(steps) and bool(load_meta(run_dir, steps[-1]).get("finished"))


def stage_chat_train(phase: str, p: Preset, tag: str, nproc: int) -> None:
    """SFT from the base checkpoint (or RL from the SFT one), resumed when interrupted, skipped when done."""
    run_dir = run_dir_of(phase, tag)
    if chat_phase_done(run_dir):
        skip(phase, f"{phase} finished earlier ({run_dir}), skipping")
        return
    module, source, extra = (("scripts.chat_sft", "base", p.sft_args) if phase == "sft" else
                             ("scripts.chat_rl", "sft", []))
    run(launcher(nproc, module) + [f"--source={source}", f"--source-tag={tag}", f"--model-tag={tag}",
                                   "--resume=auto"] + extra)


def stage_chat_eval(p: Preset, tag: str, nproc: int, report: rc.Report, phases: list[str]) -> dict:
    """scripts.chat_eval of each phase's last checkpoint (skipped when its JSON exists); the report's chat section."""
    from nanochat.checkpoint_manager import find_last_step, load_meta

    evals, sft, ran = {}, None, False
    for phase in phases:
        run_dir = run_dir_of(phase, tag)
        step = find_last_step(run_dir)
        out = run_dir / f"chat_eval_{step:06d}.json"
        if out.exists():
            log(f"chat evaluation of {phase} step {step} exists ({out}), skipping")
        else:
            ran = True
            run(launcher(nproc, "scripts.chat_eval") + [f"--source={phase}", f"--model-tag={tag}", f"--step={step}",
                                                        f"--output={out}"] + p.chat_eval_args)
        evals[phase] = json.loads(out.read_text())
        if phase == "sft":
            meta = load_meta(run_dir, step)
            sft = dict(meta.get("sft_evals") or {}, steps=step)
    report.set("chat", rc.chat_section(evals, sft))
    if not ran:
        SKIPPED.add("chat_eval")
    return evals


def env_defaults() -> dict:
    """The flags' defaults from the environment, checked like the flags themselves: a bad value stops here
    with one line (exit 2) instead of a traceback (argparse does not check defaults against choices)."""
    preset = os.environ.get("NANOCHAT_PRESET") or "auto"
    if preset not in ("auto", *PRESETS):
        usage_error(f"NANOCHAT_PRESET={preset!r} is not a preset: use one of {', '.join(['auto', *PRESETS])}")
    depth = os.environ.get("NANOCHAT_DEPTH") or None
    if depth is not None:
        try:
            depth = int(depth)
        except ValueError:
            depth = -1
        if depth < 1:
            usage_error(f"NANOCHAT_DEPTH={os.environ['NANOCHAT_DEPTH']!r} is not a positive integer: use e.g. "
                        f"NANOCHAT_DEPTH=12, or unset it for the preset's depth")
    return {"preset": preset, "depth": depth}


def usage_error(msg: str) -> None:
    print(f"speedrun: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def main(argv: list[str] | None = None) -> int:
    env = env_defaults()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=env["preset"], choices=["auto", *PRESETS])
    ap.add_argument("--depth", type=positive_int, default=env["depth"])
    ap.add_argument("--data", default=os.environ.get("NANOCHAT_DATA"),
                    help="climbmix | fineweb-edu | embedded | a file/folder/`datasets` name to prepare")
    ap.add_argument("--run", default=os.environ.get("WANDB_RUN", "dummy"), help="wandb run name (dummy = off)")
    ap.add_argument("--model-tag", default=None, help="run folder name (default <preset>_d<depth>)")
    ap.add_argument("--nproc", type=int, default=None, help="processes for torchrun (default: all local GPUs)")
    ap.add_argument("--rl", action=argparse.BooleanOptionalAction, default=os.environ.get("NANOCHAT_RL") == "1",
                    help="add the GSM8K RL stage after SFT (gpu preset; env NANOCHAT_RL=1)")
    args = ap.parse_args(argv)

    gpus = num_cuda_gpus()
    name = args.preset if args.preset != "auto" else ("gpu" if gpus else "cpu")
    p = PRESETS[name]
    if args.depth:
        p = replace(p, depth=args.depth)
    if args.data:
        p = replace(p, data=args.data)
    nproc = args.nproc or max(1, gpus)
    tag = args.model_tag or f"{name}_d{p.depth}"
    try:  # every stage writes there: a read-only or full base dir stops here, in one line
        base = require_writable(get_base_dir())
    except NotWritable as e:
        usage_error(str(e))
    run_dir = run_dir_of("base", tag, base)
    report = rc.Report(run_dir / "report", title=f"nanochat report card: {tag} ({name} preset)")
    log(f"preset {name}: depth {p.depth}, data {p.data}, {nproc} process(es), base dir {base}, run {run_dir}")
    report.set("environment", rc.environment_section(REPO))

    times = {}

    def timed(stage, fn, *a):
        t0 = time.time()
        out = fn(*a)
        times[stage] = time.time() - t0
        report.record_time(stage, times[stage], skipped=stage in SKIPPED)
        return out

    background = timed("data", stage_data, p, base)
    timed("tokenizer", stage_tokenizer, p, base, report)
    if background is not None:
        log("waiting for the background shard download to finish")
        if background.wait() != 0:
            raise SystemExit("speedrun: the shard download failed; re-run to resume it")
    timed("train", stage_train, p, tag, nproc, args.run, report)
    result = timed("eval", stage_eval, p, tag, nproc, report)
    timed("sft", stage_chat_train, "sft", p, tag, nproc)
    chat_phases = ["base", "sft"]
    if args.rl and name == "gpu":
        timed("rl", stage_chat_train, "rl", p, tag, nproc)
        chat_phases.append("rl")
    elif args.rl:
        log(f"--rl is for the gpu preset (GSM8K from the hub); skipped on the {name} preset")
    chat = timed("chat_eval", stage_chat_eval, p, tag, nproc, report, chat_phases)
    report.set("timing", rc.timing_section(report.state.get("stage_seconds", {}), gpus,
                                           report.state.get("skipped_stages", [])))
    log(f"done. report: {report.path}")
    if result.get("val_bpb") is not None:
        log(f"{rc.bpb_label(result, 'val bpb of the final checkpoint')} {result['val_bpb']:.4f}"
            + (f", CORE {result['core']:.4f}" if result.get("core") is not None else ""))
    for phase, r in chat.items():
        accs = ", ".join(f"{t} {v['accuracy']:.4f}" + (f" (multi-turn {v['by_kind']['multiturn']:.4f})"
                                                       if "multiturn" in (v.get("by_kind") or {}) else "")
                         for t, v in r.get("tasks", {}).items())
        log(f"chat {phase}: {accs}" + (f", ChatCORE {r['chatcore']:.4f}" if r.get("chatcore") is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
