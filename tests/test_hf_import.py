"""The command lines: export a checkpoint of a base dir, import it back, evaluate the export.

- export (scripts/export_hf.py) then import (scripts/import_hf.py) gives bit-identical weights and the
  same model config, for both formats; a native export of an unsupported config fails with the list
- a native folder without our extras (as transformers' own converter writes them) imports too
- the model card reports the run's records
- base_eval --hf-path EXPORT gives our bpb (1e-4 relative) and our CORE decisions
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint  # noqa: E402
from nanochat.hf_export import PADDING_FILE  # noqa: E402
from nanochat.run_dir import run_dir, write_run_json  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from tests.test_hf_export import FULL, PLAIN, VOCAB, _documents, randomized, text_rows  # noqa: E402

STEP = 7


@pytest.fixture(autouse=True)
def _one_thread():
    # the CI box is shared: one thread avoids oversubscription (10x slower generation measured at load 11)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextmanager
def base_env(base: Path):
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(base)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR", None)
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base dir with a tokenizer, data shards and two checkpoints (tags plain / full) with run records."""
    from nanochat.data_prep import prepare

    docs = _documents()
    base = tmp_path_factory.mktemp("base")
    tok = Tokenizer.train_from_iterator(docs, vocab_size=VOCAB)
    tok.save(base / "tokenizer")
    prepare(docs, data_dir=base / "base_data", val_fraction=0.1, rows_per_group=32, verbose=False)
    for tag, cfg, seed in (("plain", PLAIN, 1), ("full", FULL, 2)):
        folder = run_dir("base", tag, base)
        model = randomized(cfg, seed)
        save_checkpoint(folder, STEP, model.state_dict(), None, {"model_config": cfg.to_dict(), "val_bpb": 2.3456})
        write_run_json(folder, {"args": {"depth": cfg.n_layer, "model_tag": tag}, "model_config": cfg.to_dict(),
                                "sizing": {"total_tokens": 3584}})
        records = [{"step": s, "loss": 5.0 - s / 10, "tokens": 512 * s, "flops": 1e9 * s} for s in range(1, STEP + 1)]
        records[-1].update(val_bpb=2.3456, core=0.0123)
        records.append({"step": STEP + 1, "core": 0.9})  # after the exported step: must not be reported
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return base


def _export(base: Path, tag: str, out: Path, *extra: str) -> int:
    from scripts.export_hf import main

    with base_env(base):
        return main(["--source", "base", "--model-tag", tag, "--step", str(STEP), "--out", str(out), *extra])


@pytest.mark.parametrize("tag,fmt", [("plain", "native"), ("full", "remote"), ("plain", "remote")])
def test_export_then_import_is_bit_identical(base, tmp_path, tag, fmt, capsys):
    from scripts.import_hf import main as import_main

    out = tmp_path / "hf"
    assert _export(base, tag, out, "--format", fmt) == 0
    assert f"as {fmt} (fp32)" in capsys.readouterr().out
    with base_env(base):
        assert import_main(["--hf-path", str(out), "--model-tag", f"{tag}-{fmt}-back"]) == 0
    original, _, meta0 = load_checkpoint(run_dir("base", tag, base), STEP)
    back, _, meta1 = load_checkpoint(run_dir("base", f"{tag}-{fmt}-back", base), STEP)
    assert meta1["model_config"] == meta0["model_config"]
    assert set(back) == set(original)
    for k in original:
        assert back[k].dtype == original[k].dtype and torch.equal(back[k], original[k]), k
    with base_env(base):  # a second import of the same step refuses to overwrite
        assert import_main(["--hf-path", str(out), "--model-tag", f"{tag}-{fmt}-back"]) == 2


def test_import_of_a_plain_native_folder_without_our_extras(base, tmp_path, capsys):
    """A `nanochat` folder as transformers' converter writes it: no nanochat_config, no padding file,
    the native default rms_norm_eps (1e-6, ours is float32's eps)."""
    from nanochat.checkpoint_manager import load_model
    from scripts.import_hf import main as import_main

    out = tmp_path / "public"
    assert _export(base, "plain", out) == 0
    cfg = json.loads((out / "config.json").read_text())
    del cfg["nanochat_config"], cfg["nanochat_source"]
    cfg["rms_norm_eps"] = 1e-6
    (out / "config.json").write_text(json.dumps(cfg))
    (out / PADDING_FILE).unlink()
    fresh = tmp_path / "fresh_base"  # no tokenizer yet: the import writes it
    with base_env(fresh):
        assert import_main(["--hf-path", str(out), "--phase", "sft", "--model-tag", "pub"]) == 0
        model, tok, _ = load_model("sft", "cpu", model_tag="pub", step=0, compute_dtype=torch.float32)
    assert "note: rms_norm_eps 1e-06" in capsys.readouterr().out
    assert tok.mergeable_ranks == Tokenizer.from_directory(base / "tokenizer").mergeable_ranks
    assert model.config.to_dict() == PLAIN.to_dict()
    assert torch.count_nonzero(model.wte.weight[VOCAB:]) == 0  # padding rows: zeros, never read
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    idx = text_rows(tok, _documents(), 2, 64)
    with torch.no_grad():
        assert (model(idx) - hf(input_ids=idx).logits).abs().max().item() <= 1e-4


def test_import_rejects_other_model_types(tmp_path, capsys):
    from scripts.import_hf import main as import_main

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert import_main(["--hf-path", str(tmp_path)]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err
    assert import_main(["--hf-path", str(tmp_path / "missing")]) == 2
    assert "not a local folder" in capsys.readouterr().err


def test_native_export_cli_fails_with_field_list(base, tmp_path, capsys):
    assert _export(base, "plain", tmp_path / "ok", "--format", "native") == 0
    capsys.readouterr()
    assert _export(base, "full", tmp_path / "bad", "--format", "native") == 2
    err = capsys.readouterr().err
    for field in ("window_pattern", "value_embeds", "resid_scalars", "qk_gain"):
        assert f"  - {field}=" in err
    assert not (tmp_path / "bad" / "config.json").exists()


def test_model_card_reports_the_run_records(base, tmp_path):
    out = tmp_path / "card"
    assert _export(base, "full", out, "--dtype", "bf16") == 0
    card = (out / "README.md").read_text()
    model = randomized(FULL, 0)
    n = model.num_params()
    for fact in ("validation bits per byte: 2.3456", "CORE: 0.0123", "training tokens: 3,584",
                 f"total: {n['total']:,}", f"scaling (block matrices + head): {n['scaling']:,}",
                 "weights in bf16", "trust_remote_code=True", "SSSL -> [16, 64]", "ChatCORE: n/a"):
        assert fact in card, fact
    assert "0.9000" not in card
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _base_eval(base: Path, out: Path, *extra: str, bundle: Path | None) -> dict:
    from scripts.base_eval import main

    parts = "bpb,core" if bundle else "bpb"
    args = ["--eval", parts, "--split-tokens", "4096", "--device-batch-size", "2", "--seq-len", "64",
            "--device-type", "cpu", "--dtype", "float32", "--out", str(out / "result.json")]
    if bundle:
        args += ["--eval-bundle", str(bundle), "--tasks", "copa,winograd,lambada_openai,bigbench_dyck_languages",
                 "--max-per-task", "12", "--dump-examples", str(out / "examples.jsonl")]
    with base_env(base):
        return main(args + list(extra))


@pytest.mark.slow
@pytest.mark.parametrize("tag,fmt", [("plain", "native"), ("full", "remote")])
def test_base_eval_of_the_export_matches_ours(base, tmp_path, tag, fmt, shared_data_optional):
    bundle = shared_data_optional / "eval_bundle" if shared_data_optional is not None else None
    out = tmp_path / "hf"
    assert _export(base, tag, out, "--format", fmt) == 0
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours = _base_eval(base, tmp_path / "ours", "--model-tag", tag, "--step", str(STEP), bundle=bundle)
    theirs = _base_eval(base, tmp_path / "theirs", "--hf-path", str(out),
                        *(["--trust-remote-code"] if fmt == "remote" else []), bundle=bundle)
    for split in ("train_bpb", "val_bpb"):
        assert abs(theirs[split] - ours[split]) <= 1e-4 * ours[split], (split, ours[split], theirs[split])
    if bundle is not None:
        a = [json.loads(line) for line in (tmp_path / "ours" / "examples.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (tmp_path / "theirs" / "examples.jsonl").read_text().splitlines()]
        assert len(a) == len(b) > 20
        strip = lambda d: {k: v for k, v in d.items() if k != "scores"}  # noqa: E731
        assert [strip(d) for d in a] == [strip(d) for d in b]
        assert ours["core"] == theirs["core"]
