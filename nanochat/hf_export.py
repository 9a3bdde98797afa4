"""Export a nanochat checkpoint as a Hugging Face transformers model folder.

Two formats (REFERENCE section 12):

- **native**: transformers' built-in `nanochat` type (`NanoChatForCausalLM`). It models the plain
  architecture only: full attention, no value embeddings, no residual scalars, attention scale fixed
  at 1/sqrt(head_dim) (so `qk_gain` must be 1). `native_mismatches` lists every field of a config
  (and every tensor) that has no place in it; a native export of such a checkpoint fails with that
  list instead of dropping tensors. The LM head and embedding keep `vocab_size` rows; the padding
  rows (`VOCAB_PAD_MULTIPLE`) go to `nanochat_padding.safetensors`, which transformers never reads and
  the importer uses to restore the checkpoint bit for bit. Past the training context the native model
  attends to every earlier token, ours to the last `sequence_len` (identical within the context).
- **remote**: `configuration_nanochat_gpt.py` + `modeling_nanochat_gpt.py` (torch + transformers
  only; copied from nanochat/assets/hf_remote/) with `auto_map`, loaded with `trust_remote_code=True`.
  Any config of nanochat/gpt.py, generation with a KV cache whose short-window layers slide.

Both write `model.safetensors` (or shards and an index above `max_shard_bytes`), `config.json` (with
our own config under `nanochat_config`), `generation_config.json`, `tokenizer.json` (a `tokenizers`
byte-level BPE built from our ranks and split pattern, plus the 9 special tokens),
`tokenizer_config.json` (with a Jinja chat template equal to `render_conversation` /
`render_for_completion`) and a model card `README.md`.

Known difference of the HF tokenizer: it turns special-token text inside a string ("<|bos|>") into
the special token; ours encodes it as plain text. `split_special_tokens=True` when loading it gives
our behaviour for plain text (but then the chat template's markers are split too).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.model_config import VE_GATE_CHANNELS, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, gpt2_byte_to_unicode

NATIVE_TYPE = "nanochat"
REMOTE_TYPE = "nanochat_gpt"
REMOTE_DIR = Path(__file__).resolve().parent / "assets" / "hf_remote"
REMOTE_FILES = ("configuration_nanochat_gpt.py", "modeling_nanochat_gpt.py")
PADDING_FILE = "nanochat_padding.safetensors"
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
FORMATS = ("auto", "native", "remote")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# F.rms_norm with eps=None uses finfo(dtype).eps; transformers' NanoChatRMSNorm takes a fixed eps
RMS_NORM_EPS = torch.finfo(torch.float32).eps

# A conversation rendered exactly as Tokenizer.render_conversation lays it out (the system prompt is
# merged into the first user message with a blank line); `add_generation_prompt` appends
# <|assistant_start|> as render_for_completion does. Assistant content: a str or a list of parts
# {"type": "text" | "python" | "python_output", "text": str}.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages|length < 2 or messages[1]['role'] != 'user' -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}"
    "{%- endif -%}"
    "{%- set merged_user = messages[0]['content'] ~ '\\n\\n' ~ messages[1]['content'] -%}"
    "{%- set msgs = messages[1:] -%}"
    "{%- else -%}"
    "{%- set merged_user = none -%}"
    "{%- set msgs = messages -%}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for m in msgs -%}"
    "{%- if m['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}"
    "{{ raise_exception('messages must alternate user/assistant starting with user (after an optional system message)') }}"
    "{%- endif -%}"
    "{%- if m['role'] == 'user' -%}"
    "<|user_start|>{{ merged_user if (loop.first and merged_user is not none) else m['content'] }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'text' -%}{{ p['text'] }}"
    "{%- elif p['type'] == 'python' -%}<|python_start|>{{ p['text'] }}<|python_end|>"
    "{%- elif p['type'] == 'python_output' -%}<|output_start|>{{ p['text'] }}<|output_end|>"
    "{%- else -%}{{ raise_exception('unknown assistant content part type: ' ~ p['type']) }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


class ExportError(ValueError):
    """The checkpoint cannot be written in the requested format (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------
# does a checkpoint fit transformers' built-in nanochat type?


def _native_tensor_name(key: str) -> str | None:
    parts = key.split(".")
    if key == "wte.weight":
        return "model.embed_tokens.weight"
    if key == "lm_head.weight":
        return "lm_head.weight"
    if len(parts) == 5 and parts[0] == "blocks" and parts[4] == "weight":
        i, module, lin = parts[1], parts[2], parts[3]
        names = {("attn", "c_q"): "self_attn.q_proj", ("attn", "c_k"): "self_attn.k_proj",
                 ("attn", "c_v"): "self_attn.v_proj", ("attn", "c_proj"): "self_attn.o_proj",
                 ("mlp", "c_fc"): "mlp.fc1", ("mlp", "c_proj"): "mlp.fc2"}
        if (module, lin) in names:
            return f"model.layers.{i}.{names[(module, lin)]}.weight"
    return None


def native_mismatches(config: GPTConfig, state_dict: dict | None = None) -> list[str]:
    """Every field (and tensor) of a checkpoint that transformers' `nanochat` type cannot represent."""
    out = []
    windows = config.window_sizes()
    if any(w < config.sequence_len for w in windows):
        out.append(f"window_pattern={config.window_pattern!r}: sliding windows {windows}; the native type has "
                   f"full causal attention only")
    if config.value_embeds:
        out.append("value_embeds=True: the native type has no value embeddings")
    if config.resid_scalars:
        out.append("resid_scalars=True: the native type has no per-layer residual / x0 scalars")
    if config.qk_gain != 1.0:
        out.append(f"qk_gain={config.qk_gain}: the native attention scale is fixed at 1/sqrt(head_dim) after a "
                   f"parameter-free QK norm (ours is qk_gain^2/sqrt(head_dim))")
    if state_dict is not None:
        # tensors that the mismatches above already account for are not listed again
        explained = (("value_embeds.", ".ve_gate.") if config.value_embeds else ()) + \
                    (("resid_lambdas", "x0_lambdas") if config.resid_scalars else ())
        for key, t in state_dict.items():
            if _native_tensor_name(key) is None and not any(e in key for e in explained):
                out.append(f"tensor {key} {tuple(t.shape)}: no counterpart in the native type")
    return out


def native_fits(config: GPTConfig, state_dict: dict | None = None) -> bool:
    return not native_mismatches(config, state_dict)


# ---------------------------------------------------------------------------------------------
# configs and tensors of the two formats


def _pad_name(tokenizer: Tokenizer) -> str:
    # not <|bos|>: generate() infers an attention mask from pad ids when none is given, and would mask
    # the <|bos|> every prompt starts with; a stop token is never inferred as padding
    return "<|assistant_end|>" if "<|assistant_end|>" in tokenizer.special_tokens else "<|bos|>"


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.encode_special(_pad_name(tokenizer))


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}


def native_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    sp = _special_ids(tokenizer)
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": NATIVE_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2", "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "final_logit_softcapping": config.logit_softcap or None, "tie_word_embeddings": False,
        "bos_token_id": sp["<|bos|>"], "eos_token_id": sp.get("<|assistant_end|>", sp["<|bos|>"]),
        "pad_token_id": _pad_id(tokenizer), "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
        "nanochat_config": config.to_dict(),
    }


def remote_config(config: GPTConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict:
    sp = _special_ids(tokenizer)
    return {
        "architectures": ["NanoChatGPTForCausalLM"], "model_type": REMOTE_TYPE,
        "auto_map": {"AutoConfig": "configuration_nanochat_gpt.NanoChatGPTConfig",
                     "AutoModelForCausalLM": "modeling_nanochat_gpt.NanoChatGPTForCausalLM"},
        "vocab_size": config.vocab_size, "padded_vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd, "intermediate_size": 4 * config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len, "window_sizes": config.window_sizes(),
        "value_embed_layers": [i for i in range(config.n_layer) if config.has_value_embed(i)],
        "ve_gate_channels": VE_GATE_CHANNELS, "resid_scalars": config.resid_scalars,
        "rope_theta": config.rope_base, "qk_gain": config.qk_gain,
        "final_logit_softcapping": config.logit_softcap or None, "tie_word_embeddings": False,
        "bos_token_id": sp["<|bos|>"], "eos_token_id": sp.get("<|assistant_end|>", sp["<|bos|>"]),
        "pad_token_id": _pad_id(tokenizer), "use_cache": True, "dtype": str(dtype).removeprefix("torch."),
        "nanochat_config": config.to_dict(),
    }


def native_tensors(config: GPTConfig, state_dict: dict) -> tuple[dict, dict]:
    """(tensors under transformers' names with `vocab_size` rows, the padding rows under our names)."""
    V = config.vocab_size
    tensors, padding = {}, {}
    for key, t in state_dict.items():
        name = _native_tensor_name(key)
        if name is None:
            raise ExportError(f"tensor {key} has no counterpart in the native type (use --format remote)")
        if key in ("wte.weight", "lm_head.weight"):
            if t.size(0) > V:
                padding[key] = t[V:]
            t = t[:V]
        tensors[name] = t
    return tensors, padding


def remote_tensors(state_dict: dict) -> dict:
    return {(k if k == "lm_head.weight" else "model." + k): t for k, t in state_dict.items()}


# ---------------------------------------------------------------------------------------------
# safetensors (sharded above a size)


def save_tensors(tensors: dict, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
    """Write `model.safetensors`, or `model-0000i-of-0000n.safetensors` + index when larger than
    `max_shard_bytes`. Returns the file names."""
    from safetensors.torch import save_file

    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += nbytes
    shards.append(current)
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names + ["model.safetensors.index.json"]


def load_tensors(folder: str | Path) -> dict:
    """All tensors of an exported folder (single file or shards)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors (or model.safetensors.index.json) in {folder}")
    out = {}
    for name in files:
        out.update(load_file(str(folder / name)))
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer


def hf_tokenizer_object(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes like ours (tiktoken over the same ranks and split regex).

    Merges: every split (a, b) of every multi-byte token t whose halves are tokens, with the priority
    of t's rank; tiktoken merges the adjacent pair whose concatenation has the lowest rank, and so does
    BPE with these merges. `ignore_merges=True` mirrors tiktoken's shortcut of emitting a whole
    pre-token that is itself a token.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    b2u = gpt2_byte_to_unicode()
    ranks = tokenizer.mergeable_ranks

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for t, r in ranks.items():
        for i in range(1, len(t)):
            a, b = t[:i], t[i:]
            if a in ranks and b in ranks:
                merges.append((r, ranks[a], ranks[b], text(a), text(b)))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True,
                                fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = tokenizer.get_special_tokens()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:
        if hf.token_to_id(s) != tokenizer.encode_special(s):
            raise ExportError(f"special token {s} got id {hf.token_to_id(s)} in the HF tokenizer, "
                              f"{tokenizer.encode_special(s)} in ours")
    bos = tokenizer.get_bos_token_id()
    # `tokenizer(text)` starts every sequence with <|bos|>, as our documents do
    hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    return hf


def tokenizer_config(tokenizer: Tokenizer, config: GPTConfig, chat: bool) -> dict:
    specials = tokenizer.get_special_tokens()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>" if chat else "<|bos|>",
        "pad_token": _pad_name(tokenizer),
        "additional_special_tokens": [s for s in specials if s != "<|bos|>"],
        "model_max_length": config.sequence_len, "clean_up_tokenization_spaces": False,
        "padding_side": "left", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    stops = [tokenizer.encode_special(s) for s in ("<|assistant_end|>", "<|bos|>") if s in tokenizer.special_tokens]
    return {"bos_token_id": tokenizer.get_bos_token_id(), "eos_token_id": stops,
            "pad_token_id": _pad_id(tokenizer), "do_sample": False}


# ---------------------------------------------------------------------------------------------
# model card


def _fmt(x, spec=",") -> str:
    return "n/a" if x is None else format(x, spec)


def run_records(run_folder: Path | None, meta: dict) -> dict:
    """What the model card reports, from the run folder's run.json (run_dir's record, the same in every
    phase), metrics.jsonl, eval results and the checkpoint meta. A fine-tuned model (SFT, RL) also gets the
    records of the pretraining run it descends from (`pretraining`), found through run.json's `source`."""
    from nanochat.checkpoint_manager import CheckpointError, load_meta
    from nanochat.run_dir import read_metrics, read_run_json, run_dir

    rec = {"step": meta.get("step"), "val_bpb": meta.get("val_bpb"), "core": None, "chatcore": None,
           "tokens": None, "flops": None, "val_loss": meta.get("val_loss"), "reward": meta.get("reward"),
           "run": None, "phase": meta.get("phase"), "pretraining": None}
    if run_folder is None or not Path(run_folder).is_dir():
        return rec
    run_folder = Path(run_folder)
    try:
        rec["run"] = read_run_json(run_folder)
    except ValueError:
        rec["run"] = None
    run = rec["run"] or {}
    rec["phase"] = run.get("phase") or rec["phase"]
    step = meta.get("step")
    for r in read_metrics(run_folder):
        if step is not None and r.get("step", 0) > step:
            continue
        for key, name in (("tokens", "tokens"), ("flops", "flops"), ("val_bpb", "val_bpb"), ("core", "core"),
                          ("chatcore", "chatcore"), ("chat_core", "chatcore"), ("val_loss", "val_loss"),
                          ("reward", "reward")):
            if r.get(key) is not None:
                rec[name] = r[key]
    for path in sorted(run_folder.glob("*eval*.json")):  # base_eval / chat_eval result files
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("step") is not None and step is not None and data["step"] != step:
            continue
        for key, name in (("core", "core"), ("chatcore", "chatcore"), ("ChatCORE", "chatcore")):
            if isinstance(data.get(key), (int, float)):
                rec[name] = data[key]
    if rec["tokens"] is None and rec["phase"] in (None, "base"):
        rec["tokens"] = (run.get("sizing") or {}).get("total_tokens")
    source = run.get("source") or meta.get("source")
    if isinstance(source, dict) and source.get("phase") and source.get("tag"):
        try:
            folder = run_dir(source["phase"], source["tag"], run_folder.parent.parent)
            src_meta = load_meta(folder, source["step"]) if source.get("step") is not None else {}
        except (CheckpointError, ValueError):
            folder, src_meta = None, {}
        rec["source"] = source
        if folder is not None:
            rec["pretraining"] = run_records(folder, src_meta)
    return rec


def _training_lines(records: dict) -> list[str]:
    """The card's figures: pretraining's (tokens, FLOPs, val bpb, CORE), then a fine-tuning phase's own."""
    phase = records.get("phase") or "base"
    if phase in ("base", "mid"):
        return [f"- training tokens: {_fmt(records.get('tokens'))}",
                f"- training FLOPs: {_fmt(records.get('flops'), '.3e')}",
                f"- validation bits per byte: {_fmt(records.get('val_bpb'), '.4f')}",
                f"- CORE: {_fmt(records.get('core'), '.4f')}",
                f"- ChatCORE: {_fmt(records.get('chatcore'), '.4f')}"]
    lines = []
    pre = records.get("pretraining")
    src = records.get("source") or {}
    if pre is not None:
        lines += [f"Started from the {src.get('phase')} run `{src.get('tag')}`, step {_fmt(src.get('step'))}:", "",
                  *_training_lines(pre), ""]
    lines += [f"{'Fine-tuning (SFT)' if phase == 'sft' else 'Reinforcement learning (RL)'}, {_fmt(records.get('step'))} "
              f"steps:", "", f"- tokens (slots per step x steps): {_fmt(records.get('tokens'))}"]
    if phase == "sft":
        lines.append(f"- validation loss (nats per trained token): {_fmt(records.get('val_loss'), '.4f')}")
    else:
        lines.append(f"- mean reward of the last step: {_fmt(records.get('reward'), '.4f')}")
    lines.append(f"- ChatCORE: {_fmt(records.get('chatcore'), '.4f')}")
    return lines


def model_card(config: GPTConfig, num_params: dict, fmt: str, source: str, records: dict, dtype: str,
               name: str) -> str:
    windows = config.window_sizes()
    load = ("AutoModelForCausalLM.from_pretrained(path)" if fmt == "native"
            else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [nanochat]", "---", "",
        f"# {name}", "",
        f"A nanochat GPT ({source} checkpoint, step {_fmt(records.get('step'))}) exported to the Hugging Face "
        f"format `{fmt}` ({'the built-in `nanochat` model type' if fmt == 'native' else 'remote code in this folder'}),"
        f" weights in {dtype}.", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "path = \"path/to/this/folder\"",
        f"model = {load}",
        f"tok = AutoTokenizer.from_pretrained(path{'' if fmt == 'native' else ', trust_remote_code=True'})",
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi\"}], add_generation_prompt=True,"
        " return_tensors=\"pt\", return_dict=True)",
        "out = model.generate(**ids, max_new_tokens=64)",
        "```", "",
        "## Architecture", "",
        "| field | value |", "|---|---|",
        f"| layers | {config.n_layer} |", f"| width | {config.n_embd} |",
        f"| heads (query / kv) | {config.n_head} / {config.n_kv_head} (head dim {config.head_dim}) |",
        f"| context | {config.sequence_len} |",
        f"| vocab | {config.vocab_size:,} (embedding rows {config.padded_vocab_size:,}) |",
        f"| attention windows | {config.window_pattern} -> {windows} |",
        f"| value embeddings | {'yes (layers ' + str([i for i in range(config.n_layer) if config.has_value_embed(i)]) + ')' if config.value_embeds else 'no'} |",
        f"| residual scalars | {'yes' if config.resid_scalars else 'no'} |",
        f"| rotary base | {config.rope_base:g} |", f"| QK-norm gain | {config.qk_gain} |",
        f"| logit soft-cap | {config.logit_softcap} |", "| MLP | ReLU^2, 4x |",
        "| norms | parameter-free RMSNorm (pre-norm, after the embedding, final) |",
        "| embeddings | untied, no biases |", "",
        "## Parameters", "",
        f"- total: {num_params['total']:,}", f"- scaling (block matrices + head): {num_params['scaling']:,}",
        f"- embeddings (token + value): {num_params['embedding']:,}", f"- scalars: {num_params['scalar']:,}", "",
        "## Training and evaluation (from the run's records)", "",
        *_training_lines(records), "",
        "## Tokenizer", "",
        "Byte-level BPE (GPT-4-style split, digits in groups of 1-2) with 9 special tokens: "
        + ", ".join(f"`{s}`" for s in SPECIAL_TOKENS) + ". `tokenizer(text)` prepends `<|bos|>`; the chat "
        "template reproduces nanochat's conversation rendering. Unlike nanochat's own tokenizer, this one "
        "turns special-token text inside a string into the special token (load with "
        "`split_special_tokens=True` to encode such text literally).", "",
    ]
    run = records.get("run") or {}
    if run.get("args"):
        lines += ["## Training flags", "", "```json", json.dumps(run["args"], indent=1, default=str), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the export


@dataclass
class ExportResult:
    out_dir: Path
    format: str
    files: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)  # why native did not fit (format "auto")


def choose_format(fmt: str, config: GPTConfig, state_dict: dict) -> tuple[str, list[str]]:
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    mismatches = native_mismatches(config, state_dict)
    if fmt == "native" and mismatches:
        raise ExportError("this checkpoint does not fit transformers' native `nanochat` type:\n  - "
                          + "\n  - ".join(mismatches) + "\nexport it with --format remote (or auto) instead")
    if fmt == "auto":
        fmt = "remote" if mismatches else "native"
    return fmt, mismatches


def export(model_config: dict | GPTConfig, state_dict: dict, tokenizer: Tokenizer, out_dir: str | Path,
           fmt: str = "auto", dtype: str = "fp32", meta: dict | None = None, run_folder: str | Path | None = None,
           source: str = "base", name: str | None = None,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportResult:
    """Write a transformers model folder for one checkpoint (see the module docstring)."""
    from nanochat.checkpoint_manager import strip_compile_prefix
    from nanochat.gpt import GPT

    config = model_config if isinstance(model_config, GPTConfig) else GPTConfig(**model_config)
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: use fp32 or bf16")
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ExportError(f"tokenizer vocab {tokenizer.get_vocab_size():,} does not match the model's "
                          f"{config.vocab_size:,}: export with the tokenizer the model was trained with")
    missing = [s for s in ("<|bos|>",) if s not in tokenizer.special_tokens]
    if missing:
        raise ExportError(f"the tokenizer lacks the special tokens {missing}")
    state_dict = {k: v for k, v in strip_compile_prefix(state_dict).items()}
    fmt, mismatches = choose_format(fmt, config, state_dict)
    torch_dtype = DTYPES[dtype]
    state_dict = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("model*.safetensors*")] + [p.name for p in out.glob(PADDING_FILE)]
    for p in stale:
        (out / p).unlink()
    files = []
    if fmt == "native":
        tensors, padding = native_tensors(config, state_dict)
        cfg = native_config(config, tokenizer, torch_dtype)
        files += save_tensors(tensors, out, max_shard_bytes)
        if padding:
            from safetensors.torch import save_file

            save_file({k: v.contiguous().clone() for k, v in padding.items()}, str(out / PADDING_FILE),
                      metadata={"format": "pt", "rows_from": str(config.vocab_size)})
            files.append(PADDING_FILE)
        for f in REMOTE_FILES:
            (out / f).unlink(missing_ok=True)
    else:
        cfg = remote_config(config, tokenizer, torch_dtype)
        files += save_tensors(remote_tensors(state_dict), out, max_shard_bytes)
        for f in REMOTE_FILES:
            shutil.copyfile(REMOTE_DIR / f, out / f)
            files.append(f)
    cfg["nanochat_source"] = {"phase": source, "step": (meta or {}).get("step")}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    hf_tokenizer_object(tokenizer).save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tokenizer, config, chat=source != "base")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: tok_cfg[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}, indent=2) + "\n")
    files += ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json"]
    records = run_records(Path(run_folder) if run_folder else None, meta or {})
    with torch.device("meta"):
        num_params = GPT(config).num_params()
    card = model_card(config, num_params, fmt, source, records, dtype,
                      name or f"nanochat d{config.n_layer} ({source})")
    (out / "README.md").write_text(card)
    files.append("README.md")
    return ExportResult(out, fmt, files, mismatches)


def export_model(model, tokenizer: Tokenizer, out_dir, **kwargs) -> ExportResult:
    """`export` for a loaded GPT."""
    return export(model.config, model.state_dict(), tokenizer, out_dir, **kwargs)

