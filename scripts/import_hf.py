"""Import a Hugging Face `nanochat` folder (native type or our remote-code export) as our checkpoint.

    python -m scripts.import_hf --hf-path hf/d20-chat --phase sft --model-tag d20-imported
    python -m scripts.import_hf --hf-path /models/nanochat-d32 --phase sft --model-tag d32 --step 0

Writes `<base>/<phase dir>/<model tag>/model_<step>.pt` + `meta_<step>.json` and, when the base dir has
no tokenizer yet, `<base>/tokenizer/` (an existing different tokenizer is an error: use another
NANOCHAT_BASE_DIR). The folder must be local (download it first; nothing is fetched here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # `python scripts/import_hf.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.hf_import import HFImportError, import_folder  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Import a Hugging Face nanochat folder as a nanochat checkpoint")
    p.add_argument("--hf-path", required=True, help="local folder with config.json, *.safetensors, tokenizer.json")
    p.add_argument("--phase", default=None, choices=["base", "mid", "sft", "rl"],
                   help="phase to file it under (default: the one recorded by our export, else sft)")
    p.add_argument("--model-tag", default=None, help="model tag (default: the folder's name)")
    p.add_argument("--step", type=int, default=None, help="step number to save as (default: the recorded one, else 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing checkpoint of that tag and step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nanochat.checkpoint_manager import meta_path, save_checkpoint
    from nanochat.common import get_base_dir
    from nanochat.run_dir import run_dir
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir

    folder = Path(args.hf_path)
    if not folder.is_dir():
        print(f"import_hf: {folder} is not a local folder; download the model first (e.g. `hf download NAME "
              f"--local-dir DIR`) and pass DIR", file=sys.stderr)
        return 2
    try:
        config, state, tokenizer, source = import_folder(folder)
    except (HFImportError, FileNotFoundError) as e:
        print(f"import_hf: {e}", file=sys.stderr)
        return 2
    phase = args.phase or source.get("phase") or "sft"
    step = args.step if args.step is not None else (source.get("step") or 0)
    tag = args.model_tag or folder.resolve().name
    base = get_base_dir()
    tok_dir = get_tokenizer_dir(base)
    if (tok_dir / "meta.json").is_file():
        existing = Tokenizer.from_directory(tok_dir)
        if (existing.mergeable_ranks != tokenizer.mergeable_ranks or existing.special_tokens != tokenizer.special_tokens
                or existing.pattern != tokenizer.pattern):
            print(f"import_hf: {tok_dir} holds a different tokenizer; import into a fresh base dir "
                  f"(NANOCHAT_BASE_DIR=...) so the model and its tokenizer stay together", file=sys.stderr)
            return 2
    else:
        tokenizer.save(tok_dir)
        print(f"wrote the tokenizer to {tok_dir}")
    out = run_dir(phase, tag, base)
    if meta_path(out, step).exists() and not args.force:
        print(f"import_hf: {out} already has step {step}; pass --force to overwrite or choose --model-tag/--step",
              file=sys.stderr)
        return 2
    meta = {"model_config": config.to_dict(), "imported_from": str(folder.resolve()), "phase": phase}
    save_checkpoint(out, step, state, None, meta)
    for note in source.get("notes", []):
        print(f"note: {note}")
    print(f"imported {folder} as {phase}/{tag} step {step} ({sum(t.numel() for t in state.values()):,} parameters) "
          f"into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
