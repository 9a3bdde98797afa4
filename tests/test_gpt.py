"""The GPT against hand counts, naive attention and its own invariants (causality, reductions)."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.attention import auto_backend, sdpa_attend
from nanochat.gpt import GPT, GPTConfig
from nanochat.sizing import count_params, flops_per_token, model_config


def build(config, dtype=torch.float32, meta=True, seed=None):
    if meta:
        with torch.device("meta"):
            model = GPT(config, compute_dtype=dtype)
        model.to_empty(device="cpu")
    else:
        model = GPT(config, compute_dtype=dtype)
    if seed is not None:
        torch.manual_seed(seed)
    model.init_weights()
    return model


def small(**kw):
    base = dict(sequence_len=32, vocab_size=100, n_layer=2, n_head=4, n_kv_head=4, n_embd=64)
    base.update(kw)
    return GPTConfig(**base)


def randomize(model, seed=0):
    """Zero-initialised projections hide bugs: give every weight a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


VARIANTS = [dict(), dict(n_kv_head=1), dict(n_kv_head=2, window_pattern="SL"),
            dict(value_embeds=True, resid_scalars=True, window_pattern="SSSL", n_layer=3)]


@pytest.mark.parametrize("kw", VARIANTS)
def test_shapes_and_padded_vocab(kw):
    model = build(small(**kw))
    idx = torch.randint(0, 100, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 100) and logits.dtype == torch.float32
    assert model.wte.weight.shape[0] == 128  # padded to a multiple of 64
    assert logits.abs().max() <= model.config.logit_softcap


@pytest.mark.parametrize("kw", VARIANTS)
def test_causality(kw):
    model = randomize(build(small(**kw)))
    idx = torch.randint(0, 100, (2, 20))
    base = model(idx)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 100
    out = model(changed)
    torch.testing.assert_close(out[:, :12], base[:, :12])
    assert not torch.allclose(out[:, 12:], base[:, 12:])


def test_loss_reductions_agree():
    model = randomize(build(small()))
    idx = torch.randint(0, 100, (2, 16))
    tgt = torch.randint(0, 100, (2, 16))
    tgt[0, :5] = -1  # ignored
    per_tok = model(idx, tgt, loss_reduction="none")
    assert per_tok.shape == (2, 16)
    assert (per_tok[0, :5] == 0).all()
    total = model(idx, tgt, loss_reduction="sum")
    mean = model(idx, tgt, loss_reduction="mean")
    torch.testing.assert_close(per_tok.sum(), total)
    torch.testing.assert_close(mean, total / (tgt != -1).sum())
    # and against an independent cross-entropy on the logits
    logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, 100), tgt.view(-1), ignore_index=-1)
    torch.testing.assert_close(mean, ref)
    with pytest.raises(ValueError):
        model(idx, tgt, loss_reduction="avg")


@pytest.mark.parametrize("kw", VARIANTS)
def test_param_counts_match_closed_form(kw):
    config = small(**kw)
    model = build(config)
    assert model.num_params() == count_params(config)
    assert model.num_params()["total"] == sum(p.numel() for p in model.parameters())


def test_param_count_by_hand():
    # depth 4 -> width 256 (2 heads of 128), vocab 1000 -> padded 1024
    config = model_config(4, max_seq_len=64, vocab_size=1000)
    c = count_params(config)
    per_layer = 4 * 256 * 256 + 8 * 256 * 256
    assert c["scaling"] == 4 * per_layer + 1024 * 256
    assert c["embedding"] == 1024 * 256
    assert c["total"] == c["scaling"] + c["embedding"]


def test_flops_by_hand():
    config = small(window_pattern="SL")  # layer 0 window 8, layer 1 (last) full 32
    scaling = count_params(config)["scaling"]
    by_hand = 6 * scaling + 12 * 4 * 16 * 8 + 12 * 4 * 16 * 32
    assert flops_per_token(config) == by_hand
    assert build(config).estimate_flops() == by_hand


def naive_attention(q, k, v, window):
    # q (B,T,H,D), k/v (B,T,K,D): explicit loops over heads with repeat for GQA
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j < window)), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


@pytest.mark.parametrize("n_kv,window", [(4, 12), (2, 12), (1, 5), (2, 1)])
def test_attention_matches_naive(n_kv, window):
    q = torch.randn(2, 12, 4, 8)
    k, v = torch.randn(2, 12, n_kv, 8), torch.randn(2, 12, n_kv, 8)
    torch.testing.assert_close(sdpa_attend(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_flash_attention_falls_back_to_sdpa_on_cpu():
    q = torch.randn(1, 4, 2, 8)
    assert auto_backend(q.device.type, q.dtype, windowed=True) == "sdpa"
    assert auto_backend(q.device.type, torch.bfloat16, windowed=True) == "sdpa"


def test_sliding_window_limits_receptive_field():
    # a 1-layer model with window 4: the logit at position t depends only on tokens t-3..t
    config = small(n_layer=1, sequence_len=16, window_pattern="S")
    config.window_pattern = "S"
    model = randomize(build(config))
    model.windows = [4]
    idx = torch.randint(0, 100, (1, 16))
    base = model(idx)
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 100
    out = model(changed)
    torch.testing.assert_close(out[0, 6:], base[0, 6:])  # position >= 2 + 4 no longer sees token 2
    assert not torch.allclose(out[0, 2:6], base[0, 2:6])


def test_meta_construction_equals_eager_and_is_seeded():
    config = small(value_embeds=True, resid_scalars=True)
    a = build(config, meta=True, seed=3)
    b = build(config, meta=False, seed=3)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na
    torch.testing.assert_close(a.cos, b.cos)


def test_bf16_compute_keeps_fp32_master_weights():
    model = randomize(build(small(), dtype=torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    idx = torch.randint(0, 100, (2, 8))
    logits = model(idx)
    assert logits.dtype == torch.float32
    ref = randomize(build(small()))
    torch.testing.assert_close(logits, ref(idx), atol=0.1, rtol=0.05)


def test_param_groups_cover_everything_once():
    model = build(small(value_embeds=True, resid_scalars=True))
    groups = model.param_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in groups["matrix"])


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        small(n_kv_head=3)
    with pytest.raises(ValueError, match="window_pattern"):
        small(window_pattern="SXL")
    with pytest.raises(ValueError, match="n-kv-head"):
        model_config(4, n_kv_head=3)


def test_depth4_trains_and_loss_falls():
    torch.manual_seed(0)
    config = model_config(2, aspect_ratio=64, head_dim=64, max_seq_len=32, vocab_size=64)
    model = build(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # a learnable stream: a repeating pattern
    data = torch.arange(33).remainder(7).repeat(4, 1)
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_logits_at_positions_equal_full_logits():
    model = randomize(build(small(value_embeds=True)))
    idx = torch.randint(0, 100, (3, 12))
    rows, cols = torch.tensor([0, 0, 2, 1]), torch.tensor([0, 11, 5, 7])
    full = model(idx)
    torch.testing.assert_close(model(idx, positions=(rows, cols)), full[rows, cols])
    with pytest.raises(ValueError, match="positions"):
        model(idx, idx, positions=(rows, cols))


def test_building_on_meta_does_not_import_dynamo():
    """Initialising meta tensors computes nothing, but torch's meta normal_/uniform_ import torch._dynamo
    (~1.7 s): every process that builds a model would pay it. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom nanochat.gpt import GPT, GPTConfig\n"
            "with torch.device('meta'):\n"
            "    m = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,"
            " value_embeds=True))\n"
            "m.to_empty(device='cpu'); m.init_weights()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
    assert GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2,
                         n_embd=32)).wte.weight.abs().sum() > 0  # off the meta device, nn's own init still runs
