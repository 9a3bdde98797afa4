"""Attention backends (nanochat/attention.py) against SDPA with an explicit mask.

The reference for every case is `F.scaled_dot_product_attention` with the (T, S) boolean mask written
out and the kv heads repeated for GQA: no is_causal shortcut, no enable_gqa. FlexAttention runs on
CPU forward only (torch has no CPU backward for it); its backward, FA3 and FA4 are checked in
tests/test_cuda.py on a GPU.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

from nanochat.attention import (ATTENTION_CHOICES, FlexAttention, SDPAAttention, auto_backend, resolve_attention,
                                sdpa_attend, windowed_kernel_available)
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig

CASES = [  # (H, K, window): causal, windowed, GQA, GQA + window, window of 1
    (4, 4, 64), (4, 4, 16), (4, 2, 64), (4, 1, 24), (2, 2, 1)]


def reference(q, k, v, window, q_offset=0):
    """SDPA with the mask written out and kv heads repeated: (B, T, H, D)."""
    B, T, H, D = q.shape
    S, K = k.size(1), k.size(2)
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    i = torch.arange(q_offset, q_offset + T)[:, None]
    j = torch.arange(S)[None, :]
    mask = (j <= i) & (i - j < window)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return y.transpose(1, 2)


def qkv(B=2, T=64, H=4, K=4, D=16, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    ts = [torch.randn(B, T, n, D, generator=g) for n in (H, K, K)]
    return [t.requires_grad_(requires_grad) for t in ts]


@pytest.mark.parametrize("H,K,window", CASES)
def test_sdpa_forward_and_backward_match_explicit_mask(H, K, window):
    q, k, v = qkv(H=H, K=K, requires_grad=True)
    y = sdpa_attend(q, k, v, window)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), g)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    y_ref = reference(q2, k2, v2, window)
    grads_ref = torch.autograd.grad(y_ref, (q2, k2, v2), g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,K,window", CASES)
def test_flex_forward_matches_explicit_mask(H, K, window):
    flex = FlexAttention("cpu")
    q, k, v = qkv(H=H, K=K)
    torch.testing.assert_close(flex(q, k, v, window), reference(q, k, v, window), atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_the_causal_window_and_cached():
    flex = FlexAttention("cpu")
    T, window = 64, 24
    mask = flex.block_mask(T, window, "cpu")
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    expected = (j <= i) & (i - j < window)
    # the block mask's element-wise predicate, evaluated everywhere, is the reference mask
    dense = mask.mask_mod(torch.zeros(()), torch.zeros(()), i, j)
    assert torch.equal(dense, expected)
    assert flex.block_mask(T, window, "cpu") is mask  # built once per (T, window, device)
    flex.prepare(T, [24, 64, 64], "cpu")
    assert len(flex._masks) == 2


def test_flex_on_uneven_length_and_window_wider_than_context():
    flex = FlexAttention("cpu")
    q, k, v = qkv(T=37, H=4, K=2)
    for window in (5, 37, 100):
        torch.testing.assert_close(flex(q, k, v, window), reference(q, k, v, min(window, 37)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("H,K,window", [(4, 2, 16), (4, 4, 64)])
def test_kv_cache_decode_matches_explicit_mask(backend, H, K, window):
    attn = resolve_attention(backend, "cpu", torch.float32)
    q, k, v = qkv(T=40, H=H, K=K)
    full = reference(q, k, v, window)
    # prefill 30 positions, then decode 1, 1, then a chunk of 8 (positions 30..39)
    pieces, pos = [], 0
    for n in (30, 1, 1, 8):
        end = pos + n
        pieces.append(attn(q[:, pos:end], k[:, :end], v[:, :end], window, q_offset=pos))
        pos = end
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def small_config(**kw):
    base = dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                window_pattern="SL", value_embeds=True, resid_scalars=True)
    return GPTConfig(**{**base, **kw})


def build(config, attention):
    torch.manual_seed(0)
    model = GPT(config, attention=attention)
    model.init_weights()
    with torch.no_grad():  # non-zero output projections, so attention matters to the logits
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
    return model


def test_model_with_flex_equals_model_with_sdpa_and_decodes():
    config = small_config()
    idx = torch.randint(0, 300, (2, 64))
    sdpa, flex = build(config, "sdpa"), build(config, "flex")
    assert flex.attention_backend == "flex (KV-cache decode: sdpa)"
    assert sdpa.attention_backend == "sdpa"
    with torch.no_grad():
        ref = sdpa(idx)
        torch.testing.assert_close(flex(idx), ref, atol=1e-4, rtol=1e-4)
        # KV cache: prefill 48, then 16 single-token steps, logits equal to the full forward's
        cache = KVCache.for_model(flex, batch_size=2, max_len=64)
        out = [flex(idx[:, :48], kv_cache=cache)]
        for t in range(48, 64):
            out.append(flex(idx[:, t:t + 1], kv_cache=cache))
        torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)


def test_model_training_step_is_identical_across_cpu_backends():
    # on CPU a flex model trains through SDPA (no CPU backward for flex): same loss, same gradients
    config = small_config()
    x, y = torch.randint(0, 300, (2, 64)), torch.randint(0, 300, (2, 64))
    losses, grads = [], []
    for backend in ("sdpa", "flex"):
        model = build(config, backend)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == losses[1]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_backend_is_resolved_once_per_model(monkeypatch):
    import nanochat.gpt as gpt

    calls = []
    real = gpt.resolve_attention
    monkeypatch.setattr(gpt, "resolve_attention", lambda *a, **k: calls.append(a) or real(*a, **k))
    model = build(small_config(), "auto")
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        for _ in range(3):
            model(idx)
    assert len(calls) == 1 and model.attention_backend == "sdpa"


def test_auto_choice_and_refusals_on_cpu():
    assert auto_backend("cpu", torch.float32, windowed=True) == "sdpa"
    assert auto_backend("cpu", torch.bfloat16, windowed=False) == "sdpa"
    assert not windowed_kernel_available("cpu", torch.float32)
    assert isinstance(resolve_attention("auto", "cpu", torch.float32), SDPAAttention)
    for name in ("fa3", "fa4"):
        with pytest.raises(ValueError, match=f"--attention {name} cannot run here: {name} needs a CUDA GPU"):
            resolve_attention(name, "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="not one of"):
        resolve_attention("flash", "cpu", torch.float32)
    assert ATTENTION_CHOICES == ("auto", "fa3", "fa4", "flex-fa4", "flex", "sdpa")
    with pytest.raises(ValueError, match="--attention flex-fa4 cannot run here: flex-fa4 needs a CUDA GPU"):
        resolve_attention("flex-fa4", "cpu", torch.bfloat16)


def test_flex_fa4_is_found_by_capability_and_ranked_after_direct_fa4(monkeypatch):
    """FlexAttention's FA4 backend: chosen by what is there (the torch module that implements it, an sm90 /
    sm100 GPU, flash_attn.cute), never by version; `auto` takes it after FA4 itself (same kernels, called
    directly) and before flex's Triton kernels. The GPU-side facts are stood in for; the kernel itself is
    checked against SDPA by tests/test_cuda.py where it runs."""
    import nanochat.attention as attention

    present = {"torch._inductor.kernel.flex.flex_flash_attention": True, "flash_attn.cute": True}
    monkeypatch.setattr(attention, "_module_exists", lambda name: present.get(name, False))
    monkeypatch.setattr(attention, "_capability", lambda device_type: (9, 0))
    monkeypatch.setattr(attention, "load_fa3", lambda: None)
    monkeypatch.setattr(attention, "load_fa4", lambda: None)  # direct FA4 unavailable: flex-fa4 is next
    bf16 = torch.bfloat16
    assert attention.unavailable_reason("flex-fa4", "cuda", bf16) is None
    assert attention.auto_backend("cuda", bf16, windowed=True) == "flex-fa4"
    assert attention.auto_backend("cuda", bf16, windowed=False) == "sdpa"  # full causal: SDPA's flash kernel
    monkeypatch.setattr(attention, "load_fa4", lambda: (lambda *a, **k: None))
    assert attention.auto_backend("cuda", bf16, windowed=True) == "fa4"
    monkeypatch.setattr(attention, "load_fa4", lambda: None)
    monkeypatch.setattr(attention, "_capability", lambda device_type: (8, 0))
    assert "sm80" in attention.unavailable_reason("flex-fa4", "cuda", bf16)
    assert attention.auto_backend("cuda", bf16, windowed=True) == "flex"  # an A100: the Triton kernels
    monkeypatch.setattr(attention, "_capability", lambda device_type: (10, 0))
    present["torch._inductor.kernel.flex.flex_flash_attention"] = False  # a torch without the backend
    assert "has no FlashAttention backend" in attention.unavailable_reason("flex-fa4", "cuda", bf16)
    present["torch._inductor.kernel.flex.flex_flash_attention"] = True
    present["flash_attn.cute"] = False
    assert "pip install flash-attn-4" in attention.unavailable_reason("flex-fa4", "cuda", bf16)
    assert "needs bf16 or fp16" in attention.unavailable_reason("flex-fa4", "cuda", torch.float32)


def test_flex_fa4_passes_the_flash_backend_to_flex_attention():
    """The only difference from `flex`: every flex_attention call carries kernel_options BACKEND=FLASH (a spy
    in place of the kernel, on CPU, where the real backend does not exist)."""
    from nanochat.attention import FlexFA4Attention

    attn = FlexFA4Attention("cpu")
    calls = []
    attn._flex = lambda q, k, v, **kw: calls.append(kw) or q
    q = torch.randn(1, 32, 2, 8)
    attn.prepare(32, [16], "cpu")
    with torch.no_grad():
        attn(q, q, q, 16)
    assert calls[0]["kernel_options"] == {"BACKEND": "FLASH"} and calls[0]["block_mask"] is not None
    assert attn.describe() == "flex-fa4 (KV-cache decode: sdpa)"


def test_sdpa_with_windows_on_cuda_warns_what_to_install(monkeypatch):
    import nanochat.attention as attention

    monkeypatch.setattr(attention, "_warned_sdpa_window", False)
    with pytest.warns(UserWarning, match="pip install flash-attn-4"):
        resolve_attention("sdpa", "cuda", torch.bfloat16, windowed=True)
    with warnings.catch_warnings(record=True) as records:  # once per process
        warnings.simplefilter("always")
        resolve_attention("sdpa", "cuda", torch.bfloat16, windowed=True)
        resolve_attention("sdpa", "cuda", torch.bfloat16, windowed=False)
    assert not records, [str(r.message) for r in records]


def test_flex_runs_the_prepared_length_and_leaves_others_to_sdpa():
    flex = FlexAttention("cpu")
    flex.prepare(64, [16, 64], "cpu")
    calls = []
    real = flex._flex
    flex._flex = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)  # a spy: the real kernel runs
    for T in (64, 40):
        q, k, v = qkv(T=T, H=4, K=2)
        torch.testing.assert_close(flex(q, k, v, 16), reference(q, k, v, 16), atol=1e-5, rtol=1e-5)
    assert calls == [(2, 4, 64, 16)]  # only the prepared training length went through flex


def test_record_recipe_default_and_cli_choices(base_dir, capsys):
    import json
    import re

    from nanochat.config import TrainConfig
    from scripts.base_train import main

    recipe = TrainConfig().with_device_defaults(record_recipe=True)
    assert (recipe.window_pattern, recipe.value_embeds, recipe.resid_scalars) == ("SSSL", True, True)
    plain = TrainConfig().with_device_defaults(record_recipe=False)
    assert (plain.window_pattern, plain.value_embeds, plain.resid_scalars) == ("L", False, False)
    explicit = TrainConfig(window_pattern="SL", value_embeds=False).with_device_defaults(record_recipe=True)
    assert (explicit.window_pattern, explicit.value_embeds, explicit.resid_scalars) == ("SL", False, True)
    synth = ["--synthetic-data", "--vocab-size", "300", "--depth", "2", "--aspect-ratio", "32", "--head-dim", "32",
             "--max-seq-len", "32", "--device-batch-size", "4", "--total-batch-size", "128", "--num-iterations", "1",
             "--device-type", "cpu"]
    assert main(synth + ["--attention", "flex", "--model-tag", "flex"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ +attention +flex \(KV-cache decode: sdpa\)$", out, re.M), out
    info = json.loads((base_dir / "base_checkpoints" / "flex" / "run.json").read_text())
    assert info["env"]["attention"] == "flex (KV-cache decode: sdpa)"
    assert info["args"]["window_pattern"] == "L"  # CPU: the default architecture is unchanged
    assert main(synth + ["--attention", "fa3", "--model-tag", "fa3"]) == 2
    assert "--attention fa3 cannot run here" in capsys.readouterr().err
    assert main(synth + ["--fp8", "--model-tag", "fp8"]) == 2
    assert "--fp8 needs a GPU with fp8 tensor cores" in capsys.readouterr().err
