"""Parameter counts of other programs' model shapes, and which change of shape explains a size gap.

Families: "gpt2" (nanoGPT, llm.c, Hugging Face GPT-2: tied wte/lm_head, learned position embeddings,
LayerNorm, 4x GELU MLP) and "llama" (Hugging Face Llama-style configs: RMSNorm, rotary positions,
SwiGLU MLP, grouped-query attention, untied head unless `tie_word_embeddings`).
"""

from __future__ import annotations

import math

# published shapes (n_layer, n_head, n_embd): what people mean when they say "GPT-2 small" or "d20".
# nanoGPT model.py from_pretrained; Pythia (Biderman et al. 2023, table 1); nanochat's depth dial
# (n_embd = 64 x depth, head_dim 128); Llama-style small models' config.json
KNOWN_SHAPES: dict[str, dict] = {
    "GPT-2 small": dict(n_layer=12, n_head=12, n_embd=768),
    "GPT-2 medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "GPT-2 large": dict(n_layer=36, n_head=20, n_embd=1280),
    "GPT-2 XL": dict(n_layer=48, n_head=25, n_embd=1600),
    "Pythia-70M": dict(n_layer=6, n_head=8, n_embd=512),
    "Pythia-1B": dict(n_layer=16, n_head=8, n_embd=2048),
    "Pythia-1.4B": dict(n_layer=24, n_head=16, n_embd=2048),
    "Pythia-2.8B": dict(n_layer=32, n_head=32, n_embd=2560),
    **{f"nanochat d{d}": dict(n_layer=d, n_head=max(1, 64 * d // 128), n_embd=64 * d) for d in range(4, 34, 2)},
    "SmolLM-135M": dict(n_layer=30, n_head=9, n_embd=576),
    "SmolLM-360M": dict(n_layer=32, n_head=15, n_embd=960),
    "TinyLlama-1.1B": dict(n_layer=22, n_head=32, n_embd=2048),
}
GPT2_SHAPES = {"gpt2": KNOWN_SHAPES["GPT-2 small"], "gpt2-medium": KNOWN_SHAPES["GPT-2 medium"],
               "gpt2-large": KNOWN_SHAPES["GPT-2 large"], "gpt2-xl": KNOWN_SHAPES["GPT-2 XL"]}
# a one-field change further than this from what was written is not a typo but a different model
PLAUSIBLE_FACTOR = 3.0


def nanogpt_params(n_layer: int, n_embd: int, vocab_size: int, block_size: int, bias: bool = False) -> dict:
    """Closed-form parameter counts of the GPT-2 family (tied wte/lm_head, LayerNorm, 4x MLP).

    `printed` is what nanoGPT's train.py prints (`get_num_params()`, non_embedding=True: the position
    embeddings are subtracted, the tied token embedding stays). `scaling` is nanochat's convention
    (transformer matrices + the LM head, i.e. the tied embedding counted once)."""
    C, L = n_embd, n_layer
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # qkv, proj, fc, proj (+ biases) and two LayerNorms
    ln_f = 2 * C if bias else C
    wte, wpe = vocab_size * C, block_size * C
    total = wte + wpe + L * per_layer + ln_f
    return dict(total=total, printed=total - wpe, wpe=wpe, wte=wte, blocks=L * per_layer,
                matrices=12 * C * C * L, scaling=12 * C * C * L + wte)


def llama_params(n_layer: int, n_embd: int, vocab_size: int, n_head: int, n_kv_head: int | None = None,
                 intermediate_size: int | None = None, tie_word_embeddings: bool = False) -> dict:
    """Closed-form counts of a Llama-style decoder (Hugging Face LlamaForCausalLM and its kin): q, k, v,
    o projections (k, v at n_kv_head heads), a SwiGLU MLP (three matrices), two RMSNorms per layer."""
    C, L = n_embd, n_layer
    kv = (n_kv_head or n_head) * (C // n_head)
    ff = intermediate_size or 4 * C
    matrices = L * (2 * C * C + 2 * C * kv + 3 * C * ff)
    wte = vocab_size * C
    head = 0 if tie_word_embeddings else vocab_size * C
    total = wte + head + matrices + L * 2 * C + C
    return dict(total=total, printed=total, wte=wte, wpe=0, matrices=matrices, scaling=matrices + (head or wte))


def shape_count(family: str, dims: dict, convention: str = "total") -> float:
    if family == "llama":
        return llama_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"], dims["n_head"], dims.get("n_kv_head"),
                            dims.get("intermediate_size"), bool(dims.get("tie_word_embeddings")))[convention]
    return nanogpt_params(dims["n_layer"], dims["n_embd"], dims["vocab_size"], dims.get("block_size") or 0,
                          bool(dims.get("bias")))[convention]


def explain_size_gap(dims: dict, target: float, convention: str = "total", family: str = "gpt2",
                     tolerance: float = 0.1) -> list[dict]:
    """Shape changes that bring the `convention` count within `tolerance` of `target`, most plausible first.

    First the published shapes of the family (GPT-2 small to XL, Pythia, nanochat depths, small Llamas)
    that land on the target, fewest changed fields first: a config copied from a known model with one
    number wrong is the usual story. Then single-field changes (n_layer, n_embd on the grid of widths the
    heads allow, vocab_size), smallest relative change first; a change of more than PLAUSIBLE_FACTOR x is
    dropped (vocab_size=269176 or n_layer=59 for a 12-layer config explains a number, not a mistake).
    Each: dim, value (the field and value for one change; dim="shape" for several), changes, known
    (the published shape's name or None), count, relative_error, relative_change."""
    def count(**kw):
        return shape_count(family, {**dims, **kw}, convention)

    def add(changes: dict, known: str | None):
        c = count(**changes)
        err = abs(c - target) / target
        if err > tolerance:
            return
        rel = max(abs(math.log(v / dims[k])) for k, v in changes.items())
        one = len(changes) == 1
        k0, v0 = next(iter(changes.items()))
        out.append(dict(dim=k0 if one else "shape", value=v0 if one else ", ".join(f"{k}={v}" for k, v in changes.items()),
                        changes=changes, known=known, count=c, relative_error=err, relative_change=rel))

    out: list[dict] = []
    for name, shape in KNOWN_SHAPES.items():
        changes = {k: v for k, v in shape.items() if dims.get(k) != v and k != "n_head"}  # heads do not change the count
        if changes and not any(x["changes"] == changes for x in out):
            add(changes, name)
    out.sort(key=lambda c: (len(c["changes"]), round(c["relative_error"], 2), c["relative_change"]))
    singles = []
    per_layer = count(n_layer=1) - count(n_layer=0)
    if per_layer:
        L = max(1, round((target - count(n_layer=0)) / per_layer))
        if L != dims["n_layer"]:
            singles.append({"n_layer": L})
    nh = max(1, int(dims.get("n_head") or 1))
    step = nh * (64 // math.gcd(64, nh)) if dims["n_embd"] % 64 == 0 else nh
    best = min(range(step, 16385, step), key=lambda c: abs(count(n_embd=c) - target))
    if best != dims["n_embd"]:
        singles.append({"n_embd": best})
    per_tok = count(vocab_size=1) - count(vocab_size=0)
    V = round((target - count(vocab_size=0)) / per_tok) if per_tok else 0
    if V > 0 and V != dims["vocab_size"]:
        singles.append({"vocab_size": V})
    n_known = len(out)
    for ch in singles:
        (k, v), = ch.items()
        if max(v / dims[k], dims[k] / v) <= PLAUSIBLE_FACTOR and not any(x["changes"] == ch for x in out):
            add(ch, None)
    out[n_known:] = sorted(out[n_known:], key=lambda c: (c["relative_change"], c["relative_error"]))
    return out
