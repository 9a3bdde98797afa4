"""Shared pieces of the chat tests: a tiny tokenizer trained on embedded-mix text, tiny models."""

import functools

import torch

from nanochat.gpt import GPT, GPTConfig


def conversation_text(conv) -> str:
    out = []
    for m in conv["messages"]:
        c = m["content"]
        out.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def chat_tokenizer(vocab_size: int = 400):
    """A BPE tokenizer (with the chat specials) learned on a few hundred embedded-mix conversations,
    plus digits, letters and code punctuation so every reply can be encoded in few tokens."""
    from nanochat.tasks import EmbeddedChat
    from nanochat.tokenizer import Tokenizer

    from nanochat.tasks.embedded import SINGLE_KINDS

    # the single-exchange kinds only: the same 600 texts, hence the same merges, as before the mix gained
    # multi-turn chats (tests that pack rows depend on exact token counts)
    texts = [conversation_text(c) for c in EmbeddedChat("train", size=600, kinds=SINGLE_KINDS)]
    texts.append("0123456789 ABCDEFGHIJ abcdefghijklmnopqrstuvwxyz ()[]{}=+-*/%.,:;'\"#\n" * 5)
    return Tokenizer.train_from_iterator(texts, vocab_size=vocab_size)


def tiny_model(vocab_size: int, depth: int = 2, seq_len: int = 128, n_embd: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=2, n_kv_head=2,
                       n_embd=n_embd)
    model = GPT(config)
    model.init_weights()
    return model


def make_base_checkpoint(base_dir, depth: int = 2, seq_len: int = 256, n_embd: int = 64, tag: str = "d2", step: int = 0,
                         model=None):
    """A base dir holding the chat tokenizer and one base checkpoint (a freshly initialised tiny model,
    or `model`), as base training would leave them."""
    from pathlib import Path

    from nanochat import checkpoint_manager as ckpt

    tok = chat_tokenizer()
    tok.save(Path(base_dir) / "tokenizer")
    model = model if model is not None else tiny_model(tok.get_vocab_size(), depth=depth, seq_len=seq_len, n_embd=n_embd)
    ckpt.save_checkpoint(Path(base_dir) / "base_checkpoints" / tag, step, model.state_dict(), None,
                         {"model_config": model.config.to_dict()})
    return tok, model


def penalized_greedy(model, prompt, steps, presence, frequency):
    """Greedy decoding with OpenAI's penalties written out, one full forward per token (no cache): the
    reference for the engine and the server. logits[j] - c[j] * frequency - (c[j] > 0) * presence, c =
    counts of j in the reply so far."""
    seq, counts = list(prompt), torch.zeros(model.config.vocab_size)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]))[0, -1].float()
            t = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
            counts[t] += 1
            seq.append(t)
    return seq[len(prompt):]
