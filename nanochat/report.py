"""The report card: one markdown file per run, rewritten section by section as the stages finish.

Sections are kept in `report_state.json` beside `report.md` so that a re-run (or a later stage in
another process) updates its own section and leaves the others as they were.
"""

from __future__ import annotations

import json
import math
import os
import platform
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
        times = self.state.setdefault("stage_seconds", {})
        if not skipped or stage not in times:
            times[stage] = round(seconds, 1)
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


def environment_section(repo_dir: str | Path) -> str:
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
            ["PyTorch", torch.__version__ + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "")],
            ["Python", platform.python_version()], ["platform", platform.platform()]]
    return "## Environment\n\n" + md_table(["", ""], rows) + "\n"


def sizing_section(run_json: dict) -> str:
    s = run_json.get("sizing", {})
    keys = ["num_params", "scaling_params", "embedding_params", "flops_per_token", "tokens_per_step",
            "num_iterations", "total_tokens", "tokens_per_scaling_param", "matrix_lr", "embedding_lr",
            "unembedding_lr", "weight_decay", "world_size", "grad_accum_steps"]
    rows = [[k, s[k]] for k in keys if k in s]
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


def training_section(metrics: list[dict], plots: list[str], untrained_bpb: float | None = None) -> str:
    if not metrics:
        return "## Training\n\nNo metrics recorded yet.\n"
    last = metrics[-1]
    val = [m for m in metrics if m.get("val_bpb") is not None]
    rows = [["steps", last.get("step", 0)], ["final train loss (smoothed)", last.get("loss")],
            ["tokens seen", last.get("tokens")], ["training FLOPs", last.get("flops")]]
    if val:
        rows.append(["final val bpb", val[-1]["val_bpb"]])
        rows.append(["first val bpb (step %d)" % val[0]["step"], val[0]["val_bpb"]])
    if untrained_bpb is not None:
        rows.append(["untrained model val bpb", untrained_bpb])
    tps = [m["tok_per_sec"] for m in metrics[len(metrics) // 4:] if m.get("tok_per_sec")]
    if tps:
        rows.append(["median tok/s", sorted(tps)[len(tps) // 2]])
    mfus = [m["mfu"] for m in metrics[len(metrics) // 4:] if m.get("mfu") is not None]
    rows.append(["median MFU", f"{100 * sorted(mfus)[len(mfus) // 2]:.1f}%" if mfus else "n/a (no known GPU peak)"])
    text = "## Training\n\n" + md_table(["", ""], [[k, v if v is not None else "n/a"] for k, v in rows]) + "\n"
    for p in plots:
        text += f"\n![{p}]({p})\n"
    return text


def evaluation_section(result: dict | None, note: str | None = None) -> str:
    text = "## Evaluation\n\n"
    if result is None:
        return text + (note or "Not evaluated yet.") + "\n"
    rows = []
    if result.get("val_bpb") is not None:
        rows.append(["val bpb", result["val_bpb"]])
    if result.get("untrained_val_bpb") is not None:
        rows.append(["val bpb of the untrained model", result["untrained_val_bpb"]])
    if result.get("train_bpb") is not None:
        rows.append(["train bpb", result["train_bpb"]])
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


def chat_section(evals: dict[str, dict | None], sft: dict | None = None) -> str:
    """The chat phases: per-task accuracy and ChatCORE by phase (`evals`: "base" / "sft" / "rl" -> a
    scripts/chat_eval.py JSON, or None), the SFT masked val loss (`sft`: val_loss_start, val_loss, steps)
    and two sample conversations of the latest phase."""
    phases = [(ph, evals[ph]) for ph in ("base", "sft", "rl") if evals.get(ph)]
    text = "## Chat\n\n"
    if not phases:
        return text + "No chat evaluation yet.\n"
    tasks = list(dict.fromkeys(t for _, r in phases for t in r.get("tasks", {})))
    rows = [[t] + [r["tasks"][t]["accuracy"] if t in r.get("tasks", {}) else "-" for _, r in phases] for t in tasks]
    rows.append(["**ChatCORE**"] + [r["chatcore"] if r.get("chatcore") is not None else "-" for _, r in phases])
    text += md_table(["task"] + [ph.upper() if ph != "base" else "base" for ph, _ in phases], rows) + "\n"
    covered = next((r.get("chatcore_tasks") for _, r in reversed(phases) if r.get("chatcore") is not None), None)
    if covered:
        text += f"\nChatCORE over the tasks that ran: {', '.join(covered)}.\n"
    if "EmbeddedChat" in tasks:
        text += ("\nEmbeddedChat is the offline mix's held-out split (verse lookup, calculator arithmetic, letter "
                 "counting, identity): the share of replies with the right answer.\n")
    if sft and sft.get("val_loss") is not None and sft.get("val_loss_start") is not None:
        text += (f"\nSFT masked validation loss (nats per assistant token): {sft['val_loss_start']:.4f} before, "
                 f"{sft['val_loss']:.4f} after {sft.get('steps', '?')} steps.\n")
    samples = next((s for _, r in reversed(phases) for s in (r.get("samples") or {}).values() if s), [])
    if samples:
        text += f"\n### Sample conversations ({phases[-1][0]})\n\n"
        for s in samples[:2]:
            reply = s["reply"].strip().replace("\n", " / ")
            verdict = "right" if s["correct"] else "wrong"
            text += f"- **user:** {s['prompt'].strip()}\n  **assistant:** {reply} ({verdict})\n"
    return text


def timing_section(stage_seconds: dict[str, float], num_gpus: int) -> str:
    rows = [[k, f"{v:,.0f} s ({v / 60:.1f} min)"] for k, v in stage_seconds.items()]
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
