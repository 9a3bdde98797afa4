"""fp8 Linears (nanochat/fp8.py) on CPU by emulation: the scaling and casting logic against an
independent reference (the fp8 value grid enumerated from all 256 bit patterns), forward and
gradients against the float matmul. The real torch._scaled_mm path is checked in tests/test_cuda.py."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.fp8 import E4M3, E5M2, FP8_MAX, Fp8Linear, enable_fp8, fp8_linear, scaled_mm, to_fp8
from nanochat.gpt import GPT, GPTConfig, Linear


def grid(dtype):
    """Every finite value of an fp8 format, sorted (from the 256 bit patterns)."""
    v = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).float()
    return v[torch.isfinite(v)].unique()


def nearest_on_grid(x, values, dtype):
    # round to nearest (ties to the even mantissa: the value whose bit pattern is even)
    idx = torch.searchsorted(values, x.contiguous()).clamp(1, len(values) - 1)
    lo, hi = values[idx - 1], values[idx]
    pick_hi = (hi - x) < (x - lo)
    tie = (hi - x) == (x - lo)
    hi_bits = hi.to(dtype).view(torch.uint8)
    pick_hi = pick_hi | (tie & (hi_bits % 2 == 0))
    return torch.where(pick_hi, hi, lo)


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_to_fp8_scales_amax_to_the_format_max_and_rounds_to_the_grid(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g) * 3.0
    x8, inv = to_fp8(x, dtype)
    assert x8.dtype == dtype
    scale = FP8_MAX[dtype] / x.abs().max()
    torch.testing.assert_close(inv, 1 / scale)
    assert x8.float().abs().max() == FP8_MAX[dtype]  # the largest magnitude lands on the format max
    expected = nearest_on_grid(x * scale, grid(dtype), dtype)
    assert torch.equal(x8.float(), expected)
    # dequantised: within half a step of the format's relative precision (3 / 2 mantissa bits), or of
    # its smallest subnormal step near zero
    rel, tiny = (2.0 ** -4, 2.0 ** -9) if dtype == E4M3 else (2.0 ** -3, 2.0 ** -16)
    err = (x8.float() * inv - x).abs()
    assert bool((err <= rel * x.abs() + inv * tiny).all())


def test_to_fp8_of_zeros_is_finite():
    x8, inv = to_fp8(torch.zeros(16, 16), E4M3)
    assert torch.equal(x8.float(), torch.zeros(16, 16)) and torch.isfinite(inv)


def test_emulated_scaled_mm_is_the_dequantised_product():
    a, b = torch.randn(32, 64), torch.randn(64, 16)
    a8, ia = to_fp8(a, E4M3)
    b8, ib = to_fp8(b, E4M3)
    ref = (a8.float() * ia) @ (b8.float() * ib)
    torch.testing.assert_close(scaled_mm(a8, b8, ia, ib, torch.float32, emulate=True), ref)


def test_fp8_linear_forward_and_gradients_track_float_linear():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    w = (torch.randn(96, 64) * 64 ** -0.5).requires_grad_()
    y = fp8_linear(x, w, emulate=True)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = F.linear(x2, w2)
    g = torch.randn_like(y_ref)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert y.shape == y_ref.shape
    assert rel(y, y_ref) < 0.05  # e4m3 operands
    assert rel(x.grad, x2.grad) < 0.1  # e5m2 gradients
    assert rel(w.grad, w2.grad) < 0.1
    assert w.grad.dtype == torch.float32


def model_config():
    return GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                     window_pattern="SL", value_embeds=True, resid_scalars=True)


def test_enable_fp8_converts_block_linears_only_and_keeps_params_and_flops():
    torch.manual_seed(0)
    model = GPT(model_config())
    model.init_weights()
    keys, flops = list(model.state_dict()), model.estimate_flops()
    converted = enable_fp8(model, emulate=True)
    assert len(converted) == 2 * 6
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            is_fp8 = isinstance(module, Fp8Linear)
            assert is_fp8 == (name in converted), name
            assert not (is_fp8 and ("lm_head" in name or "ve_gate" in name))
    assert list(model.state_dict()) == keys
    assert model.estimate_flops() == flops  # FLOPs come from the config's shapes, not module classes


def test_fp8_model_trains_close_to_float():
    torch.manual_seed(0)
    ref = GPT(model_config())
    ref.init_weights()
    with torch.no_grad():
        for b in ref.blocks:
            b.attn.c_proj.weight.normal_(std=0.05)
            b.mlp.c_proj.weight.normal_(std=0.05)
    fp8 = GPT(model_config())
    fp8.load_state_dict(ref.state_dict())
    enable_fp8(fp8, emulate=True)
    x, y = torch.randint(0, 300, (2, 32)), torch.randint(0, 300, (2, 32))
    for m in (ref, fp8):
        m.fused_loss = False
    losses = []
    for m in (ref, fp8):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(5):
            loss = m(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


def test_enable_fp8_refuses_without_fp8_tensor_cores():
    model = GPT(model_config())
    with pytest.raises(ValueError, match=r"--fp8 needs a GPU with fp8 tensor cores .*this run is on cpu"):
        enable_fp8(model)


def test_forward_gemm_uses_fast_accumulation_and_gradient_gemms_do_not(monkeypatch):
    """The three GEMMs reach torch._scaled_mm with the layouts it requires (a row-major, b column-major)
    and fast accumulation on the forward only (torchao's tensorwise recipe). A stand-in records each call
    and returns the dequantised product, so the result is still checked against the float linear."""
    calls = []

    def fake_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
        calls.append((tuple(a.shape), a.is_contiguous(), b.t().is_contiguous(), use_fast_accum))
        return ((a.float() * scale_a) @ (b.float() * scale_b)).to(out_dtype)

    monkeypatch.setattr(torch, "_scaled_mm", fake_scaled_mm)
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    w = (torch.randn(48, 64) * 64 ** -0.5).requires_grad_()
    y = fp8_linear(x, w, emulate=False)
    y.backward(torch.randn_like(y))
    assert calls == [((32, 64), True, True, True),    # forward: y = x8 @ w8.T
                     ((32, 48), True, True, False),   # dx = g8 @ w8
                     ((48, 32), True, True, False)]   # dW = g8.T @ x8
    torch.testing.assert_close(y, F.linear(x, w), atol=0.15, rtol=0.1)
