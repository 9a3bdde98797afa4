"""CUDA-only checks (marked `cuda`, skipped without a GPU; benchmarks/gpu_bench.sh runs them):

- every attention backend available on this GPU (FA3, FA4, compiled FlexAttention, SDPA) against SDPA
  with an explicit mask in fp32, forward and backward, for causal, windowed, GQA and KV-cache decode;
- fp8: torch._scaled_mm against the emulated path, and 50 training steps within 5% of bf16's loss;
- the compiled (Inductor) training step of a windowed GQA model: one graph, equal to eager;
- the compiled Muon tail of the optimizer against the eager step;
- --device-batch-size auto's probe, and the chunked per-token evaluation loss's memory.
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from nanochat.attention import resolve_attention, unavailable_reason  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

DEV = "cuda"
BACKENDS = ["fa3", "fa4", "flex-fa4", "flex", "sdpa"]
CASES = [(8, 8, 512), (8, 8, 128), (8, 2, 512), (8, 2, 128)]  # (H, K, window) at T = 512


def reference(q, k, v, window, q_offset=0):
    """fp32 SDPA with the mask written out and kv heads repeated."""
    q, k, v = q.float(), k.float(), v.float()
    H, K, T, S = q.size(2), k.size(2), q.size(1), k.size(1)
    k, v = k.repeat_interleave(H // K, dim=2), v.repeat_interleave(H // K, dim=2)
    i = torch.arange(q_offset, q_offset + T, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    mask = (j <= i) & (i - j < window)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def backend_or_skip(name):
    reason = unavailable_reason(name, "cuda", torch.bfloat16)
    if reason:
        pytest.skip(reason)
    return resolve_attention(name, "cuda", torch.bfloat16, windowed=False)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("H,K,window", CASES)
def test_backend_forward_backward_against_explicit_mask(name, H, K, window):
    attn = backend_or_skip(name)
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(2, 512, n, 128, device=DEV, generator=g, dtype=torch.bfloat16).requires_grad_()
               for n in (H, K, K))
    y = attn(q, k, v, window)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    y_ref = reference(q2, k2, v2, window)
    grads_ref = torch.autograd.grad(y_ref, (q2, k2, v2), dy.float())
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_kv_cache_decode(name):
    attn = backend_or_skip(name)
    q, k, v = (torch.randn(2, 300, n, 128, device=DEV, dtype=torch.bfloat16) for n in (8, 2, 2))
    full = reference(q, k, v, 128)
    pieces, pos = [], 0
    for n in (256, 1, 1, 42):
        end = pos + n
        pieces.append(attn(q[:, pos:end], k[:, :end], v[:, :end], 128, q_offset=pos))
        pos = end
    torch.testing.assert_close(torch.cat(pieces, 1).float(), full, atol=2e-2, rtol=2e-2)


def small_model(attention="auto", **kw):
    cfg = dict(sequence_len=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=256,
               window_pattern="SSSL", value_embeds=True, resid_scalars=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**cfg, **kw}), compute_dtype=torch.bfloat16, attention=attention).to(DEV)
    model.init_weights()
    model.fused_loss = False
    return model


@torch.no_grad()
def perturbed(model, std=0.02, seed=1):
    """Every parameter moved by N(0, std): no zero-initialised projection leaves a gradient at exactly 0."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, device=DEV, generator=g) * std)
    return model


def assert_bf16_close(actual, expected, name, rel=0.05):
    """Two bf16-computed gradients (fp32 master) agree within bf16 rounding: relative error of the whole
    tensor below `rel`, and neither is the trivial zero (a cosine of two zero tensors proves nothing)."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), name
    assert expected.norm() > 0, f"{name}: zero reference gradient"
    err = (actual - expected).norm() / expected.norm()
    assert err < rel, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_step_matches_eager(scope):
    # the whole model as one graph (fullgraph: no breaks), or --compile-scope blocks, through Inductor.
    # The init zeroes the output projections (and the value-embedding gates), which leaves most parameters
    # with exactly zero gradients at step 0: perturb every weight first, so each gradient is a real comparison
    torch._dynamo.reset()
    model = perturbed(small_model())
    model.before_compile()
    x = torch.randint(0, 512, (4, 256), device=DEV)
    eager = model(x, x)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    if scope == "model":
        run = torch.compile(model, fullgraph=True, dynamic=False)
    else:
        run = model.compile_blocks(dynamic=False)
    loss = run(x, x)
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=2e-2, rtol=2e-2)
    for (name, p), a in zip(model.named_parameters(), g_eager):
        assert_bf16_close(p.grad, a, name)


def test_fp8_scaled_mm_matches_emulation():
    from nanochat.fp8 import fp8_linear, fp8_supported

    if fp8_supported(DEV):
        pytest.skip(fp8_supported(DEV))
    x = torch.randn(256, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(768, 512, device=DEV) * 512 ** -0.5).requires_grad_()
    outs = []
    for emulate in (False, True):
        y = fp8_linear(x, w, emulate=emulate)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        outs.append((y.float(), gx.float(), gw))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_fp8_trains_within_5_percent_of_bf16():
    from nanochat.fp8 import enable_fp8, fp8_supported
    from nanochat.optim import build_optimizer

    if fp8_supported(DEV):
        pytest.skip(fp8_supported(DEV))
    g = torch.Generator(device=DEV).manual_seed(1)
    data = torch.randint(0, 512, (50, 8, 257), device=DEV, generator=g)
    data = data.remainder(64)  # a learnable skew: 64 tokens of 512
    finals = []
    for fp8 in (False, True):
        model = small_model()
        if fp8:
            assert len(enable_fp8(model)) == 4 * 6
        opt = build_optimizer(model, matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
        losses = []
        for step in range(50):
            loss = model(data[step, :, :-1], data[step, :, 1:])
            loss.backward()
            opt.step()
            model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        finals.append(sum(losses[-5:]) / 5)
    assert finals[1] == pytest.approx(finals[0], rel=0.05), finals


def test_compiled_optimizer_matches_eager():
    from nanochat.optim import build_optimizer

    results = []
    for compile in (False, True):
        model = small_model()
        opt = build_optimizer(model, weight_decay=0.1, compile=compile)
        x = torch.randint(0, 512, (4, 256), device=DEV)
        for lr_mult in (1.0, 0.5, 0.25):  # schedule changes: no recompiles needed
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr_mult
            model(x, x).backward()
            opt.step()
            model.zero_grad(set_to_none=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("compile", [False, True])
def test_optimizer_step_never_syncs_with_the_host(compile):
    # CUDA's sync debug mode raises on any device-to-host wait (a .item(), a pageable copy, ...)
    from nanochat.optim import build_optimizer

    model = small_model()
    opt = build_optimizer(model, weight_decay=0.1, compile=compile)
    x = torch.randint(0, 512, (4, 256), device=DEV)
    for step in range(3):  # the first step compiles and allocates state; the later ones must not sync
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * (1.0 - 0.1 * step)
        model(x, x).backward()
        torch.cuda.synchronize()
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        model.zero_grad(set_to_none=True)


def test_auto_batch_probe_returns_a_size_that_trains():
    from nanochat.autobatch import candidate_batch_sizes, find_device_batch_size

    model = small_model()
    size = find_device_batch_size(model, model, 256, 512, 64 * 256, log=print)
    assert size in candidate_batch_sizes(64 * 256, 256, 1)
    x = torch.randint(0, 512, (size, 256), device=DEV)
    model(x, x).backward()


def test_per_token_eval_loss_is_chunked():
    model = small_model(vocab_size=32768, sequence_len=2048, n_layer=1, window_pattern="L")
    model.eval_logits_chunk_elems = 2 ** 24
    x = torch.randint(0, 32768, (8, 2048), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        loss = model(x, x, loss_reduction="none")
    peak = torch.cuda.max_memory_allocated() - base
    full_logits = 8 * 2048 * 32768 * 4  # what the unchunked path materialises in fp32
    assert loss.shape == (8, 2048) and peak < full_logits / 4, (peak, full_logits)
    # like with like: the same batch of 8 in one chunk (cuBLAS picks other kernels for other shapes, so a
    # batch of 1 is no fp32-exact reference); chunking only splits the head's rows, in bf16 compute
    model.eval_logits_chunk_elems = 2 ** 40
    with torch.no_grad():
        ref = model(x, x, loss_reduction="none")
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
