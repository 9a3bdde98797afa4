"""Serve a trained model: a chat page at / and an OpenAI-compatible API (/v1/chat/completions, /v1/completions).

    python -m scripts.chat_web                          # latest SFT model on http://127.0.0.1:8000
    python -m scripts.chat_web --source base --model-tag d12 --step 5000 --port 8080   # a base model: completions
    python -m scripts.chat_web --num-workers 8          # 8 GPUs: one model each, requests queued

Any OpenAI client works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="nanochat", messages=[{"role": "user", "content": "Hi"}], stream=True)

It binds to 127.0.0.1 unless --host says otherwise (--host 0.0.0.0 exposes it to the network: there
is no authentication). See nanochat/chat_server.py for the endpoints and limits.
"""

from __future__ import annotations

import argparse
import copy
import socket
import sys
from pathlib import Path

if not __package__:  # `python scripts/chat_web.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nanochat.chat_session import SOURCES, ChatError, load_chat_model  # noqa: E402
from nanochat.common import autodetect_device_type  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from scripts.flags import add_checkpoint_flags  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Web chat UI and OpenAI-compatible API for a nanochat model")
    add_checkpoint_flags(p, SOURCES)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="models serving requests in parallel: one per GPU (default: all), copies on CPU (default 1)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows each worker decodes together (continuous batching: a request's n choices are rows; "
                        "capped so its KV cache fits the memory budget; 1: one request at a time)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for free rows; beyond that a request gets a 503 (default 256)")
    p.add_argument("-t", "--temperature", type=float, default=0.6, help="default temperature of requests (0.6)")
    p.add_argument("-k", "--top-k", type=int, default=50, help="default top-k of requests (50)")
    p.add_argument("--max-tokens", type=int, default=512, help="default max_tokens of requests (512)")
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    return p


def load_engines(args) -> tuple[list[Engine], str]:
    device_type = autodetect_device_type(args.device_type)
    if device_type == "cuda":
        n_gpu = torch.cuda.device_count()
        n = args.num_workers or n_gpu
        if n > n_gpu:
            raise ChatError(f"--num-workers {n} needs {n} GPUs but {n_gpu} are visible: one model per GPU")
        devices = [torch.device(f"cuda:{i}") for i in range(n)]
    else:
        devices = [torch.device(device_type)] * (args.num_workers or 1)
    engines, name = [], None
    for i, device in enumerate(devices):
        if i and device == devices[0]:  # CPU / MPS: copies of the model already loaded
            engines.append(Engine(copy.deepcopy(engines[0].model), engines[0].tokenizer))
            continue
        model, tokenizer, _, name = load_chat_model(args.source, device, args.model_tag, args.step)
        engines.append(Engine(model, tokenizer))
        print(f"chat_web: worker {i}: {name} on {device}", flush=True)
    return engines, name


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_queue < 0:
        p.error(f"--max-queue {args.max_queue} must be >= 0")
    if args.num_workers is not None and args.num_workers < 1:
        p.error(f"--num-workers {args.num_workers} must be >= 1")
    if not 0 <= args.port <= 65535:
        p.error(f"--port {args.port} must be between 0 and 65535")
    import uvicorn

    from nanochat.chat_server import create_app

    try:  # the port first: a busy one should not cost a model load to find out
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"chat_web: cannot listen on {args.host}:{args.port}: {e.strerror or e} (is another server running "
              f"there? pick another --port)", file=sys.stderr)
        return 2
    try:
        engines, name = load_engines(args)
        app = create_app(engines, name, temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens,
                         batch_size=args.batch_size, max_queue=args.max_queue)
    except (ChatError, ValueError, RuntimeError) as e:
        print(f"chat_web: {e}", file=sys.stderr)
        sock.close()
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"chat_web: WARNING: listening on {args.host}: anyone who can reach this machine can use the model "
              f"(there is no authentication)", flush=True)
    print(f"chat_web: {len(engines)} worker(s) x {app.state.pool.workers[0].rows} request(s) decoded together; open http://{args.host}:{args.port}/ "
          f"(API: http://{args.host}:{args.port}/v1)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, handed to uvicorn (so nothing can take the port meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
