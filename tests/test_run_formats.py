"""Run-format parsers: nanoGPT logs + configs (never executed), karpathy/nanochat logs, wandb exports, and
the formats of issue 28 (HF Trainer, TensorBoard, llm.c, modded-nanogpt, our own console output)."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat import run_formats as fr
from nanochat.run_formats import nanogpt as ng
from nanochat.run_formats import shapes
from nanochat.run_formats._text import size_claims

FIX = Path(__file__).resolve().parent / "fixtures"


class NanoGPTShape(nn.Module):
    """nanoGPT's GPT module tree (model.py): wte tied to lm_head, wpe, LayerNorm(bias), per block c_attn
    (3C), c_proj, c_fc (4C), c_proj; only the shapes matter for counting."""

    def __init__(self, n_layer, n_embd, vocab, block, bias):
        super().__init__()
        C = n_embd
        self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(block, C)
        self.h = nn.ModuleList()
        for _ in range(n_layer):
            self.h.append(nn.ModuleList([nn.LayerNorm(C, bias=bias), nn.Linear(C, 3 * C, bias=bias),
                                         nn.Linear(C, C, bias=bias), nn.LayerNorm(C, bias=bias),
                                         nn.Linear(C, 4 * C, bias=bias), nn.Linear(4 * C, C, bias=bias)]))
        self.ln_f = nn.LayerNorm(C, bias=bias)
        self.lm_head = nn.Linear(C, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying


@pytest.mark.parametrize("shape", [(2, 64, 300, 32, True), (3, 96, 517, 64, False), (1, 48, 65, 16, True)])
def test_nanogpt_params_match_the_module(shape):
    with torch.device("meta"):
        m = NanoGPTShape(*shape)
    total = sum(p.numel() for p in m.parameters())  # parameters() counts the tied weight once
    c = shapes.nanogpt_params(*shape)
    assert c["total"] == total
    assert c["printed"] == total - m.wpe.weight.numel()  # get_num_params(non_embedding=True)


def test_nanogpt_params_match_its_published_prints():
    # nanoGPT's README: the baby Shakespeare GPT (6 x 384, vocab 65, block 256, no bias) prints 10.65M;
    # GPT-2 small with biases and the padded 50304 vocab prints 123.69M
    assert round(shapes.nanogpt_params(6, 384, 65, 256, False)["printed"] / 1e6, 2) == 10.65
    assert round(shapes.nanogpt_params(12, 768, 50304, 1024, True)["printed"] / 1e6, 2) == 123.69


def test_config_is_read_not_executed(tmp_path):
    marker = tmp_path / "executed"
    cfg = tmp_path / "cfg.py"
    cfg.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
                   "n_layer = 12  # ~125M params\nbatch = 5 * 8\nname = 'gpt2-' + 'small'\nlr = compute_lr()\n")
    out = ng.read_config_py(cfg)
    assert not marker.exists()
    assert out["values"] == {"n_layer": 12, "batch": 40, "name": "gpt2-small"}
    assert out["unreadable"] == ["lr"]
    assert out["comments"] == [{"line": 3, "text": "~125M params", "name": "n_layer"}]
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = (\n")
    with pytest.raises(fr.RunFormatError, match="not valid Python"):
        ng.read_config_py(bad)


def test_size_claims():
    assert [c["value"] for c in size_claims("GPT-2 small, ~124M parameters, 8k context", "x")] == [124e6]
    assert [c["value"] for c in size_claims("a 1.3B model", "x")] == [1.3e9]
    assert [c["value"] for c in size_claims("finetune gpt2-medium", "x")] == [350e6]
    assert size_claims("lr 6e-4, 4k vocab", "x") == []


def test_explain_size_gap_finds_the_typo():
    dims = dict(n_layer=12, n_head=12, n_embd=1024, vocab_size=50304, block_size=1024, bias=False)
    gap = shapes.explain_size_gap(dims, 124.4e6)
    assert gap[0]["dim"] == "n_embd" and gap[0]["value"] == 768
    dims = dict(n_layer=48, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, bias=False)  # 12 -> 48 layers
    g = shapes.explain_size_gap(dims, 124.4e6)[0]
    assert (g["dim"], g["value"], g["known"]) == ("n_layer", 12, "GPT-2 small")
    assert g["count"] == shapes.nanogpt_params(12, 768, 50304, 1024)["total"] and g["relative_change"] == pytest.approx(1.386, abs=0.01)


def test_size_gap_ranks_the_known_shape_first_and_drops_absurd_changes():
    """Issue 28: "~125M" with n_layer 12, n_head 12, n_embd 384 led with vocab_size=269176, then n_embd=768, then
    n_layer=59. An expert names the width: 768 is GPT-2 small's, one standard change."""
    dims = dict(n_layer=12, n_head=12, n_embd=384, vocab_size=50304, block_size=1024, bias=False)
    gap = shapes.explain_size_gap(dims, 125e6)
    assert gap[0]["changes"] == {"n_embd": 768} and gap[0]["known"] == "GPT-2 small"
    assert abs(gap[0]["count"] - 125e6) / 125e6 < 0.02
    assert not any(g["changes"].get("vocab_size") == 269176 or g["changes"].get("n_layer") == 59 for g in gap)
    for g in gap:  # every candidate lands near the target, and none is a > 3x jump of one field
        assert g["relative_error"] <= 0.1 and (g["known"] or g["relative_change"] <= math.log(3) + 1e-9)


@pytest.mark.parametrize("name, kind", [("nanogpt_typo.log", "nanogpt"), ("nanochat_base_train.log", "karpathy-nanochat"),
                                        ("wandb_nanogpt_history.csv", "wandb"), ("wandb_nanochat_history.jsonl", "wandb")])
def test_detect(name, kind):
    assert fr.detect(FIX / name).name == kind


def test_detect_rejects_other_files(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\nworld\n")
    with pytest.raises(fr.RunFormatError, match="none of the formats.*Hugging Face Trainer.*TensorBoard.*llm.c"):
        fr.detect(p)
    with pytest.raises(FileNotFoundError):
        fr.detect(tmp_path / "missing.log")


def test_parse_nanogpt_log_and_config():
    run = fr.parse(FIX / "nanogpt_typo.log", FIX / "nanogpt_typo_config.py")
    info = run.info
    assert info["printed_params"] == pytest.approx(202.53e6)
    assert info["dims"] == dict(n_layer=12, n_head=12, n_embd=1024, block_size=1024, bias=False, vocab_size=50304)
    assert info["sizing"]["tokens_per_step"] == 491520 and info["sizing"]["total_tokens"] == 3000 * 491520
    assert {c["text"] for c in info["claims"]} == {"~124M", "124M"}
    assert info["config"]["gradient_accumulation_steps"] == 40
    recs = {m["step"]: m for m in run.metrics}
    assert "mfu" not in recs[0] and "mfu" not in recs[40]  # train.py prints -100.00% before its 5th log line
    assert recs[50]["mfu"] > 0.2 and recs[250]["val_loss"] > 0 and recs[250]["eval_train_loss"] > 0
    assert recs[250]["tokens"] == 250 * 491520
    assert recs[0]["lr"] == pytest.approx(1 / 101)  # nanoGPT's warmup: (it + 1) / (warmup_iters + 1)
    # without --config: defaults plus the log's own lines, and the gap is reported
    bare = fr.parse(FIX / "nanogpt_typo.log")
    assert any("config file" in s for s in bare.skipped) and bare.info["dims"]["n_embd"] == 768


def test_nanogpt_command_line_overrides(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("Overriding: n_layer = 4\nOverriding: dropout = 0.2\ntokens per iteration will be: 8,192\n"
                   "found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)\nnumber of parameters: 0.80M\n"
                   "step 0: train loss 4.2000, val loss 4.2100\niter 0: loss 4.1900, time 100.00ms, mfu -100.00%\n")
    run = fr.parse(log)
    assert run.info["dims"]["n_layer"] == 4 and run.info["dropout"] == 0.2 and run.info["dims"]["vocab_size"] == 65
    assert run.info["config_set_by"]["n_layer"] == "the command line (log)"


def test_parse_karpathy_nanochat_log_inverts_the_ema(tmp_path):
    run = fr.parse(FIX / "nanochat_base_train.log")
    info = run.info
    assert info["counts_table"]["transformer_matrices"] == 10616832
    assert info["sizing"]["scaling_params"] == 10616832 + 12582912
    assert info["sizing"]["tokens_per_step"] == 524288 and info["sizing"]["num_iterations"] == 465
    assert info["mfu_peak_flops"] == 9.89e14 and info["model_config"]["n_layer"] == 6
    assert {m["step"] for m in run.metrics if "val_bpb" in m} == {0, 100, 200}
    # the EMA inversion against losses we choose: print them as base_train does, parse them back
    raw = [5.0, 4.7, 4.9, 4.4, 4.5, 4.2]
    ema, lines = 0.0, []
    for t, x in enumerate(raw):
        ema = 0.9 * ema + 0.1 * x
        lines.append(f"step {t:05d}/00006 ({100 * t / 6:.2f}%) | loss: {ema / (1 - 0.9 ** (t + 1)):.6f} | lrm: 1.00 | "
                     "dt: 10.00ms | tok/sec: 1,000 | bf16_mfu: 1.00 | epoch: 1 pq: 0 rg: 0 | total time: 0.00m")
    log = tmp_path / "b.log"
    log.write_text("\n".join(lines) + "\n")
    back = [m["raw_loss"] for m in fr.parse(log).metrics]
    assert back == pytest.approx(raw, abs=1e-4)
    assert any("Total batch size" in s for s in fr.parse(log).skipped)  # tokens per step not printed: said, not guessed


def test_parse_wandb_exports():
    run = fr.parse(FIX / "wandb_nanogpt_history.csv", FIX / "nanogpt_typo_config.py")
    recs = {m["step"]: m for m in run.metrics}
    assert recs[1000]["val_loss"] > 0 and recs[1000]["mfu"] == pytest.approx(0.30)
    assert max(m["lr"] for m in run.metrics) == pytest.approx(1.0)  # absolute LR -> multiplier of its peak
    assert recs[1000]["tokens"] == 1000 * 12 * 1024 * 40  # from the config: batch x block x accumulation
    jl = fr.parse(FIX / "wandb_nanochat_history.jsonl")
    assert [m["step"] for m in jl.metrics] == [0, 100, 200]  # the cut line is skipped
    assert any(s.startswith("tokens") for s in jl.skipped)
    assert json.dumps(jl.info, default=str)
