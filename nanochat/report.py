"""The report card: one markdown file per run, rewritten section by section as the stages finish.

Sections are kept in `report_state.json` beside `report.md` so that a re-run (or a later stage in
another process) updates its own section and leaves the others as they were.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from nanochat.env import atomic_write_text
from nanochat.sizing import count_params, flops_per_token, model_config

SECTION_ORDER = ["environment", "tokenizer", "sizing", "training", "evaluation", "samples", "chat", "timing"]

# Rough on-demand price of one H100 SXM GPU-hour (USD, late 2026 cloud list prices range ~2-4).
GPU_HOUR_USD = 3.0


class Report:
    def __init__(self, run_dir: str | Path, title: str = "nanochat report card"):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.title = title
        self.state_path = self.dir / "report_state.json"
        self.path = self.dir / "report.md"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"sections": {}}

    def set(self, name: str, markdown: str) -> None:
        self.state["sections"][name] = markdown.rstrip() + "\n"
        self._write()

    def get(self, name: str) -> str | None:
        return self.state["sections"].get(name)

    def record_time(self, stage: str, seconds: float, skipped: bool = False) -> None:
        """A stage's wall time. A stage skipped because it finished earlier keeps the time of the run that did
        the work (a re-run must not turn the table into skip times); with none on record it is marked skipped."""
        times = self.state.setdefault("stage_seconds", {})
        skipped_stages = self.state.setdefault("skipped_stages", [])
        if not skipped:
            times[stage] = round(seconds, 1)
            if stage in skipped_stages:
                skipped_stages.remove(stage)
        elif stage not in times:
            times[stage] = round(seconds, 1)
            if stage not in skipped_stages:
                skipped_stages.append(stage)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2))
        names = [n for n in SECTION_ORDER if n in self.state["sections"]]
        names += sorted(n for n in self.state["sections"] if n not in SECTION_ORDER)
        body = [f"# {self.title}\n"] + [self.state["sections"][n] for n in names]
        atomic_write_text(self.path, "\n".join(body))


# ---------------------------------------------------------------------------------------------
# section builders


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name and the widest matrix/vector instructions it offers (what bounds CPU speed)."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or "unknown CPU"
    isa = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"),
                                     ("avx2", "AVX2")) if flag in flags]
    limits = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    return name + (f" ({', '.join(isa)})" if isa else "") + (f", limited by {', '.join(limits)}" if limits else "")


def threads_policy() -> str:
    """What the stages' `--threads auto` does in this environment (nanochat/cpu_threads.py.configure)."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{os.environ['OMP_NUM_THREADS']} (fixed by OMP_NUM_THREADS)"
    if os.environ.get("NANOCHAT_THREADS", "auto").strip().lower() not in ("", "auto"):
        return f"{os.environ['NANOCHAT_THREADS']} (fixed by NANOCHAT_THREADS)"
    from nanochat.cpu_threads import usable_cores

    return f"auto: up to {usable_cores()}, fewer while other processes use the cores"


def environment_section(repo_dir: str | Path, dtype: str | None = None) -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo_dir, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo_dir, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        hw = f"{n} x {torch.cuda.get_device_name(0)}"
    else:
        hw = f"CPU only ({os.cpu_count()} cores)"
    rows = [["git commit", commit + (" (uncommitted changes)" if dirty else "")], ["hardware", hw],
            ["CPU", cpu_model()], ["CPU threads", threads_policy()]]
    if dtype:
        rows.append(["compute dtype (training)", dtype])
    rows += [
            ["PyTorch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")],
            ["Python", platform.python_version()], ["platform", platform.platform()]]
    return "## Environment\n\n" + md_table(["", ""], rows) + "\n"


def run_flags(run_json: dict | None) -> dict:
    """The flags a run was started with, under whichever key its phase's run.json keeps them."""
    run_json = run_json or {}
    return run_json.get("args") or run_json.get("config") or {}


LR_KEYS = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")


def lr_rows(sizing: dict, flags: dict) -> list[list]:
    """Each learning rate twice, labelled: as passed on the command line and as used after the batch (and, for
    the AdamW groups, width) scaling of nanochat/sizing.learning_rates."""
    rows = []
    batch = sizing.get("tokens_per_step")
    for key in LR_KEYS:
        used, passed = sizing.get(key), flags.get(key)
        if used is None:
            continue
        if not finite(passed) or not passed:
            rows.append([f"{key} (used)", used])
            continue
        flag = "--" + key.replace("_", "-")
        scaling = f"sqrt({batch:,} / 2^19)" if batch else "batch"
        if key in ("embedding_lr", "unembedding_lr"):
            scaling += " x (width / 768)^-0.5"
        rows.append([f"{key} as passed ({flag})", f"{passed:g}"])
        rows.append([f"{key} used (x {used / passed:.4g}: {scaling})", f"{used:.4g}"])
    return rows


def sizing_section(run_json: dict) -> str:
    s = run_json.get("sizing", {})
    keys = ["num_params", "scaling_params", "embedding_params", "flops_per_token", "tokens_per_step",
            "num_iterations", "total_tokens", "tokens_per_scaling_param"]
    rows = [[k, s[k]] for k in keys if k in s]
    rows += lr_rows(s, run_flags(run_json))
    rows += [[k, s[k]] for k in ("weight_decay", "world_size", "grad_accum_steps") if k in s]
    cfg = run_json.get("model_config", {})
    rows += [[f"config.{k}", v] for k, v in cfg.items()]
    return "## Model sizing\n\n" + md_table(["quantity", "value"], rows) + "\n"


def plot_training(metrics: list[dict], out_dir: str | Path) -> list[str]:
    """Loss and val bpb vs step and vs FLOPs, as PNGs. Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    train = [m for m in metrics if m.get("loss") is not None]
    val = [m for m in metrics if m.get("val_bpb") is not None]
    written = []
    for xkey, xlabel, fname in (("step", "step", "curve_vs_step.png"), ("flops", "training FLOPs", "curve_vs_flops.png")):
        if not train or any(m.get(xkey) is None for m in train):
            continue
        fig, ax1 = plt.subplots(figsize=(7, 4))
        ax1.plot([m[xkey] for m in train], [m["loss"] for m in train], color="tab:blue", lw=1, label="train loss (smoothed)")
        ax1.set_xlabel(xlabel)
        ax1.set_ylabel("train loss (nats/token)", color="tab:blue")
        if xkey == "flops":
            ax1.set_xscale("log")
        if val:
            ax2 = ax1.twinx()
            ax2.plot([m[xkey] for m in val], [m["val_bpb"] for m in val], "o-", color="tab:red", label="val bpb")
            ax2.set_ylabel("validation bits per byte", color="tab:red")
        ax1.set_title(f"training curve vs {xlabel}")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def training_section(metrics: list[dict], plots: list[str], untrained_bpb: float | None = None,
                     eval_tokens: int | None = None, final_in_evaluation: bool = True) -> str:
    """Training figures. Each val bpb is labelled with its step and token count; the final checkpoint's val
    bpb belongs to the Evaluation section (`final_in_evaluation`), so it is not repeated here from the
    (smaller) in-training evaluation."""
    if not metrics:
        return "## Training\n\nNo metrics recorded yet.\n"
    last = metrics[-1]
    val = [m for m in metrics if m.get("val_bpb") is not None]
    on = f", {eval_tokens:,} val tokens" if eval_tokens else ""
    rows = [["steps", last.get("step", 0)], ["final train loss (smoothed, nats/token)", last.get("loss")],
            ["tokens seen", last.get("tokens")], ["training FLOPs", last.get("flops")]]
    if val and (not final_in_evaluation or val[0].get("step") != last.get("step")):
        rows.append([f"val bpb at the first evaluation (step {val[0]['step']}{on})", val[0]["val_bpb"]])
    if val and not final_in_evaluation and val[-1] is not val[0]:
        rows.append([f"val bpb at the last evaluation (step {val[-1]['step']}{on})", val[-1]["val_bpb"]])
    if untrained_bpb is not None:
        rows.append(["untrained model val bpb", untrained_bpb])
    tps = [m["tok_per_sec"] for m in metrics[len(metrics) // 4:] if m.get("tok_per_sec")]
    if tps:
        rows.append(["median tok/s", sorted(tps)[len(tps) // 2]])
    mfus = [m["mfu"] for m in metrics[len(metrics) // 4:] if m.get("mfu") is not None]
    rows.append(["median MFU", f"{100 * sorted(mfus)[len(mfus) // 2]:.1f}%" if mfus else "n/a (no known GPU peak)"])
    text = "## Training\n\n" + md_table(["", ""], [[k, v if v is not None else "n/a"] for k, v in rows]) + "\n"
    if val and final_in_evaluation:
        text += ("\nThe curve's val bpb points are the in-training evaluations" + (f" ({eval_tokens:,} tokens each)"
                 if eval_tokens else "") + "; the final checkpoint's val bpb is under Evaluation.\n")
    for p in plots:
        text += f"\n![{p}]({p})\n"
    return text


def bpb_label(result: dict, what: str = "val bpb") -> str:
    """`val bpb (step 260, 65,536 tokens)`: a bits-per-byte figure with what it measured."""
    parts = [f"step {result['step']}" if result.get("step") is not None else None,
             f"{result['split_tokens']:,} tokens" if result.get("split_tokens") else None]
    parts = [p for p in parts if p]
    return what + (f" ({', '.join(parts)})" if parts else "")


def evaluation_section(result: dict | None, note: str | None = None) -> str:
    text = "## Evaluation\n\n"
    if result is None:
        return text + (note or "Not evaluated yet.") + "\n"
    rows = []
    if result.get("val_bpb") is not None:
        rows.append([bpb_label(result, "val bpb, final checkpoint"), result["val_bpb"]])
    if result.get("untrained_val_bpb") is not None:
        rows.append(["val bpb of the untrained model (same tokens)", result["untrained_val_bpb"]])
    if result.get("train_bpb") is not None:
        rows.append([bpb_label(result, "train bpb, final checkpoint"), result["train_bpb"]])
    if rows:
        text += md_table(["metric", "value"], rows) + "\n\n"
    if result.get("core") is not None and result.get("tasks"):
        task_rows = [[label, t.get("accuracy"), t.get("centered"), t.get("n")] for label, t in result["tasks"].items()]
        text += "### CORE\n\n" + md_table(["task", "accuracy", "centered", "n"], task_rows) + "\n\n"
        missing = result.get("missing") or []
        text += (f"**CORE = {result['core']:.4f}** over {len(task_rows)} tasks"
                 + (f" ({len(missing)} missing: {', '.join(missing)})" if missing else "") + ".\n")
    if note:
        text += "\n" + note + "\n"
    return text


def samples_section(samples: list[tuple[str, str]]) -> str:
    text = "## Samples\n\n"
    for prompt, completion in samples:
        line = f"**{prompt.strip()}** {completion.strip()}" if prompt else completion.strip()
        text += "- " + line.replace("\n", " / ") + "\n"
    return text


TOOL_MARKERS = {"<|python_start|>": "<<", "<|python_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}
STOP_MARKERS = ("<|assistant_end|>", "<|bos|>")


def readable_reply(text: str) -> str:
    """A decoded reply with its calculator calls spelled as the chat CLI and web UI show them
    (`<<34-22=12>>`, nanochat/chat_session.ReplyStream) instead of the raw special tokens; ends at a stop token."""
    for stop in STOP_MARKERS:
        text = text.split(stop, 1)[0]
    out, i = [], 0
    for m in re.finditer("|".join(re.escape(k) for k in TOOL_MARKERS), text):
        out.append(text[i:m.start()] + TOOL_MARKERS[m.group(0)])
        i = m.end()
        if m.group(0) == "<|python_end|>" and not text.startswith("<|output_start|>", i):
            out.append(">>")  # a call with no result (the calculator refused): closed at once, as ReplyStream does
    out.append(text[i:])
    return "".join(out)


KIND_LABELS = {"verse": "verse lookup", "arithmetic": "calculator arithmetic", "letters": "letter counting",
               "identity": "identity", "multiturn": "multi-turn (last reply of a 2-3 exchange chat)"}


def chat_section(evals: dict[str, dict | None], sft: dict | None = None) -> str:
    """The chat phases: per-task accuracy and ChatCORE by phase (`evals`: "base" / "sft" / "rl" -> a
    scripts/chat_eval.py JSON, or None), the embedded mix per kind (the multi-turn score among them), the SFT
    masked val loss (`sft`: val_loss_start, val_loss, steps) and two sample conversations of the latest phase."""
    phases = [(ph, evals[ph]) for ph in ("base", "sft", "rl") if evals.get(ph)]
    text = "## Chat\n\n"
    if not phases:
        return text + "No chat evaluation yet.\n"
    tasks = list(dict.fromkeys(t for _, r in phases for t in r.get("tasks", {})))
    rows = [[t] + [r["tasks"][t]["accuracy"] if t in r.get("tasks", {}) else "-" for _, r in phases] for t in tasks]
    for t in tasks:  # per kind of the embedded mix (held-out split)
        kinds = list(dict.fromkeys(k for _, r in phases for k in (r.get("tasks", {}).get(t, {}).get("by_kind") or {})))
        for k in kinds:
            rows.append([f"{t}: {KIND_LABELS.get(k, k)}"]
                        + [r["tasks"][t].get("by_kind", {}).get(k, "-") if t in r.get("tasks", {}) else "-"
                           for _, r in phases])
    rows.append(["**ChatCORE**"] + [r["chatcore"] if r.get("chatcore") is not None else "-" for _, r in phases])
    text += md_table(["task"] + [ph.upper() if ph != "base" else "base" for ph, _ in phases], rows) + "\n"
    covered = next((r.get("chatcore_tasks") for _, r in reversed(phases) if r.get("chatcore") is not None), None)
    if covered:
        text += f"\nChatCORE over the tasks that ran: {', '.join(covered)}.\n"
    if "EmbeddedChat" in tasks:
        n = next((r["tasks"]["EmbeddedChat"].get("n") for _, r in reversed(phases) if "EmbeddedChat" in r["tasks"]), None)
        text += ("\nEmbeddedChat is the offline mix's held-out split (verse lookup, calculator arithmetic, letter "
                 "counting, identity, and multi-turn chats whose last reply is scored): the share of "
                 + (f"{n:,} " if n else "") + "replies with the right answer.\n")
    if sft and sft.get("val_loss") is not None and sft.get("val_loss_start") is not None:
        text += (f"\nSFT masked validation loss (nats per assistant token): {sft['val_loss_start']:.4f} before, "
                 f"{sft['val_loss']:.4f} after {sft.get('steps', '?')} steps.\n")
    samples = next((s for _, r in reversed(phases) for s in (r.get("samples") or {}).values() if s), [])
    if samples:
        text += f"\n### Sample conversations ({phases[-1][0]})\n\n"
        for s in samples[:2]:
            reply = readable_reply(s["reply"]).strip().replace("\n", " / ")
            verdict = "right" if s["correct"] else "wrong"
            earlier = s.get("earlier_turns") or 0
            context = f" (after {earlier} earlier exchange{'s' if earlier > 1 else ''})" if earlier else ""
            text += f"- **user{context}:** {s['prompt'].strip()}\n  **assistant:** {reply} ({verdict})\n"
    return text


def timing_section(stage_seconds: dict[str, float], num_gpus: int, skipped: list[str] = ()) -> str:
    """Wall time per stage, as measured by the run that did each stage's work (`skipped`: stages with no
    such time on record, finished before this report existed)."""
    rows = [[k, f"{v:,.0f} s ({v / 60:.1f} min)" + (" (skipped: done before this report)" if k in skipped else "")]
            for k, v in stage_seconds.items()]
    total = sum(stage_seconds.values())
    rows.append(["total", f"{total:,.0f} s ({total / 3600:.2f} h)"])
    text = "## Wall time\n\n" + md_table(["stage", "wall time"], rows) + "\n"
    if num_gpus > 0:
        gpu_hours = total / 3600 * num_gpus
        text += (f"\nGPU-hours: {gpu_hours:.2f} on {num_gpus} GPU(s); at ~${GPU_HOUR_USD:.0f}/GPU-hour that is "
                 f"about ${gpu_hours * GPU_HOUR_USD:,.0f}.\n")
    est = gpu_recipe_estimate()
    text += (f"\nGPU recipe estimate (d{est['depth']}, tokens:params {est['ratio']:g}, {est['flops']:.2e} FLOPs, "
             f"{est['gpus']} x H100 at {100 * est['mfu']:.0f}% MFU): {est['hours']:.2f} h wall, "
             f"{est['gpu_hours']:.1f} GPU-hours, about ${est['gpu_hours'] * GPU_HOUR_USD:,.0f} "
             f"at ${GPU_HOUR_USD:.0f}/GPU-hour.\n")
    return text


def gpu_recipe_estimate(depth: int = 24, ratio: float = 8.0, gpus: int = 8, mfu: float = 0.45,
                        peak: float = 989e12) -> dict:
    """Training compute and wall time of the GPT-2-grade recipe from the sizing rules (no eval time)."""
    config = model_config(depth)
    flops = flops_per_token(config) * ratio * count_params(config)["scaling"]
    hours = flops / (gpus * peak * mfu) / 3600
    return {"depth": depth, "ratio": ratio, "gpus": gpus, "mfu": mfu, "flops": flops, "hours": hours,
            "gpu_hours": hours * gpus}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
