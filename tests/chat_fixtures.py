"""A tiny chat setup for the front-end tests: a real tokenizer and two real GPT checkpoints.

- `chatsft_checkpoints/tiny` (so `--source sft` is exercised): a depth-1 GPT trained here, in a few
  seconds, until it reproduces CONVERSATIONS greedily: one reply has an emoji (split across byte
  tokens by this ASCII-trained tokenizer), one calls the calculator.
- `base_checkpoints/long`: an untrained GPT with a 4096-token context whose stop tokens are
  (practically) never sampled, for replies that run as long as asked (cancellation, concurrency).

Built once per test session by `chat_base_dir(tmp_path_factory)`; `shared_server(base, kind)` starts
`scripts/chat_web.py` once per session for each of the two ("sft": 2 workers, temperature 0 by default;
"long": 1 worker), stopped at exit.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EMOJI_REPLY = "Hello there 😀 how are you?"
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": EMOJI_REPLY}],
    [{"role": "user", "content": "What is 12 times 3?"},
     {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "python", "text": "12*3"},
                                       {"type": "python_output", "text": "36"}, {"type": "text", "text": ", so 36."}]}],
]
TEXTS = ["Hello there, how are you today? I am fine, thank you.", "What is 12 times 3? It is 36.",
         "The quick brown fox jumps over the lazy dog.", "Count the letters: strawberry has three r letters."] * 30

_CACHE: dict[str, Path] = {}


def _save(model, base: Path, phase_dirname: str, tag: str) -> None:
    from nanochat.checkpoint_manager import save_checkpoint

    save_checkpoint(base / phase_dirname / tag, 1, model.state_dict(), None,
                    {"model_config": model.config.to_dict(), "model_tag": tag})


def _memorized_model(tok):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=tok.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    rows = [tok.render_conversation({"messages": c}) for c in CONVERSATIONS]
    T = max(len(ids) for ids, _ in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        x[i, :len(ids)] = torch.tensor(ids)
        targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        y[i, :len(targets)] = torch.tensor(targets)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for _ in range(300):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    return model.eval()


def _endless_model(tok):
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(1)
    config = GPTConfig(sequence_len=4096, vocab_size=tok.get_vocab_size(), n_layer=2, n_head=3, n_kv_head=3, n_embd=192)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)  # logits with a wide spread (std ~5 after the cap) ...
        for name in ("<|assistant_end|>", "<|bos|>"):
            model.lm_head.weight[tok.encode_special(name)] = 0.0  # ... and a stop token at 0: p ~ 1e-8
    return model.eval()


def chat_base_dir(tmp_path_factory) -> Path:
    if "base" in _CACHE:
        return _CACHE["base"]
    from nanochat.tokenizer import Tokenizer

    base = tmp_path_factory.mktemp("chat_base")
    tok = Tokenizer.train_from_iterator(TEXTS, vocab_size=340)
    tok.save(base / "tokenizer")
    _save(_memorized_model(tok), base, "chatsft_checkpoints", "tiny")
    _save(_endless_model(tok), base, "base_checkpoints", "long")
    _CACHE["base"] = base
    return base


def subprocess_env(base: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NANOCHAT_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(NANOCHAT_BASE_DIR=str(base), PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", LANG="C.UTF-8",
               LC_ALL="C.UTF-8", PYTHONUNBUFFERED="1", NANOCHAT_DEVICE="cpu")
    env.update(extra)
    return env


class Server:
    """`python -m scripts.chat_web ...` on a free port, as a user would start it."""

    def __init__(self, base: Path, *flags: str):
        import httpx

        from tests.helpers import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / f"server_{self.port}.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "--port", str(self.port), *flags],
                                     cwd=REPO_ROOT, env=subprocess_env(base), stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chat_web exited with {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.close()
        raise RuntimeError(f"chat_web did not answer /health within 60 s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def close(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


SERVER_FLAGS = {"sft": ("--source", "sft", "--num-workers", "2", "--temperature", "0"),
                "long": ("--source", "base", "--model-tag", "long", "--num-workers", "1")}
_SERVERS: dict[str, Server] = {}


def shared_server(base: Path, kind: str) -> Server:
    if kind not in _SERVERS:
        _SERVERS[kind] = Server(base, *SERVER_FLAGS[kind])
        atexit.register(_SERVERS[kind].close)
    return _SERVERS[kind]
