"""Import a Hugging Face `nanochat` checkpoint folder into our checkpoint format.

Accepts transformers' built-in `nanochat` type (e.g. an export of ours, or a public nanochat model
converted by transformers) and our remote-code `nanochat_gpt` type. The result loads with
`checkpoint_manager.load_model`, so the engine, chat eval and web UI can serve it.

- The model config comes from `nanochat_config` in config.json when present (our exports), else it
  is derived from the transformers fields (full attention, qk_gain 1, no value embeddings).
- Vocabulary padding rows come from `nanochat_padding.safetensors` when present (a bit-identical round
  trip of our exports), else they are zeros (they are never read: logits are cut to vocab_size).
- The tokenizer: `tokenizer.json` (byte-level BPE) is turned back into our ranks + split pattern.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanochat.hf_export import NATIVE_TYPE, PADDING_FILE, REMOTE_TYPE, RMS_NORM_EPS, load_tensors
from nanochat.model_config import GPTConfig
from nanochat.tokenizer import Tokenizer, gpt2_byte_to_unicode


class HFImportError(ValueError):
    """The folder is not a checkpoint this importer understands (the message says what is off)."""


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise HFImportError(f"{folder} has no config.json: give a Hugging Face model folder (export one with "
                           f"`python -m scripts.export_hf`)")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") not in (NATIVE_TYPE, REMOTE_TYPE):
        raise HFImportError(f"{path}: model_type {cfg.get('model_type')!r} is not {NATIVE_TYPE!r} or {REMOTE_TYPE!r}; "
                           f"only nanochat checkpoints can become our checkpoints (evaluate other models with "
                           f"`base_eval.py --hf-path`)")
    return cfg


def gpt_config_from_hf(cfg: dict) -> GPTConfig:
    """Our model config for a config.json (see the module docstring)."""
    if isinstance(cfg.get("nanochat_config"), dict):
        return GPTConfig(**cfg["nanochat_config"])
    if cfg["model_type"] == REMOTE_TYPE:
        raise HFImportError("a nanochat_gpt config.json without nanochat_config: re-export it with scripts/export_hf.py")
    problems = []
    C = cfg["hidden_size"]
    if cfg.get("intermediate_size", 4 * C) != 4 * C:
        problems.append(f"intermediate_size={cfg['intermediate_size']} (ours is 4 x hidden_size = {4 * C})")
    if cfg.get("hidden_act", "relu2") != "relu2":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (ours is relu2)")
    if cfg.get("attention_bias"):
        problems.append("attention_bias=True (ours has no biases)")
    if cfg.get("head_dim") not in (None, C // cfg["num_attention_heads"]):
        problems.append(f"head_dim={cfg['head_dim']} (ours is hidden_size / heads)")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope['rope_type']!r} (ours is plain rotary)")
    if problems:
        raise HFImportError("this nanochat checkpoint has fields our GPT cannot represent: " + "; ".join(problems))
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return GPTConfig(sequence_len=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"],
                     n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                     n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], n_embd=C,
                     window_pattern="L", value_embeds=False, resid_scalars=False, rope_base=float(theta),
                     logit_softcap=float(cfg.get("final_logit_softcapping") or 0.0), qk_gain=1.0)


_NATIVE_TO_OURS = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                   "self_attn.o_proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _our_name(key: str, model_type: str) -> str | None:
    if key == "lm_head.weight":
        return key
    if model_type == REMOTE_TYPE:
        return key[len("model."):] if key.startswith("model.") else None
    if key == "model.embed_tokens.weight":
        return "wte.weight"
    parts = key.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
        sub = _NATIVE_TO_OURS.get(f"{parts[3]}.{parts[4]}")
        if sub:
            return f"blocks.{parts[2]}.{sub}.weight"
    return None


def state_dict_from_hf(folder: str | Path, cfg: dict, config: GPTConfig) -> dict:
    """Our state dict (fp32 master weights, padded vocab rows) from the folder's safetensors."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_tensors(folder)
    if cfg.get("tie_word_embeddings") and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    out, unknown = {}, []
    for key, t in tensors.items():
        name = _our_name(key, cfg["model_type"])
        if name is None:
            unknown.append(key)
        else:
            out[name] = t.to(torch.float32) if t.is_floating_point() else t
    if unknown:
        raise HFImportError(f"tensors with no place in our GPT (nothing is dropped silently): {unknown[:8]}"
                           f"{' ...' if len(unknown) > 8 else ''}")
    V, Vp = config.vocab_size, config.padded_vocab_size
    padding = load_file(str(folder / PADDING_FILE)) if (folder / PADDING_FILE).is_file() else {}
    for key in ("wte.weight", "lm_head.weight"):
        if key in out and out[key].size(0) == V and Vp > V:
            pad = padding.get(key)
            pad = pad.to(torch.float32) if pad is not None and pad.shape == (Vp - V, out[key].size(1)) \
                else torch.zeros(Vp - V, out[key].size(1))
            out[key] = torch.cat([out[key], pad], dim=0)
    return out


def tokenizer_from_hf(folder: str | Path) -> Tokenizer:
    """Our tokenizer (ranks + split pattern + specials) from a byte-level BPE tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise HFImportError(f"{folder} has no tokenizer.json (a byte-level BPE `tokenizers` file is needed)")
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise HFImportError(f"{path}: model type {model.get('type')!r}, not a byte-level BPE")
    pattern = None
    pre = data.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            pattern = (p.get("pattern") or {}).get("Regex")
    if pattern is None:
        raise HFImportError(f"{path}: no Split pre-tokenizer with a regex (the split pattern of the BPE)")
    u2b = {c: b for b, c in gpt2_byte_to_unicode().items()}
    specials = sorted((t for t in data.get("added_tokens", []) if t.get("special")), key=lambda t: t["id"])
    special_ids = {t["id"] for t in specials}
    ranks = {}
    for token, i in model["vocab"].items():
        if i in special_ids:
            continue
        try:
            ranks[bytes(u2b[c] for c in token)] = i
        except KeyError:
            raise HFImportError(f"{path}: token {token!r} is not byte-level (GPT-2 byte alphabet)") from None
    n = len(ranks)
    if [t["id"] for t in specials] != list(range(n, n + len(specials))):
        raise HFImportError(f"{path}: special tokens must follow the {n} ordinary tokens in id order")
    return Tokenizer(ranks, pattern=pattern, special_tokens=[t["content"] for t in specials],
                     meta={"trainer": "imported", "source": str(folder)})


def import_folder(folder: str | Path) -> tuple[GPTConfig, dict, Tokenizer, dict]:
    """(our model config, our state dict, our tokenizer, source info) of a nanochat HF folder."""
    cfg = read_config(folder)
    config = gpt_config_from_hf(cfg)
    state = state_dict_from_hf(folder, cfg, config)
    tokenizer = tokenizer_from_hf(folder)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFImportError(f"tokenizer.json holds {tokenizer.get_vocab_size():,} tokens, config.json says "
                           f"vocab_size {config.vocab_size:,}")
    info = dict(cfg.get("nanochat_source") or {})
    eps = cfg.get("rms_norm_eps")
    if cfg["model_type"] == NATIVE_TYPE and eps is not None and abs(eps - RMS_NORM_EPS) > 1e-12:
        info["notes"] = [f"rms_norm_eps {eps:g} in config.json, ours is {RMS_NORM_EPS:g} (float32 eps): logits "
                         f"differ from the HF model's in the last digits"]
    return config, state, tokenizer, info
