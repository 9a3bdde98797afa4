"""Chat serving speed: time to first token and tokens/s for 1, 4 and 8 concurrent streams through the real
server (`python -m scripts.chat_web` in a subprocess, streamed SSE read from the socket), against batch-1
generation of the same replies with the Engine directly (no server, one after another).

    python benchmarks/bench_chat_serve.py                                  # a synthetic d4 model on CPU
    python benchmarks/bench_chat_serve.py --batch-sizes 1,8 --rounds 3 --out benchmarks/results/chat_serve.md
    python benchmarks/bench_chat_serve.py --trees .,/tmp/old-nanochat      # this code against another checkout
    python benchmarks/bench_chat_serve.py --source sft --model-tag d12    # a trained checkpoint

The synthetic model (random weights, a tokenizer trained on this package's source) never samples a stop
token, so every reply is exactly --max-tokens long and the measurements compare like with like; it is
saved as a checkpoint so that every server under test loads the same one, as a user would start it.
`--trees` starts one server per source tree and batch size (e.g. a checkout of an older commit made
with `git archive`), so two versions of the server are measured side by side. Rounds interleave the
baseline and every server, so load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.engine import Engine  # noqa: E402

PROMPT = "Tell me a story about a quick brown fox and a lazy dog."


def synthetic_model(depth: int, seq_len: int):
    """(model, tokenizer): random weights whose stop tokens are never sampled, a small trained tokenizer."""
    from nanochat.gpt import GPT
    from nanochat.sizing import model_config
    from nanochat.tokenizer import Tokenizer

    # any real text will do for a tokenizer that only has to exist: this package's own source
    texts = [f.read_text() for f in sorted(Path(__file__).resolve().parents[1].glob("nanochat/*.py"))]
    tok = Tokenizer.train_from_iterator(texts, vocab_size=1024)
    config = model_config(depth, aspect_ratio=64, head_dim=64, max_seq_len=seq_len, vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tok.encode_special(name)] = 0.0
    return model.eval(), tok


def save_synthetic(model, tok, base: Path, tag: str) -> None:
    from nanochat.checkpoint_manager import save_checkpoint

    tok.save(base / "tokenizer")
    save_checkpoint(base / "base_checkpoints" / tag, 1, model.state_dict(), None,
                    {"model_config": model.config.to_dict(), "model_tag": tag})


def start_server(tree: Path, base: Path, source: str, tag: str | None, step: int | None, batch_size: int,
                 threads: int, log: Path):
    """`python -m scripts.chat_web` from source tree `tree` on a free port; (process, url)."""
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads),
               NANOCHAT_DEVICE="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "scripts.chat_web", "--port", str(port), "--batch-size", str(batch_size),
           "--source", source, "-t", "1.0", "-k", "50", "--device-type", "cpu"]
    cmd += ["--model-tag", tag] if tag else []
    cmd += ["--step", str(step)] if step is not None else []
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chat_web from {tree} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"chat_web from {tree} did not start: {log.read_text()[-2000:]}")


async def one_stream(client, url, max_tokens, seed):
    from nanochat.chat_server import SSEReader

    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens, "stream": True,
            "seed": seed, "temperature": 1.0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    reader = SSEReader()
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for chunk in r.aiter_raw():
            for data in reader.feed(chunk):
                if data == "[DONE]":
                    continue
                obj = json.loads(data)
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                elif first is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    end = time.perf_counter()
    return dict(ttft=first - t0, total=end - t0, tokens=tokens, decode=(tokens - 1) / (end - first))


async def concurrent(url, n, max_tokens, round_i):
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[one_stream(client, url, max_tokens, 1000 * round_i + i) for i in range(n)])
        wall = time.perf_counter() - t0
    return dict(ttft=[r["ttft"] for r in rs], tokens=sum(r["tokens"] for r in rs), wall=wall,
                per_stream=[r["tokens"] / r["total"] for r in rs])


def baseline(engine, tok, context, n, max_tokens, round_i):
    """The same n replies, batch 1, one after another, straight from the engine."""
    from nanochat.chat_session import fit_prompt

    prompt = fit_prompt(tok, [{"role": "user", "content": PROMPT}], context, max_tokens).tokens
    ttft, tokens = [], 0
    t0 = time.perf_counter()
    for i in range(n):
        ts = time.perf_counter()
        for step, _ in enumerate(engine.generate(prompt, max_tokens=max_tokens, temperature=1.0, top_k=50,
                                                 seed=1000 * round_i + i)):
            if step == 0:
                ttft.append(time.perf_counter() - ts)
            tokens += 1
    return dict(ttft=ttft, tokens=tokens, wall=time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None, help="load a checkpoint (base/sft/rl) instead of the synthetic model")
    p.add_argument("--model-tag", default=None)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--depth", type=int, default=4, help="synthetic model depth (width 64 x depth)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--trees", default=".", help="comma-separated source trees to start servers from (default: this one)")
    p.add_argument("--batch-sizes", default="8",
                   help="comma-separated --batch-size values to measure (rows a worker decodes together)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a loaded 2-core machine, 2 OpenMP threads decoded ~30x slower)")
    p.add_argument("--out", default=None, help="write the markdown table here too")
    args = p.parse_args()
    import tempfile

    if args.threads:
        torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.concurrency.split(",")]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="bench_chat_serve_"))

    if args.source:
        from nanochat.chat_session import load_chat_model

        model, tok, _, name = load_chat_model(args.source, "cpu", args.model_tag, args.step)
        base, source, tag, step = Path(os.environ.get("NANOCHAT_BASE_DIR", "")), args.source, args.model_tag, args.step
    else:
        model, tok = synthetic_model(args.depth, args.seq_len)
        name = f"synthetic-d{args.depth}"
        base, source, tag, step = workdir, "base", name, None
        save_synthetic(model, tok, base, tag)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {name}: {n_params / 1e6:.1f}M parameters, context {model.config.sequence_len}, "
          f"{args.max_tokens} tokens per reply, torch threads {torch.get_num_threads()}", flush=True)
    engine = Engine(model, tok)
    servers = {}
    for t, tree in enumerate(trees):
        for b in batch_sizes:
            label = f"{tree.name or tree}" if len(trees) > 1 else "server"
            servers[(label, b)] = start_server(tree, base, source, tag, step, b, args.threads,
                                               workdir / f"server_{t}_{b}.log")

    rows: dict[tuple, list] = {}
    try:
        for r in range(args.rounds):
            for n in levels:
                b = baseline(engine, tok, model.config.sequence_len, n, args.max_tokens, r)
                rows.setdefault(("batch-1 engine", "-", n), []).append(b)
                for (label, bs), (_, url) in servers.items():
                    res = asyncio.run(concurrent(url, n, args.max_tokens, r))
                    rows.setdefault((label, bs, n), []).append(res)
                print(f"round {r + 1}/{args.rounds}, {n} streams done", flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)

    load = os.getloadavg()
    lines = [f"model {name} ({n_params / 1e6:.1f}M params, context {model.config.sequence_len}), "
             f"{args.max_tokens} tokens per reply, {args.rounds} interleaved rounds, torch threads "
             f"{torch.get_num_threads()}, load average at the end {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)", "",
             "| path | batch | streams | TTFT median ms | TTFT max ms | aggregate tok/s | per-stream tok/s |",
             "|---|---|---|---|---|---|---|"]
    for (path, bs, n), rs in rows.items():
        ttft = [t for rr in rs for t in rr["ttft"]]
        agg = statistics.median(rr["tokens"] / rr["wall"] for rr in rs)
        per = statistics.median(x for rr in rs for x in rr["per_stream"]) if "per_stream" in rs[0] else agg
        lines.append(f"| {path} | {bs} | {n} | {statistics.median(ttft) * 1e3:.0f} | "
                     f"{max(ttft) * 1e3:.0f} | {agg:.0f} | {per:.0f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
