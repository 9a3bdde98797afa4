"""Write training logs as other programs write them, for the run doctor's tests (issue 28).

Each writer follows its program's public logging code: the Hugging Face Trainer through transformers'
own `TrainerState.save_to_json` and `GPT2Config.save_pretrained` (log_history keys as trainer.py
`_maybe_log_save_evaluate` logs them: `loss` = mean over `logging_steps`); TensorBoard through
torch.utils.tensorboard.SummaryWriter with the tags HF's TensorBoardCallback writes (`rewrite_logs`:
train/loss, eval/loss, train/learning_rate); llm.c's printf0 lines of train_gpt2.cu; modded-nanogpt's
print0 lines of train_gpt.py; this project's train_loop.py lines and sizing table; karpathy/nanochat's
base_train step line. Losses are synthetic with a known answer: L = E + B D^-beta (+ noise).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

E, B, BETA = 2.0, 400.0, 0.3


def loss_at(tokens, noise=0.0, rng=None):
    clean = E + B * np.asarray(tokens, dtype=float) ** -BETA
    return clean * (1 + noise * rng.standard_normal(np.shape(clean))) if noise else clean


def scheduled_loss(lrm, tokens_per_step, C=3e-4, noise=0.01, rng=None):
    """The loss of Tissue et al. 2024 under an LR schedule: E + B S1^-beta - C S2, S1 the LR-weighted tokens
    before each step, S2 the annealing area (momentum 0.999 of the LR drops). Step k: the loss of update k."""
    lrm = np.asarray(lrm, dtype=float)
    s1 = (np.cumsum(lrm) - 0.5 * lrm) * tokens_per_step
    m, acc, s2 = 0.0, 0.0, np.zeros(len(lrm))
    for i in range(1, len(lrm)):
        m = 0.999 * m + max(lrm[i - 1] - lrm[i], 0.0)
        acc += m
        s2[i] = acc
    clean = E + B * s1 ** -BETA - C * s2
    return clean * (1 + noise * rng.standard_normal(len(clean))) if rng is not None else clean


def write_hf_trainer(folder: Path, *, n_steps=600, logging_steps=10, eval_steps=100, tokens_per_step=65536,
                     n_layer=12, n_embd=768, name_or_path="gpt2", resid_pdrop=0.1, seed=0) -> Path:
    from transformers import GPT2Config
    from transformers.trainer_callback import TrainerState

    rng = np.random.default_rng(seed)
    ckpt = folder / f"checkpoint-{n_steps}"
    ckpt.mkdir(parents=True)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=12, resid_pdrop=resid_pdrop)
    cfg.save_pretrained(ckpt)
    cfg_json = (ckpt / "config.json").read_text().replace('"_name_or_path": ""', f'"_name_or_path": "{name_or_path}"')
    (ckpt / "config.json").write_text(cfg_json)
    state = TrainerState(global_step=n_steps, max_steps=n_steps, logging_steps=logging_steps, eval_steps=eval_steps,
                         train_batch_size=8, num_train_epochs=1)
    step_loss = loss_at((np.arange(n_steps) + 0.5) * tokens_per_step, 0.01, rng)  # the loss of update k (k = 0..)
    for s in range(logging_steps, n_steps + 1, logging_steps):
        state.log_history.append({"epoch": s / n_steps, "grad_norm": 1.0, "learning_rate": 5e-4,
                                  "loss": round(float(step_loss[s - logging_steps:s].mean()), 4), "step": s,
                                  "num_input_tokens_seen": s * tokens_per_step})
        if s % eval_steps == 0:
            state.log_history.append({"epoch": s / n_steps, "eval_loss": float(loss_at(s * tokens_per_step)) * 1.01,
                                      "eval_runtime": 1.0, "eval_samples_per_second": 100.0,
                                      "eval_steps_per_second": 10.0, "step": s})
    state.save_to_json(str(ckpt / "trainer_state.json"))
    return folder


# the scalar tags each trainer writes: (train loss, is it a mean over the log interval, val loss, lr, tokens)
TB_TAGS = {"hf": ("train/loss", True, "eval/loss", "train/learning_rate", "train/num_input_tokens_seen"),
           "megatron": ("lm loss", False, "lm loss validation", "learning-rate", None),
           "torchtitan": ("loss_metrics/global_avg_loss", False, "validation_metrics/loss", "lr", None)}


def write_tensorboard(folder: Path, *, n_steps=600, log_every=10, eval_every=100, tokens_per_step=65536, seed=0,
                      trainer="hf") -> Path:
    from torch.utils.tensorboard import SummaryWriter

    loss_tag, mean, val_tag, lr_tag, tok_tag = TB_TAGS[trainer]
    rng = np.random.default_rng(seed)
    step_loss = loss_at((np.arange(n_steps) + 0.5) * tokens_per_step, 0.01, rng)
    w = SummaryWriter(log_dir=str(folder))
    for s in range(log_every, n_steps + 1, log_every):
        w.add_scalar(loss_tag, float(step_loss[s - log_every:s].mean() if mean else step_loss[s - 1]), s)
        w.add_scalar(lr_tag, 5e-4, s)
        if tok_tag:
            w.add_scalar(tok_tag, s * tokens_per_step, s)
        if s % eval_every == 0:
            w.add_scalar(val_tag, float(loss_at(s * tokens_per_step)) * 1.01, s)
    w.close()
    return folder


def write_llmc(path: Path, *, n_steps=400, B=64, T=1024, L=12, C=768, V=50257, Vp=50304, device="NVIDIA H100 80GB HBM3",
               peak_tf=989.4, mfu_pct=40.0, lr=6e-4, warm=50, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    tps = B * T
    n_params = Vp * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    rows = [("train data pattern", "dev/data/fineweb10B/fineweb_train_*.bin"), ("micro batch size B", B),
            ("sequence length T", T), ("total batch size", tps), ("LR scheduler", "cosine"),
            ("learning rate (LR)", f"{lr:e}"), ("warmup iterations", warm), ("final LR fraction", f"{0.0:e}"),
            ("max_steps", n_steps), ("val_loss_every", 100)]
    out = ["+-----------------------+----------------------------------------------------+",
           "| Parameter             | Value                                              |",
           "+-----------------------+----------------------------------------------------+"]
    out += [f"| {k:<21} | {str(v):<50} |" for k, v in rows]
    out += [f"| {'device':<21} | {device:<50} |", f"| {'peak TFlops':<21} | {peak_tf:<50.1f} |",
            f"| {'precision':<21} | {'BF16':<50} |"]
    out += [f"| {k:<21} | {v:<50} |" for k, v in (("max_sequence_length T", T), ("vocab_size V", V),
                                                   ("padded_vocab_size Vp", Vp), ("num_layers L", L),
                                                   ("num_heads NH", 12), ("channels C", C), ("num_parameters", n_params))]
    out += [f"num_parameters: {n_params} => bytes: {2 * n_params}"]
    lrs = [lr * (s + 1) / warm if s < warm else lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (n_steps - warm)))
           for s in range(n_steps)]
    losses = scheduled_loss(np.array(lrs) / lr, tps, rng=rng)
    clean = scheduled_loss(np.array(lrs) / lr, tps)
    for step in range(n_steps + 1):
        last = step == n_steps
        if step % 100 == 0 or last:
            out.append(f"val loss {float(clean[min(step, n_steps - 1)]) * 1.005:f}")
        if last:
            break
        lr_s, loss = lrs[step], float(losses[step])
        mfu = mfu_pct * (1 + 0.01 * rng.standard_normal())
        out.append(f"step {step + 1:4d}/{n_steps} | loss {loss:7.6f} (+0.00z)| norm {1.0:6.4f} (+0.00z)| lr {lr_s:.2e} | "
                   f"{300.0:.2f} ms | {mfu:.1f}% bf16 MFU | {tps / 0.3:.0f} tok/s")
    path.write_text("\n".join(out) + "\n")
    return path


def write_modded_nanogpt(path: Path, *, n_steps=500, batch_size=8 * 64, sequence_length=1024, val_every=125,
                         with_train_loss=True, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    tps = batch_size * sequence_length
    src = ("@dataclass\nclass Hyperparameters:\n"
           f"    batch_size : int = {batch_size // 64}*64 # batch size, in sequences, across all devices\n"
           f"    sequence_length : int = {sequence_length} # sequence length, in tokens\n"
           f"    num_iterations : int = {n_steps} # number of iterations to run\n")
    out = [src, "=" * 100]
    t = 0.0
    for step in range(n_steps + 1):
        if step % val_every == 0 or step == n_steps:
            out.append(f"step:{step}/{n_steps} val_loss:{float(loss_at(max(step, 0.5) * tps)) * 1.01:.4f} "
                       f"train_time:{t:.0f}ms step_avg:{t / max(step, 1):.2f}ms")
        if step == n_steps:
            break
        t += 100.0
        loss = f"train_loss:{float(loss_at((step + 0.5) * tps, 0.01, rng)):.4f} " if with_train_loss else ""
        out.append(f"step:{step + 1}/{n_steps} {loss}train_time:{t:.0f}ms step_avg:{t / (step + 1):.2f}ms")
    path.write_text("\n".join(out) + "\n")
    return path


def write_nanochat_console(path: Path, *, n_steps=400, tokens_per_step=2**16, warm=40, warmdown=0.5, final=0.05,
                           params=(60_000_000, 25_000_000, 34_000_000, 1000), val_every=100, seed=0) -> Path:
    """nanochat/train_loop.py: sizing_table rows, then per step `step 00012/460 | loss ... (raw ...) | lrm ... | ...`
    and `step 00100 | val bpb ... | val loss ...`."""
    from nanochat.sizing import lr_multiplier

    rng = np.random.default_rng(seed)
    total, scaling, emb, scal = params
    rows = [("parameters (total)", f"{total:,}"), ("  scaling (block matrices + head)", f"{scaling:,}"),
            ("  embeddings (token + value)", f"{emb:,}"), ("  scalars", f"{scal:,}"), ("FLOPs per token", f"{6 * scaling:.4g}"),
            ("tokens per step", f"{tokens_per_step:,} = 32 x 2048 x 1 ranks x 1 accumulation"),
            ("steps", f"{n_steps:,} (from --num-iterations)"), ("total tokens", f"{n_steps * tokens_per_step:,}"),
            ("tokens : scaling params", f"{n_steps * tokens_per_step / scaling:.2f}"),
            ("schedule", f"warmup {warm}, warmdown {warmdown:g}, final {final:g}"),
            ("world size", "1 (NVIDIA GeForce RTX 4090)"), ("peak FLOP/s (MFU)", f"{165e12:.4g} dense bf16")]
    width = max(len(k) for k, _ in rows)
    out = ["=" * 80, "sizing"] + [f"  {k:<{width}}  {v}" for k, v in rows] + ["model:", "GPT(...)", "=" * 80,
                                                                               f"training steps 0 -> {n_steps}"]
    ema = 0.0
    lrms = np.array([lr_multiplier(k, n_steps, warm, warmdown, final) for k in range(n_steps)])
    losses, clean = scheduled_loss(lrms, tokens_per_step, rng=rng), scheduled_loss(lrms, tokens_per_step)
    for s in range(1, n_steps + 1):
        raw = float(losses[s - 1])
        ema = 0.9 * ema + 0.1 * raw
        smooth = ema / (1 - 0.9 ** s)
        lrm = lrms[s - 1]
        out.append(f"step {s:05d}/{n_steps} | loss {smooth:.4f} (raw {raw:.4f}) | lrm {lrm:.3f} | dt 300ms | "
                   f"tok/s {tokens_per_step / 0.3:,.0f} | mfu {45.0 * (1 + 0.01 * rng.standard_normal()):.2f}% | mem 9000MB | eta 1.0m")
        if s % val_every == 0:
            v = float(clean[min(s, n_steps - 1)]) * 1.01
            out.append(f"step {s:05d} | val bpb {v / (math.log(2) * 4.2):.6f} | val loss {v:.4f}")
    path.write_text("\n".join(out) + "\n")
    return path


def write_sft_console(path: Path, *, n_steps=300, train_loss=0.888, val_over_train=0.31, eval_every=50, seed=0) -> Path:
    """nanochat/chat_sft.py's `say` line: `step 00012 | loss ... (raw ...) | lrm ... | epoch ... | dt ...ms[ | val loss ...]`."""
    rng = np.random.default_rng(seed)
    out, ema = [], 0.0
    for s in range(1, n_steps + 1):
        raw = train_loss * (1 + 0.01 * rng.standard_normal())
        ema = 0.9 * ema + 0.1 * raw
        line = (f"step {s:05d} | loss {ema / (1 - 0.9 ** s):.4f} (raw {raw:.4f}) | lrm {1 - s / n_steps:.3f} | "
                f"epoch {s / n_steps:.3f} | dt 250ms")
        if s % eval_every == 0:
            line += f" | val loss {train_loss * (1 + val_over_train):.4f}"
        out.append(line)
    path.write_text("\n".join(out) + "\n")
    return path


def write_karpathy_nanochat(path: Path, *, n_steps=2000, every=1, tokens_per_step=524288, warmdown=0.2, seed=0) -> Path:
    """karpathy/nanochat base_train: the debiased EMA (0.9) step line; `every` > 1 keeps one line in `every`
    (a log that was thinned, or a terminal that dropped lines)."""
    rng = np.random.default_rng(seed)
    out = ["GPU: NVIDIA H100 80GB HBM3 | Peak FLOPS (BF16): 9.89e+14", "Vocab size: 32,768", "Parameter counts:",
           f"{'wte':24s}: {25_165_824:,}", f"{'transformer_matrices':24s}: {50_331_648:,}", f"{'lm_head':24s}: {25_165_824:,}",
           f"{'total':24s}: {100_663_296:,}", f"Calculated number of iterations from target data:param ratio: {n_steps:,}",
           f"Total number of training tokens: {n_steps * tokens_per_step:,}",
           f"Total batch size {tokens_per_step:,} => gradient accumulation steps: 1"]
    smooth = 0.0
    for step in range(n_steps):
        raw = float(loss_at((step + 0.5) * tokens_per_step, 0.01, rng))
        smooth = 0.9 * smooth + 0.1 * raw
        deb = smooth / (1 - 0.9 ** (step + 1))
        frac = step / n_steps
        lrm = 1.0 if frac < 1 - warmdown else max(0.0, (1 - frac) / warmdown)
        if step % 250 == 0:
            out.append(f"Step {step:05d} | Validation bpb: {float(loss_at(max(step, 1) * tokens_per_step)) / 3:.6f}")
        if step % every == 0:
            out.append(f"step {step:05d}/{n_steps:05d} ({100 * step / n_steps:.2f}%) | loss: {deb:.6f} | grad norm: 0.5000 | "
                       f"lrm: {lrm:.2f} | dt: 400.00ms | tok/sec: {tokens_per_step * 2:,} | bf16_mfu: 45.00 | "
                       f"epoch: 1 pq: 0 rg: 0 | total time: 1.00m")
    path.write_text("\n".join(out) + "\n")
    return path


def write_sft_run(folder: Path, val_over_train: float, train_loss: float = 0.888, seed=0) -> Path:
    """An SFT run folder as nanochat/chat_sft.py writes it (flags under "config", the "source" checkpoint)."""
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"config": {"num_epochs": 3}, "source": {"phase": "base", "tag": "d12"},
                                                 "sizing": {"tokens_per_step": 8192}}))
    rng = np.random.default_rng(seed)
    lines = []
    for s in range(1, 301):
        raw = train_loss * (1 + 0.01 * rng.standard_normal())
        m = {"step": s, "loss": raw, "raw_loss": raw, "lr": 1.0}
        if s % 100 == 0:
            m["val_loss"] = train_loss * (1 + val_over_train)
        lines.append(json.dumps(m))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def main(out: str) -> None:
    """One example run per format under `out` (README's doctor section runs the doctor on them)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    made = [write_hf_trainer(root / "hf-gpt2-124M"), write_tensorboard(root / "tb-runs"), write_llmc(root / "llmc.log"),
            write_modded_nanogpt(root / "modded-nanogpt.txt"), write_nanochat_console(root / "base_train.log"),
            write_karpathy_nanochat(root / "karpathy-base_train.log", every=7),
            write_sft_run(root / "chatsft_checkpoints" / "d12", 1.1626 / 0.8880 - 1)]
    print("\n".join(str(p) for p in made))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "example-runs")
