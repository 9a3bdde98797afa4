"""Chat-eval throughput on CPU: categorical problems/s batched vs one at a time (same decisions), and
generation tokens/s of batched sampling (several samples of one prompt per forward) vs batch 1.

Real questions (the shared MMLU dev rows, 272), a tokenizer trained on the embedded chat mix, and a
randomly initialised GPT (throughput does not depend on what the weights know). The two settings run
interleaved, round after round, so that load on a shared machine hits both alike.

    python benchmarks/bench_chat_eval.py --depth 4 --rounds 3
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.chat_eval import categorical_predictions  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.tasks import MMLU  # noqa: E402
from tests.chat_helpers import chat_tokenizer  # noqa: E402

SHARED = Path(os.environ.get("NANOCHAT_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--problems", type=int, default=272)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gen-samples", type=int, default=8)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    rows = SHARED / "chat" / "mmlu_dev.jsonl"
    if not rows.exists():
        sys.exit(f"needs {rows} (the shared MMLU dev rows); set NANOCHAT_SHARED_DATA")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "mmlu").mkdir()
        (Path(d) / "mmlu" / "test.jsonl").write_text(rows.read_text())
        task = MMLU("all", "test", task_data=d)
        convs = [task[i] for i in range(min(args.problems, len(task)))]
    tok = chat_tokenizer(args.vocab_size)
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=2048, vocab_size=tok.get_vocab_size(), n_layer=args.depth,
                       n_head=max(1, args.width // 64), n_kv_head=max(1, args.width // 64), n_embd=args.width)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randn_like(prm) * 0.05)
    model.eval()
    prompt_tokens = sum(len(tok.render_for_completion(c)) for c in convs)
    # batches of similar lengths, as run_categorical forms them
    convs.sort(key=lambda c: len(tok.render_for_completion(c)))

    cat = {"batched": [], "single": []}
    decisions = {}
    for _ in range(args.rounds):
        for mode in ("batched", "single"):
            t0 = time.perf_counter()
            if mode == "batched":
                preds = [x for s in range(0, len(convs), args.batch_size)
                         for x in categorical_predictions(model, tok, convs[s:s + args.batch_size])]
            else:
                preds = [categorical_predictions(model, tok, [c])[0] for c in convs]
            cat[mode].append(len(convs) / (time.perf_counter() - t0))
            decisions[mode] = preds

    engine = Engine(model, tok)
    prompt = tok.render_for_completion(convs[0])
    gen = {"batched": [], "single": []}
    for _ in range(args.rounds):
        for mode in ("batched", "single"):
            t0 = time.perf_counter()
            if mode == "batched":
                seqs, _ = engine.generate_batch(prompt, num_samples=args.gen_samples, max_tokens=args.gen_tokens,
                                                temperature=1.0, stop_tokens=[])
            else:
                seqs = [engine.generate_batch(prompt, num_samples=1, max_tokens=args.gen_tokens, temperature=1.0,
                                              seed=s, stop_tokens=[])[0][0] for s in range(args.gen_samples)]
            new = sum(len(s) - len(prompt) for s in seqs)
            gen[mode].append(new / (time.perf_counter() - t0))

    best = {k: max(v) for k, v in cat.items()}
    out = {"problems": len(convs), "prompt_tokens": prompt_tokens, "batch_size": args.batch_size,
           "depth": args.depth, "width": args.width, "vocab": tok.get_vocab_size(), "threads": torch.get_num_threads(),
           "load_avg": os.getloadavg()[0],
           "categorical_problems_per_s": cat, "categorical_speedup_best": best["batched"] / best["single"],
           "categorical_speedup_per_round": [b / s for b, s in zip(cat["batched"], cat["single"])],
           "identical_decisions": decisions["batched"] == decisions["single"],
           "generation_tokens_per_s": gen, "gen_samples": args.gen_samples, "gen_prompt_tokens": len(prompt),
           "generation_speedup_per_round": [b / s for b, s in zip(gen["batched"], gen["single"])]}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"categorical: {len(convs)} MMLU problems ({prompt_tokens:,} prompt tokens), d{args.depth} w{args.width}, "
          f"batch {args.batch_size}, load {out['load_avg']:.1f}")
    for i in range(args.rounds):
        print(f"  round {i + 1}: batched {cat['batched'][i]:.1f} problems/s, one at a time {cat['single'][i]:.1f} "
              f"problems/s -> x{out['categorical_speedup_per_round'][i]:.2f}")
    print(f"  identical decisions: {out['identical_decisions']}")
    print(f"generation: {args.gen_samples} samples x {args.gen_tokens} tokens from a {len(prompt)}-token prompt")
    for i in range(args.rounds):
        print(f"  round {i + 1}: batched {gen['batched'][i]:.0f} tok/s, batch 1 {gen['single'][i]:.0f} tok/s -> "
              f"x{out['generation_speedup_per_round'][i]:.2f}")


if __name__ == "__main__":
    main()
