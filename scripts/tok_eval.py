"""Compression of the trained tokenizer: bytes per token on several kinds of text, against GPT-2,
GPT-4 (cl100k_base) and our own tokenizers of other vocabulary sizes.

    python scripts/tok_eval.py
    python scripts/tok_eval.py --compare /path/base_8k/tokenizer --text-dir my_texts/
"""

import argparse
import sys
import threading
from pathlib import Path

if not __package__:  # `python scripts/tok_eval.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.common import env_rank, print0  # noqa: E402
from nanochat.tokenizer import Tokenizer, TokenizerError, get_tokenizer_dir, iter_text_files  # noqa: E402

# Small samples written for this evaluation (not taken from any corpus).
SAMPLES = {
    "web prose": """\
Our neighbourhood bakery opened a second shop last spring, and the queue on Saturday mornings
still reaches the corner. The owners say the secret is patience: the dough rests for two days
before it is baked, which gives the crust its colour and the crumb its open, chewy texture.
If you visit, arrive before nine o'clock, bring cash, and try the rye loaf with caraway seeds.
Opening hours: Tue-Sun, 7:30am-3pm. Parking is limited, so the bus (line 14) is the easier option.
Reviews have been overwhelmingly positive - 4.8 stars from 1,274 ratings - though a few visitors
complained that the croissants had sold out by ten.""",
    "code": '''\
import json
from pathlib import Path


def load_config(path: str | Path, overrides: dict | None = None) -> dict:
    """Read a JSON config file and apply keyword overrides on top."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    for key, value in (overrides or {}).items():
        if key not in config:
            raise KeyError(f"unknown config key {key!r}; known: {sorted(config)}")
        config[key] = value
    return config


class RunningMean:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, x: float, n: int = 1) -> float:
        self.total += x * n
        self.count += n
        return self.total / max(self.count, 1)
''',
    "math/LaTeX": r"""\
Let $f:\mathbb{R}^n \to \mathbb{R}$ be convex and $L$-smooth, i.e. $\|\nabla f(x) - \nabla f(y)\|_2 \le L\|x - y\|_2$.
Gradient descent with step size $\eta = 1/L$ satisfies
\begin{equation}
  f(x_T) - f(x^\star) \le \frac{L \|x_0 - x^\star\|_2^2}{2T}.
\end{equation}
\begin{proof}
By smoothness, $f(x_{t+1}) \le f(x_t) - \frac{1}{2L}\|\nabla f(x_t)\|^2$. Summing over $t = 0, \dots, T-1$
and using convexity, $\sum_{t} \left(f(x_{t+1}) - f^\star\right) \le \frac{L}{2}\|x_0 - x^\star\|^2$. \qed
\end{proof}
For example, $\int_0^1 x^2\,dx = \tfrac{1}{3}$ and $\sum_{k=1}^{\infty} k^{-2} = \pi^2/6 \approx 1.6449$.""",
    "non-English": """\
Le petit déjeuner était servi à huit heures précises ; personne n'osait arriver en retard.
Die Straßenbahn fährt alle zehn Minuten, außer sonntags, wenn sie nur stündlich verkehrt.
El mercado abre temprano y las frutas más frescas se venden antes del mediodía.
Поезд прибыл на станцию с опозданием на двадцать минут из-за снегопада.
今日は朝から雨が降っていたので、図書館で本を読んで過ごしました。
我们明天下午三点在学校门口见面，然后一起去博物馆参观。
오늘 저녁에는 친구들과 함께 새로 생긴 식당에 가기로 했어요.
Η θάλασσα ήταν ήρεμη και τα παιδιά έπαιζαν στην ακτή μέχρι το σούρουπο.""",
}


def load_tiktoken_baseline(name: str, timeout_s: float = 15.0):
    """tiktoken.get_encoding(name), or (None, reason) when it cannot be had offline within timeout_s.

    tiktoken downloads its files on first use; a thread with a timeout keeps a network that drops
    packets (instead of refusing them) from hanging the evaluation.
    """
    import tiktoken

    result: dict = {}

    def load():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # noqa: BLE001 - any failure means "not available offline"
            msg = str(e).splitlines()[0] if str(e) else ""
            result["err"] = f"{type(e).__name__}: {msg[:60]}{'...' if len(msg) > 60 else ''}"

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout_s)
    if "enc" in result:
        return result["enc"], None
    return None, result.get("err", f"timed out after {timeout_s:.0f}s")


def validation_texts(max_docs: int):
    """Documents of the pretraining validation split, or None when nanochat.dataset / its shards are absent."""
    try:
        from nanochat import dataset

        if not dataset.list_shards("val"):
            return None
        texts = []
        for text in dataset.iter_documents(split="val"):
            texts.append(text)
            if len(texts) >= max_docs:
                break
        return texts or None
    except Exception:  # noqa: BLE001 - the split is optional here
        return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer-dir", default=None, help="tokenizer to evaluate (default <base dir>/tokenizer)")
    p.add_argument("--compare", nargs="*", default=[], metavar="DIR", help="other saved tokenizer dirs to compare")
    p.add_argument("--text-dir", default=None, help="folder (or file) of .txt/.jsonl/.parquet texts: one row per file")
    p.add_argument("--val-docs", type=int, default=500, help="validation-split documents to use")
    p.add_argument("--no-baselines", action="store_true", help="skip GPT-2 / GPT-4 even if tiktoken has them")
    args = p.parse_args(argv)
    if env_rank() != 0:  # under torchrun, one process does the (single-machine) work
        return

    try:
        ours_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else get_tokenizer_dir()
        encoders = {}
        for d in [ours_dir, *map(Path, args.compare)]:
            tok = Tokenizer.from_directory(d)
            label = f"ours {tok.get_vocab_size() // 1024}K" if tok.get_vocab_size() % 1024 == 0 else f"ours {tok.get_vocab_size()}"
            while label in encoders:
                label += "'"
            encoders[label] = tok.enc
    except (FileNotFoundError, TokenizerError) as e:
        sys.exit(f"error: {e}")

    if not args.no_baselines:
        skipped = []
        for label, name in [("GPT-2", "gpt2"), ("GPT-4", "cl100k_base")]:
            enc, why = load_tiktoken_baseline(name)
            if enc is not None:
                encoders[label] = enc
            else:
                skipped.append(f"{name} ({why})")
        if skipped:
            print0(f"GPT-2/GPT-4 comparison skipped: tiktoken could not load {', '.join(skipped)}. To enable, run "
                   f"this once on a networked machine (tiktoken caches the files), or set TIKTOKEN_CACHE_DIR to a "
                   f"folder holding tiktoken's cached gpt2/cl100k_base files.")

    texts = {name: [text] for name, text in SAMPLES.items()}
    val = validation_texts(args.val_docs)
    if val:
        texts[f"pretraining val ({len(val)} docs)"] = val
    else:
        print0("pretraining validation split not found (run `python -m nanochat.dataset embedded`): row skipped")
    if args.text_dir:
        try:
            from nanochat.tokenizer import list_text_files

            for f in list_text_files(args.text_dir):
                texts[f.name] = list(iter_text_files(f))
        except TokenizerError as e:
            sys.exit(f"error: {e}")

    header = ["text", "bytes"] + [f"{label} B/tok" for label in encoders]
    rows = []
    for name, docs in texts.items():
        n_bytes = sum(len(d.encode("utf-8")) for d in docs)
        row = [name, f"{n_bytes:,}"]
        for enc in encoders.values():
            n_tokens = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=2)))
            row.append(f"{n_bytes / max(n_tokens, 1):.2f}")
        rows.append(row)
    print0("| " + " | ".join(header) + " |")
    print0("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print0("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
