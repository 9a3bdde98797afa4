"""Where a CPU training step goes in fp32 and in bf16, op by op, interleaved.

    python benchmarks/bench_cpu_dtype.py            # depth 4, seq 256, 8 x 256 tokens, 32K vocab
    python benchmarks/bench_cpu_dtype.py --reps 7 --vocab-size 4096

Prints the dtype probe's measurement (nanochat.common.probe_cpu_dtype at this model's shapes, not
cached) and then, for each piece of the step, the median forward+backward time in float32 and in
bfloat16 over --reps rounds in which the two dtypes alternate (so a competing process slows both
alike): the block matmuls, RMSNorm, rotary, attention (SDPA), ReLU^2, the chunked LM-head loss
(nanochat.lm_loss), one whole forward+backward of the GPT, and Muon's orthogonalisation of the
model's stacked matrices (nanochat.optim.orthogonalize).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    import torch
    import torch.nn.functional as F

    from nanochat import sizing
    from nanochat.common import _cpu_name, matmul_probe_shapes, probe_cpu_dtype
    from nanochat.gpt import GPT, apply_rotary, rms_norm
    from nanochat.lm_loss import linear_softcap_cross_entropy
    from nanochat.optim import orthogonalize

    B, T = args.device_batch_size, args.max_seq_len
    config = sizing.model_config(args.depth, max_seq_len=T, vocab_size=args.vocab_size)
    C, H, D, V = config.n_embd, config.n_head, config.head_dim, config.padded_vocab_size
    probe = probe_cpu_dtype(matmul_probe_shapes(C, B * T, V), refresh=True)
    print(f"{_cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads; load {os.getloadavg()}")
    print(f"probe: {probe.summary()}")
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(0, args.vocab_size, (B * T,), generator=gen)
    idx = torch.randint(0, args.vocab_size, (B, T + 1), generator=gen)
    models = {}
    for dt in (torch.float32, torch.bfloat16):
        m = GPT(config, compute_dtype=dt)
        m.init_weights()
        models[dt] = m
    models[torch.bfloat16].load_state_dict(models[torch.float32].state_dict())
    stacks = {}
    for name, p_ in models[torch.float32].blocks.named_parameters():
        stacks.setdefault(tuple(p_.shape), []).append(p_.detach())

    def pieces(dt):
        leaf = lambda *s: torch.randn(*s, generator=gen).to(dt).requires_grad_()
        x, hid, q = leaf(B * T, C), leaf(B * T, 4 * C), leaf(B, T, H, D)
        qh = leaf(B, H, T, D)
        w1, w2 = torch.randn(4 * C, C, generator=gen), torch.randn(C, 4 * C, generator=gen)
        head_x, head_w = leaf(B * T, C), (torch.randn(V, C, generator=gen) * 0.05).requires_grad_()
        m = models[dt]
        cos, sin = m.cos[:, :T].to(dt), m.sin[:, :T].to(dt)
        return {
            "block matmuls (C->4C->C, fwd+bwd)": lambda: F.linear(F.linear(x, w1.to(dt)), w2.to(dt)).float().sum().backward(),
            "RMSNorm (B*T, 4C)": lambda: rms_norm(hid).float().sum().backward(),
            "rotary (B, T, H, D)": lambda: apply_rotary(q, cos, sin).float().sum().backward(),
            "SDPA causal (B, H, T, D)": lambda: F.scaled_dot_product_attention(qh, qh, qh, is_causal=True).float().sum().backward(),
            "ReLU^2 (B*T, 4C)": lambda: F.relu(hid).square().float().sum().backward(),
            "LM head + soft-cap + CE (lm_loss)": lambda: linear_softcap_cross_entropy(
                head_x, head_w, targets, vocab_size=args.vocab_size, softcap=15.0).backward(),
            "whole GPT forward+backward": lambda: m(idx[:, :-1], idx[:, 1:]).backward(),
            "Muon orthogonalisation (all stacks)": lambda: [orthogonalize(torch.stack(ps), dtype=dt) for ps in stacks.values()],
        }

    fns = {dt: pieces(dt) for dt in (torch.float32, torch.bfloat16)}
    times = {dt: {k: [] for k in pcs} for dt, pcs in fns.items()}
    for pieces_of_dtype in fns.values():  # warm-up (oneDNN kernel generation, first-touch allocations)
        for f in pieces_of_dtype.values():
            f()
    for _ in range(args.reps):
        for name in fns[torch.float32]:
            for dt in (torch.float32, torch.bfloat16):
                t0 = time.perf_counter()
                fns[dt][name]()
                times[dt][name].append(time.perf_counter() - t0)
        for m in models.values():
            m.zero_grad(set_to_none=True)
    print(f"\n| piece (depth {args.depth}, {B}x{T} tokens, vocab {args.vocab_size:,}) | fp32 ms | bf16 ms | fp32 / bf16 |")
    print("|---|---|---|---|")
    for name in fns[torch.float32]:
        a, b = (statistics.median(times[dt][name]) * 1000 for dt in (torch.float32, torch.bfloat16))
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
